"""SNLI-VE fine-tuning (ALBEF's task): image + hypothesis -> entailment / neutral / contradiction. Accuracy on dev and
test after every epoch, the best dev epoch kept."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.batches import ClassCollate
from ..data.datasets import IMAGE_EXTS, ImageDataset, load_entries
from ..data.tokenizer import pre_caption
from ..evaluation.loops import eval_mode, gather, rank_loader
from ..evaluation.metrics.nlvr import accuracy
from .base import Task


VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's ids


class VEDataset(ImageDataset):
    """ALBEF's SNLI-VE files: entries {image, sentence, label} -> (image, sentence, label id). `image` is a Flickr30k
    id without extension (`image_root/{image}.jpg`), or a path with its extension (kept as it is); the sentence is
    cleaned with pre_caption; labels entailment / neutral / contradiction -> 2 / 1 / 0."""

    def __init__(self, ann_file, image_root, transform, train: bool, max_words=30):
        super().__init__(transform)
        self.image_root, self.max_words, self.ann_file = image_root, max_words, ann_file
        self.evaluation = not train
        self.ann = load_entries(ann_file, ("image", "sentence", "label"))
        for i, e in enumerate(self.ann):
            if e["label"] not in VE_LABELS:
                raise ValueError(f"{ann_file}: entry {i} has label {e['label']!r}; expected one of {sorted(VE_LABELS)}")

    def __len__(self):
        return len(self.ann)

    def image_files(self, index):
        image = str(self.ann[index]["image"])
        has_ext = image.rsplit(".", 1)[-1].lower() in IMAGE_EXTS
        return [os.path.join(self.image_root, image if has_ext else f"{image}.jpg")]

    def load(self, index):
        e = self.ann[index]
        image = self.load_image(self.image_files(index)[0])
        if image is None:
            return None
        return image, pre_caption(e["sentence"], self.max_words), VE_LABELS[e["label"]]


@torch.no_grad()
def evaluate_ve(model, dataset, batch_size=64, num_workers=0) -> dict:
    """Accuracy (%) of the 3-way predictions, per class (acc_entailment, ...), and over entailment + contradiction
    (acc_decided)."""
    preds, labels = [], []
    with eval_mode(model):
        for images, sentences, label in rank_loader(dataset, batch_size, num_workers):
            preds += model.predict(images.to(model.device), list(sentences)).tolist()
            labels += label.tolist()
    preds, labels = gather(preds), gather(labels)
    out = {"acc": accuracy(preds, labels)}
    for name, classes in (("contradiction", (0,)), ("neutral", (1,)), ("entailment", (2,)), ("decided", (0, 2))):
        rows = [i for i, y in enumerate(labels) if y in classes]
        if rows:  # decided: entailment and contradiction, where the image settles it
            out[f"acc_{name}"] = accuracy([preds[i] for i in rows], [labels[i] for i in rows])
    return out


@dataclass
class VEOptions(Task.Options):
    shapes_ve: dict | None = None       # the offline set: data.shapes_ve.generate_ve_set arguments (train_ve.py)


class VETask(Task):
    Options = VEOptions
    names = ("ve",)
    model_task = "ve"
    ann_files = {"ve": "ve_{}.json"}

    def train_data(self, model):
        return VEDataset(self.ann_file("ve", "train"), self.cfg.image_root, self.train_transform(model), train=True,
                         max_words=self.cfg.max_words)

    def collate(self, model):
        return ClassCollate(model.text_max_length, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def evaluations(self, model, out_dir):
        cfg, out = self.cfg, {}
        for split in ("dev", "test"):
            data = VEDataset(self.ann_file("ve", split), cfg.image_root, self.test_transform(model), train=False,
                             max_words=cfg.max_words)
            out[split] = lambda m, d=data: evaluate_ve(m, d, cfg.test_batch_size, cfg.num_workers)
        return out

    def best(self, metrics):
        return metrics["dev_acc"]
