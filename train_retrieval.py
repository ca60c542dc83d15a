"""Image-text retrieval fine-tuning (COCO / Flickr30k Karpathy splits): ITC with the image-index queue + ITM on
hard negatives; ITC top-k + ITM re-rank recall on val and test after every epoch.

    python train_retrieval.py --config configs/shapes_retrieval.yaml                 # offline: the shapes world
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_coco.yaml
    python train_retrieval.py --config configs/retrieval_flickr.yaml --evaluate      # the `pretrained` weights
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import RetrievalTask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(RetrievalTask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
