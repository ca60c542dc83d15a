"""Captioning fine-tuning on COCO (Karpathy split): LM loss on 'a picture of ' + caption; beam-search captions scored
(BLEU, METEOR, ROUGE-L, CIDEr, SPICE when available) on val and test after every epoch. `task: nocaps` only
writes the result files the NoCaps server takes, one per split file present."""
from __future__ import annotations

import logging
import os

from ..data.batches import CaptionCollate
from ..data.datasets import CaptionEvalDataset, CaptionTrainDataset
from ..evaluation.loops import evaluate_caption
from .base import Task

log = logging.getLogger(__name__)


class CaptionTask(Task):
    names = ("caption", "nocaps")
    model_task = "caption"
    ann_files = {"coco": "coco_karpathy_{}.json", "shapes": "karpathy_{}.json", "nocaps": "nocaps_{}.json"}

    @property
    def nocaps(self) -> bool:
        return self.cfg.task == "nocaps"

    @property
    def dataset(self) -> str:
        return self.cfg.dataset or ("shapes" if self.cfg.shapes else "coco")

    def train_data(self, model):
        if self.nocaps:
            raise SystemExit("NoCaps is evaluation only: pass --evaluate")
        cfg = self.cfg
        return CaptionTrainDataset(self.ann_file(self.dataset, "train"), cfg.image_root, self.train_transform(model),
                                   max_words=cfg.max_words)

    def collate(self, model):
        return CaptionCollate(model.cfg.prompt, model.max_text_length, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def evaluations(self, model, out_dir):
        cfg, out = self.cfg, {}
        for split in ("val", "test"):
            path = self.ann_file("nocaps" if self.nocaps else self.dataset, split)
            if self.nocaps and not os.path.exists(path):
                log.warning("no %s: NoCaps %s skipped", path, split)
                continue
            images = CaptionEvalDataset(path, cfg.image_root, self.test_transform(model))
            scored = cfg.score_captions and not self.nocaps
            gt = self.ann_file(self.dataset, f"{split}_gt", root=cfg.coco_gt_root) if scored else None
            out[split] = lambda m, d=images, gt=gt, split=split: evaluate_caption(
                m, d, cfg, gt, result_file=os.path.join(out_dir, f"{split}_result.json"))
        if not out:
            raise SystemExit(f"nothing to evaluate: no NoCaps split file in {cfg.ann_root}")
        return out

    def best(self, metrics):
        return metrics["val_CIDEr"] + metrics["val_Bleu_4"] if "val_CIDEr" in metrics else None
