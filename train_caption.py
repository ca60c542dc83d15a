"""Captioning fine-tuning on COCO (Karpathy split): LM loss on 'a picture of ' + caption; beam-search captions
scored (BLEU, METEOR, ROUGE-L, CIDEr, SPICE when available) on val and test after every epoch. With a NoCaps
config (task: nocaps) it only writes the result files the NoCaps server takes, one per split file present.

    python train_caption.py --config configs/shapes_caption.yaml                      # offline: the shapes world
    torchrun --nproc_per_node=8 train_caption.py --config configs/caption_coco.yaml
    python train_caption.py --config configs/nocaps.yaml --evaluate                   # nocaps_{val,test}.json
"""
from __future__ import annotations

import logging
import os

from blip.evaluation import evaluate_caption
from blip.run import ann_file, finetune, start_run, train_transform_for
from blip.tasks import CaptionObjective, build_model
from data.datasets import CaptionEvalDataset, CaptionTrainDataset
from data.transforms import test_transform


def main(argv=None):
    args, cfg, device, out = start_run("BLIP captioning fine-tuning", argv)
    kind = cfg.dataset or ("shapes" if cfg.shapes else "coco")
    nocaps = cfg.task == "nocaps"
    if nocaps and not args.evaluate:
        raise SystemExit("NoCaps is evaluation only: pass --evaluate")
    model = build_model("caption", cfg).to(device)
    train_set = lambda: CaptionTrainDataset(ann_file(cfg, kind, "train"), cfg.image_root, train_transform_for(cfg),
                                            max_words=cfg.max_words)
    evaluations = {}
    for split in ("val", "test"):
        path = ann_file(cfg, "nocaps" if nocaps else kind, split)
        if nocaps and not os.path.exists(path):
            logging.getLogger(__name__).warning("no %s: NoCaps %s skipped", path, split)
            continue
        images = CaptionEvalDataset(path, cfg.image_root, test_transform(cfg.image_size))
        gt = None if nocaps else ann_file(cfg, kind, f"{split}_gt", root=cfg.coco_gt_root)
        evaluations[split] = lambda m, d=images, gt=gt, split=split: evaluate_caption(
            m, d, cfg, gt, result_file=out / f"{split}_result.json")
    if not evaluations:
        raise SystemExit(f"nothing to evaluate: no NoCaps split file in {cfg.ann_root}")
    return finetune(args, cfg, out, model, CaptionObjective(), train_set, evaluations,
                    best=lambda m: m["val_CIDEr"] + m["val_Bleu_4"], device=device)


if __name__ == "__main__":
    main()
