"""NLVR2 (`nlvr`): one text, two images; the text stack's cross-attention is twinned per image."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import ClassBatch
from .med import TextModel
from ..data.tokenizer import ENC_ID
from .base import BlipModel


class BlipNLVR(BlipModel):
    task = "nlvr"
    vision_drop_path = 0.1
    fresh_keys = ("merge_layer", "cls_head")
    text_max_length = None  # sentences are not truncated (the original); a static-shape (compiled) run pads them to
    text_static_length = 64  # this many tokens

    def __init__(self, cfg):
        super().__init__(cfg)
        tcfg = self.text_cfg(twin_cross_attention=True)
        self.text_encoder = TextModel(tcfg)
        h = tcfg.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def logits(self, pixel_values_0, pixel_values_1, texts):
        """[n, 2] logits (1 = True). Both images go through the ViT in one batch, as the original."""
        ids, mask = self.tokenize(texts, first_token=ENC_ID)
        return self.pair_logits(pixel_values_0, pixel_values_1, ids, mask)

    def pair_logits(self, pixel_values_0, pixel_values_1, ids, mask):
        image_embeds = self.visual_encoder(torch.cat([pixel_values_0, pixel_values_1]))
        e0, e1 = image_embeds.split(pixel_values_0.shape[0])
        h = self.text_encoder(ids, mask, [e0, e1], [None, None])
        return self.cls_head(h[:, 0])

    def losses(self, pixel_values_0, pixel_values_1, texts, targets):
        batch = ClassBatch.of(pixel_values_0, texts, targets, self.text_max_length, images1=pixel_values_1)
        return self.batch_losses(batch.to(self.device))

    def batch_losses(self, batch: ClassBatch):
        logits = self.pair_logits(batch.images, batch.images1, batch.ids, batch.mask)
        return {"loss_nlvr": F.cross_entropy(logits.float(), batch.targets)}

    @torch.no_grad()
    def predict(self, pixel_values_0, pixel_values_1, texts):
        return self.logits(pixel_values_0, pixel_values_1, texts).argmax(-1)
