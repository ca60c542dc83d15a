"""X-FM NLVR2 fine-tuning: the fusion encoder once per image, a classifier over both [CLS] states; dev / test accuracy.

    python train_xfm_nlvr.py --config configs/shapes_xfm_nlvr.yaml --set pretrained=output/shapes_xfm/model.safetensors
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks.xfm_nlvr import XFMNLVRTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(XFMNLVRTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
