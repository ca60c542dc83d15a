"""NLVR2 fine-tuning: is the sentence true of the image pair? Accuracy on dev and test-P after every epoch.

    python train_nlvr.py --config configs/shapes_nlvr.yaml                           # offline: the shapes world
    torchrun --nproc_per_node=8 train_nlvr.py --config configs/nlvr.yaml
    python train_nlvr.py --config configs/nlvr.yaml --evaluate                       # the `pretrained` weights
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import NLVRTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(NLVRTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
