"""X-FM pretraining: pairs (ITC, ITM, image-conditioned MLM, MIM), texts (MLM) and images (MIM) in every step.

    python pretrain_xfm.py --config configs/shapes_xfm.yaml           # offline default: the shapes world
    torchrun --nproc_per_node=8 pretrain_xfm.py --config configs/xfm_pretrain.yaml
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import XFMTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(XFMTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
