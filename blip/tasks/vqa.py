"""VQA fine-tuning on VQA v2 train+val and Visual Genome QA; after the last epoch the test questions are answered by
ranking the answer list (inference: rank, k_test candidates) or by generation, into vqa_result.json (the VQA
server's format). Splits that carry answers (the shapes world's) also get the official VQA accuracy."""
from __future__ import annotations

import json
import os

from ..data.batches import VQACollate
from ..data.datasets import VQADataset
from ..evaluation.loops import evaluate_vqa
from .base import Task


class VQATask(Task):
    names = ("vqa",)
    model_task = "vqa"
    eval_every_epoch = False  # as the original: no model selection on the test split, evaluated once
    ann_files = {"vqa": "vqa_{}.json"}

    @property
    def roots(self):
        return {"vqa": self.cfg.vqa_root, "vg": self.cfg.vg_root}

    def train_data(self, model):
        cfg = self.cfg
        files = [os.path.join(cfg.ann_root, f"{name}.json") for name in cfg.train_files]
        return VQADataset(files, self.roots, self.train_transform(model), split="train")

    def collate(self, model):
        answers = model.answer_static_length if self.static else model.answer_max_length
        return VQACollate(model.question_max_length, answers, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(batch)

    def evaluations(self, model, out_dir):
        cfg = self.cfg
        with open(os.path.join(cfg.ann_root, "answer_list.json")) as f:
            answer_list = json.load(f)
        test = VQADataset(self.ann_file("vqa", "test"), self.roots, self.test_transform(model), split="test")
        return {"test": lambda m: evaluate_vqa(m, test, cfg, answer_list,
                                               result_file=os.path.join(out_dir, "vqa_result.json"))}
