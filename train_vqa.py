"""VQA fine-tuning on VQA v2 train+val and Visual Genome QA; after the last epoch the test questions are answered
by ranking the answer list (inference: rank, k_test candidates) or by generation, into vqa_result.json (the VQA
server's format). Splits that carry answers (the shapes world's) also get the official VQA accuracy.

    python train_vqa.py --config configs/shapes_vqa.yaml                             # offline: the shapes world
    torchrun --nproc_per_node=8 train_vqa.py --config configs/vqa.yaml
    python train_vqa.py --config configs/vqa.yaml --evaluate                          # the `pretrained` weights
"""
from __future__ import annotations

import json
import os

from blip.evaluation import evaluate_vqa
from blip.run import ann_file, finetune, start_run, train_transform_for
from blip.tasks import VQAObjective, build_model
from data.datasets import VQADataset, vqa_collate
from data.transforms import test_transform


def main(argv=None):
    args, cfg, device, out = start_run("BLIP VQA fine-tuning", argv)
    roots = {"vqa": cfg.vqa_root, "vg": cfg.vg_root}
    model = build_model("vqa", cfg).to(device)
    train_set = lambda: VQADataset([os.path.join(cfg.ann_root, f"{name}.json") for name in cfg.train_files], roots,
                                   train_transform_for(cfg), split="train")
    with open(os.path.join(cfg.ann_root, "answer_list.json")) as f:
        answer_list = json.load(f)
    test = VQADataset(ann_file(cfg, "vqa", "test"), roots, test_transform(cfg.image_size), split="test")
    evaluations = {"test": lambda m: evaluate_vqa(m, test, cfg, answer_list, result_file=out / "vqa_result.json")}
    # as the original: no model selection on the test split, which is evaluated once, after training
    return finetune(args, cfg, out, model, VQAObjective(), train_set, evaluations, eval_every_epoch=False,
                    collate_fn=vqa_collate, device=device)


if __name__ == "__main__":
    main()
