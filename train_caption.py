"""Captioning fine-tuning on COCO (Karpathy split), scored on val and test after every epoch; with a NoCaps config
(task: nocaps) it only writes the result files the NoCaps server takes.

    python train_caption.py --config configs/shapes_caption.yaml                      # offline: the shapes world
    torchrun --nproc_per_node=8 train_caption.py --config configs/caption_coco.yaml
    python train_caption.py --config configs/nocaps.yaml --evaluate                   # nocaps_{val,test}.json
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import CaptionTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(CaptionTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
