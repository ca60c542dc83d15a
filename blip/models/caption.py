"""Captioning (`caption`): ViT + image-grounded text decoder, the `a picture of ` prompt."""
from __future__ import annotations

import torch

from ..data.batches import CaptionBatch
from .generation import Decoding, decoding_of, generate_ids
from .med import TextDecoder
from ..data.tokenizer import DEC_ID, decode
from .base import BlipModel


class BlipCaption(BlipModel):
    task = "caption"
    transformers_class = "BlipForConditionalGeneration"
    max_text_length = 40
    decoding = Decoding(num_beams=3, max_length=20, min_length=5)  # the original's captioning defaults

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text_decoder = TextDecoder(self.text_cfg())

    def prompt_ids(self, prompt: str, n: int):
        """[DEC] + the prompt's tokens (no [SEP]), for n inputs."""
        ids, _ = self.tokenize([prompt] * n, first_token=DEC_ID)
        return ids[:, :-1]

    def losses(self, pixel_values, captions, prompt=None):
        """loss_lm on `prompt + caption` (the prompt is added here; its tokens are masked from the loss)."""
        prompt = self.cfg.prompt if prompt is None else prompt
        return self.batch_losses(CaptionBatch.of(pixel_values, captions, prompt, self.max_text_length).to(self.device))

    def batch_losses(self, batch: CaptionBatch):
        image_embeds = self.visual_encoder(batch.images)
        return {"loss_lm": self.text_decoder.loss(batch.ids, batch.labels, batch.mask, image_embeds,
                                                  positions=batch.lm_positions)}

    @torch.no_grad()
    def generate(self, pixel_values, how: Decoding | None = None, *, prompt=None, generator=None, return_ids=False,
                 num_captions=1, **options):
        """Captions (the prompt cut off their front, as the original). `how`: one Decoding value (default
        `self.decoding`: beam search, 3 beams, 5 to 20 tokens), or its fields as keywords over it (num_beams=...,
        sample=True for nucleus sampling: the original used repetition_penalty 1.1 there; max_length counts the
        prompt; static: None = captured static-shape decoding on CUDA). `num_captions` per image (sampling): image
        i's are items i*n ... i*n + n-1 of the list."""
        prompt = self.cfg.prompt if prompt is None else prompt
        how = decoding_of(self.decoding, how, **options)
        image_embeds = self.visual_encoder(pixel_values)
        if num_captions > 1 and not (how.sample or how.num_beams == 1):  # beam search: each row its own image copy
            image_embeds = image_embeds.repeat_interleave(num_captions, dim=0)
        n_out = len(pixel_values) * num_captions  # sampling: each image's K/V projected once, read by its n rows
        ids = generate_ids(self.text_decoder, image_embeds, self.prompt_ids(prompt, n_out), how, generator=generator)
        if return_ids:
            return ids
        return [decode(seq)[len(prompt):] for seq in ids]
