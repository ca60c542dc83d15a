"""Visual entailment (`ve`, SNLI-VE): does the image entail, contradict or leave open the hypothesis?

As ALBEF's model: the hypothesis ([ENC] first) cross-attends to every image token in the multimodal encoder; its
first state goes through Linear(h, h) -> ReLU -> Linear(h, 3); cross-entropy over contradiction / neutral /
entailment (0 / 1 / 2). (ALBEF optionally distils against a momentum model; not done here.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import ClassBatch
from .med import TextModel
from ..data.tokenizer import ENC_ID
from .base import BlipModel


class BlipVE(BlipModel):
    task = "ve"
    fresh_keys = ("cls_head",)
    text_max_length = 35

    def __init__(self, cfg):
        super().__init__(cfg)
        tcfg = self.text_cfg()
        self.text_encoder = TextModel(tcfg)
        h = tcfg.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 3))

    def logits(self, pixel_values, texts, ids=None, mask=None):
        """[n, 3] logits: contradiction, neutral, entailment (of `texts`, or of their tokens `ids`, `mask`)."""
        if ids is None:
            ids, mask = self.tokenize(texts, max_length=self.text_max_length, first_token=ENC_ID)
        h = self.text_encoder(ids, mask, self.visual_encoder(pixel_values))
        return self.cls_head(h[:, 0])

    def losses(self, pixel_values, texts, targets):
        return self.batch_losses(ClassBatch.of(pixel_values, texts, targets, self.text_max_length).to(self.device))

    def batch_losses(self, batch: ClassBatch):
        logits = self.logits(batch.images, None, batch.ids, batch.mask)
        return {"loss_ve": F.cross_entropy(logits.float(), batch.targets)}

    @torch.no_grad()
    def predict(self, pixel_values, texts):
        return self.logits(pixel_values, texts).argmax(-1)
