"""Pretraining: ITC + ITM + LM on image-text pairs (JSON lists or webdataset shards).

    python pretrain.py --config configs/shapes_pretrain.yaml          # offline default: the shapes world
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain.yaml
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import PretrainTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(PretrainTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
