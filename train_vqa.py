"""VQA fine-tuning on VQA v2 train+val and Visual Genome QA; the test questions answered after the last epoch
(vqa_result.json, the VQA server's format; accuracy on splits that carry answers).

    python train_vqa.py --config configs/shapes_vqa.yaml                             # offline: the shapes world
    torchrun --nproc_per_node=8 train_vqa.py --config configs/vqa.yaml
    python train_vqa.py --config configs/vqa.yaml --evaluate                          # the `pretrained` weights
"""
from blip.errors import exit_on_user_error
from blip.training.run import run
from blip.tasks import VQATask
from data.worlds import ensure_shapes_world


def main(argv=None):
    return run(VQATask, argv, prepare=ensure_shapes_world)


if __name__ == "__main__":
    exit_on_user_error(main)
