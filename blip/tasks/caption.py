"""Captioning fine-tuning on COCO (Karpathy split): LM loss on 'a picture of ' + caption; beam-search captions scored
(BLEU, METEOR, ROUGE-L, CIDEr, SPICE when available) on val and test after every epoch. `task: nocaps` only
writes the result files the NoCaps server takes, one per split file present."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..data.batches import CaptionCollate
from ..data.datasets import ImageDataset, as_list, int_id, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import evaluate_caption
from ..models.generation import Decoding
from ..training.config import option
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


@dataclass
class DecodingOptions(Task.Options):
    """Beam search as the original's caption configs set it (blip.models.generation.Decoding)."""
    max_length: int = 20                # tokens, the prompt's included
    min_length: int = 5
    num_beams: int = option(3, at_least=1)
    repetition_penalty: float = 1.0     # the NoCaps script uses 1.1

    def decoding(self, **over) -> Decoding:
        return Decoding(num_beams=self.num_beams, max_length=self.max_length, min_length=self.min_length,
                        repetition_penalty=self.repetition_penalty, **over)


@dataclass
class CaptionOptions(DecodingOptions):
    coco_gt_root: str = option("", path="folder")  # the COCO-format ground truth ({dataset}_{split}_gt.json)
    meteor: bool = True                 # the scores include METEOR (a Java process, ~10 s a call)
    score_captions: bool = True         # score the captions (PTB tokenizer: Java); false: the result files only (a
    #                                     machine without Java, e.g. a GPU image)


class CaptionTask(Task):
    Options = CaptionOptions
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
        cfg, opt, out = self.cfg, self.options, {}
        for split in ("val", "test"):
            path = self.ann_file("nocaps" if self.nocaps else self.dataset, split)
            if self.nocaps and not os.path.exists(path):
                log.warning("no %s: NoCaps %s skipped", path, split)
                continue
            images = CaptionEvalDataset(path, cfg.image_root, self.test_transform(model))
            scored = opt.score_captions and not self.nocaps
            gt = self.ann_file(self.dataset, f"{split}_gt", root=opt.coco_gt_root) if scored else None
            out[split] = lambda m, d=images, gt=gt, split=split: evaluate_caption(
                m, d, opt.decoding(), gt, os.path.join(out_dir, f"{split}_result.json"),
                batch_size=cfg.test_batch_size, num_workers=cfg.num_workers, meteor=opt.meteor)
        if not out:
            raise SystemExit(f"nothing to evaluate: no NoCaps split file in {cfg.ann_root}")
        return out

    def best(self, metrics):
        return metrics["val_CIDEr"] + metrics["val_Bleu_4"] if "val_CIDEr" in metrics else None
