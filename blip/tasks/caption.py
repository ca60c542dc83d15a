"""Captioning fine-tuning on COCO (Karpathy split): LM loss on 'a picture of ' + caption; beam-search captions scored
(BLEU, METEOR, ROUGE-L, CIDEr, SPICE when available) on val and test after every epoch. `task: nocaps` only
writes the result files the NoCaps server takes, one per split file present."""
from __future__ import annotations

import logging
import os

from ..data.batches import CaptionCollate
from ..data.datasets import ImageDataset, as_list, int_id, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import evaluate_caption
from .base import Task

log = logging.getLogger(__name__)


class CaptionTrainDataset(ImageDataset):
    """Karpathy train entries {image, caption, image_id} -> (image, caption, image index).

    The caption is cleaned but carries no prompt: the caption model prepends its own. Image ids are
    remapped to contiguous ints in order of first appearance (the retrieval idx queue needs them).
    """

    def __init__(self, ann_file, image_root, transform, max_words=30):
        super().__init__(transform)
        self.image_root, self.max_words = image_root, max_words
        self.ann = [e for f in as_list(ann_file) for e in load_entries(f, ("image", "caption", "image_id"))]
        self.img_ids: dict = {}
        for e in self.ann:
            self.img_ids.setdefault(e["image_id"], len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, self.ann[index]["image"])]

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(os.path.join(self.image_root, e["image"]))
        if image is None:
            return None
        return image, pre_caption(e["caption"], self.max_words), self.img_ids[e["image_id"]]


class CaptionEvalDataset(ImageDataset):
    """Entries {image, ...} -> (image, image_id). image_id is the entry's `image_id` or `img_id`
    (NoCaps) when present, else the integer ending the file name (COCO_val2014_000000391895.jpg)."""

    evaluation = True

    def __init__(self, ann_file, image_root, transform):
        super().__init__(transform)
        self.image_root, self.ann_file = image_root, ann_file
        self.ann = load_entries(ann_file, ("image",))
        self.image_ids = []
        for i, e in enumerate(self.ann):
            try:
                self.image_ids.append(int_id(e.get("image_id", e.get("img_id", e["image"]))))
            except ValueError as err:
                raise ValueError(f"{ann_file}: entry {i}: {err}") from None

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        return [os.path.join(self.image_root, self.ann[index]["image"])]

    def load(self, index):
        image = self.load_image(os.path.join(self.image_root, self.ann[index]["image"]))
        return None if image is None else (image, self.image_ids[index])


NoCapsDataset = CaptionEvalDataset  # {image, img_id}


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
