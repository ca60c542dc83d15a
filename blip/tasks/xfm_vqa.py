"""X-FM VQA fine-tuning (VQA v2 + Visual Genome QA, or any dataset of that format): the fusion encoder's [CLS] over
(question, image) -> a classifier over the answer vocabulary of ann_root's answer_list.json (saved with the
weights), binary cross-entropy with the annotators' soft targets; after the last epoch the test questions are
answered by the classifier's argmax into vqa_result.json (with the VQA accuracy where the split has answers).
Starts from an X-FM checkpoint (`pretrained`, pretrain_xfm.py's)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.batches import SoftTargetCollate
from ..training.config import option
from .vqa import VQATask, read_answer_list
from .xfm import XFMModel, XFMModelOptions


@dataclass
class XFMVQAOptions(XFMModelOptions):
    train_files: list[str] = option([])  # annotation files under ann_root, without .json: vqa_train, vqa_val, vg_qa
    vqa_root: str = option("", path="folder")  # the COCO images of VQA v2
    vg_root: str = option("", path="folder")  # the Visual Genome images


class XFMVQATask(XFMModel, VQATask):
    """The data and evaluation of BLIP's VQA task, X-FM's model with an answer classifier."""
    Options = XFMVQAOptions
    names = ("xfm_vqa",)
    model_task = "xfm_vqa"

    def answer_list(self) -> list[str]:
        return read_answer_list(os.path.join(self.cfg.ann_root, "answer_list.json"))

    def model_keys(self):
        return {"answers": self.answer_list()}  # the classifier's vocabulary, saved with the weights

    def collate(self, model):
        return SoftTargetCollate(model.text_max_length, model.cfg.answers, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(vqa=batch)

    def answering(self):
        return dict(method="rank")  # the classifier scores every answer: no k
