"""X-FM VQA fine-tuning (VQA v2 + Visual Genome QA, or any dataset of that format): the fusion encoder's [CLS] over
(question, image) -> a classifier over the answer vocabulary of ann_root's answer_list.json (saved with the
weights), binary cross-entropy with the annotators' soft targets; after the last epoch the test questions are
answered by the classifier's argmax into vqa_result.json (with the VQA accuracy where the split has answers).
Starts from an X-FM checkpoint (`pretrained`, pretrain_xfm.py's)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.batches import SoftTargetCollate
from ..models.factory import load_model
from ..training.config import option
from .base import Task
from .vqa import VQATask, read_answer_list


@dataclass
class XFMVQAOptions(Task.Options):
    train_files: list[str] = option([])  # annotation files under ann_root, without .json: vqa_train, vqa_val, vg_qa
    vqa_root: str = option("", path="folder")  # the COCO images of VQA v2
    vg_root: str = option("", path="folder")  # the Visual Genome images
    xfm: dict | None = None             # XFMConfig keys over the checkpoint's description (blip.models.xfm)


class XFMVQATask(VQATask):
    """The data and evaluation of BLIP's VQA task, X-FM's model with an answer classifier."""
    Options = XFMVQAOptions
    names = ("xfm_vqa",)
    model_task = "xfm_vqa"
    find_unused_parameters = True  # pretraining's heads (ITC, ITM, MLM, the mask token) ride along unused

    def answer_list(self) -> list[str]:
        return read_answer_list(os.path.join(self.cfg.ann_root, "answer_list.json"))

    def build_model(self):
        """The X-FM checkpoint of `pretrained` (else a fresh XFM at the config's `preset`), its answer vocabulary
        ann_root's answer_list.json, the config's `xfm` keys over its description."""
        return load_model(self.model_task, self.cfg.pretrained or None,
                          **{**self.cfg.model, "answers": self.answer_list(), **(self.options.xfm or {})})

    def collate(self, model):
        return SoftTargetCollate(model.text_max_length, model.cfg.answers, static=self.static)

    def losses(self, forward, batch, progress):
        return forward(vqa=batch)

    def answering(self):
        return dict(method="rank")  # the classifier scores every answer: no k
