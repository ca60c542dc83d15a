"""X-FM retrieval fine-tuning: ITC + ITM over the fusion encoder; ITC top-k + ITM re-rank recall on val and test.

    python train_xfm_retrieval.py --config configs/shapes_xfm_retrieval.yaml --set pretrained=output/shapes_xfm/model.safetensors
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks.xfm_retrieval import XFMRetrievalTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(XFMRetrievalTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
