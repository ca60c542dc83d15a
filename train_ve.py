"""SNLI-VE fine-tuning (visual entailment): image + hypothesis -> entailment / neutral / contradiction. Accuracy on dev
and test after every epoch, the best dev epoch kept.

    python train_ve.py --config configs/shapes_ve.yaml                                # offline: the shapes world
    torchrun --nproc_per_node=8 train_ve.py --config configs/snli_ve.yaml
    python train_ve.py --config configs/snli_ve.yaml --evaluate                       # the `pretrained` weights
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import VETask
from data.shapes_ve import ensure_shapes_ve_world


def main(argv=None):
    return run(VETask, argv, prepare=ensure_shapes_ve_world)


if __name__ == "__main__":
    exit_on_user_error(main)
