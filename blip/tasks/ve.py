"""SNLI-VE fine-tuning (ALBEF's task): image + hypothesis -> entailment / neutral / contradiction. Accuracy on dev and
test after every epoch, the best dev epoch kept."""
from __future__ import annotations

import torch

from ..data.batches import ClassCollate
from ..data.datasets import VEDataset
from ..evaluation.loops import eval_mode, gather, rank_loader
from ..evaluation.metrics.nlvr import accuracy
from .base import Task


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


class VETask(Task):
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
