"""NLVR2 fine-tuning: is the sentence true of the image pair? Accuracy on dev and test-P after every epoch, the best
dev epoch kept."""
from __future__ import annotations

from ..data.batches import ClassCollate
from ..data.datasets import NLVRDataset
from ..evaluation.loops import evaluate_nlvr
from .base import Task


class NLVRTask(Task):
    names = ("nlvr",)
    model_task = "nlvr"
    ann_files = {"nlvr": "nlvr_{}.json"}

    def train_data(self, model):
        return NLVRDataset(self.ann_file("nlvr", "train"), self.cfg.image_root, self.train_transform(model), train=True)

    def collate(self, model):
        return ClassCollate(model.text_static_length if self.static else model.text_max_length, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def evaluations(self, model, out_dir):
        cfg, out = self.cfg, {}
        for split in ("dev", "test"):
            data = NLVRDataset(self.ann_file("nlvr", split), cfg.image_root, self.test_transform(model), train=False)
            out[split] = lambda m, d=data: evaluate_nlvr(m, d, cfg.test_batch_size, cfg.num_workers)
        return out

    def best(self, metrics):
        return metrics["dev_acc"]
