"""X-FM VQA fine-tuning: an answer classifier on the fusion encoder; the test questions answered by its argmax.

    python train_xfm_vqa.py --config configs/shapes_xfm_vqa.yaml --set pretrained=output/shapes_xfm/model.safetensors
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks.xfm_vqa import XFMVQATask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(XFMVQATask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
