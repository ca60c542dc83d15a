"""X-FM fine-tuned with a head on the fusion encoder per task (every encoder learning: the stop-gradient is
pretraining's). Both start from an X-FM pretraining checkpoint: their heads are fresh, everything else loads.

- VQA (`xfm_vqa`, XFMVQA): the fusion encoder over (question, image), its [CLS] state -> an MLP -> logits over a fixed
  answer vocabulary (`XFMConfig.answers`, saved with the weights); binary cross-entropy with soft targets × the
  vocabulary size (the common VQA classifier loss: ViLT's, VinVL's); answers are the classifier's argmax.
- NLVR2 (`xfm_nlvr`, XFMNLVR): the fusion encoder over (sentence, image0) and (sentence, image1), the two [CLS] states
  concatenated -> an MLP -> 2 logits (X-VLM's head); cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tokenizer import tokenize
from .med import init_bert_weights
from .xfm import XFM


def mlp_head(width: int, hidden: int, out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear (XFM.itm_head's shape), BERT-initialised."""
    head = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))
    head.apply(init_bert_weights)
    return head


def vqa_classifier_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each answer's logit against its soft target, mean over the batch and the vocabulary,
    × the vocabulary size (so: summed over answers, mean over questions), as ViLT / VinVL."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def nlvr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy (label 1: the sentence is true of the pair)."""
    return F.cross_entropy(logits.float(), labels)


class XFMVQA(XFM):
    task = "xfm_vqa"
    starts_every_task = False  # a fine-tuned model: loaded as another task, load_model warns
    fresh_keys = ("vqa_head",)

    def __init__(self, cfg):
        if not cfg.answers:
            raise ValueError("an X-FM VQA model needs its answer vocabulary: XFMConfig.answers (the xfm_vqa task "
                             "fills it from answer_list.json; blip.load_model('xfm_vqa', ..., answers=[...]))")
        if len(set(cfg.answers)) != len(cfg.answers):
            raise ValueError("XFMConfig.answers: an answer appears more than once")
        super().__init__(cfg)
        w = cfg.text_width
        self.vqa_head = mlp_head(w, 2 * w, len(cfg.answers))
        self.answer_index = {a: i for i, a in enumerate(cfg.answers)}

    def vqa_logits(self, images, ids, mask):
        """[B, n_answers] over (question ids, image) pairs."""
        return self.vqa_head(self.fuse(self.encode_text(ids, mask), mask, self.encode_image(images))[:, 0])

    def vqa_losses(self, images, ids, mask, targets) -> dict:
        return {"loss_vqa": vqa_classifier_loss(self.vqa_logits(images, ids, mask), targets)}

    def forward(self, *args, vqa=None, **kwargs) -> dict:
        """`vqa` (blip.data.batches.SoftTargetBatch) -> loss_vqa; anything else: XFM's streams."""
        if vqa is not None:
            return self.vqa_losses(vqa.images, vqa.ids, vqa.mask, vqa.targets)
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def answer(self, pixel_values, questions, *, method="rank", answer_list=None, k=None) -> list[str]:
        """The classifier's best answer to each question (blip.evaluation.loops.evaluate_vqa's call). Every answer
        of the vocabulary is scored, so `k` is not used; `answer_list`: only those of its answers that the vocabulary
        has may be answered (None: the whole vocabulary)."""
        if method != "rank":
            raise ValueError(f"an X-FM VQA model answers by ranking its answer vocabulary with its classifier "
                             f"(method 'rank'); it has no answer decoder for method {method!r}")
        ids, mask = tokenize(questions, max_length=self.text_max_length, device=self.device)
        logits = self.vqa_logits(pixel_values, ids, mask).float()
        if answer_list is not None:
            allowed = [self.answer_index[a] for a in answer_list if a in self.answer_index]
            if not allowed:
                raise ValueError("answer_list: none of its answers is in the model's answer vocabulary "
                                 f"(XFMConfig.answers: {len(self.cfg.answers)} answers, e.g. {self.cfg.answers[:3]})")
            keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            keep[allowed] = True
            logits = logits.masked_fill(~keep, -torch.inf)
        return [self.cfg.answers[i] for i in logits.argmax(-1).tolist()]


class XFMNLVR(XFM):
    task = "xfm_nlvr"
    starts_every_task = False
    fresh_keys = ("nlvr_head",)

    def __init__(self, cfg):
        super().__init__(cfg)
        w = cfg.text_width
        self.nlvr_head = mlp_head(2 * w, 2 * w, 2)

    def nlvr_logits(self, images0, images1, ids, mask):
        """[B, 2] (1 = True): both images through the vision encoder in one batch, the sentence through the language
        encoder once, then the fusion encoder over (sentence, image0) and (sentence, image1) in one batch."""
        n = images0.shape[0]
        image_embeds = self.encode_image(torch.cat([images0, images1]))
        hidden = self.encode_text(ids, mask)
        fused = self.fuse(torch.cat([hidden, hidden]), torch.cat([mask, mask]), image_embeds)[:, 0]
        return self.nlvr_head(torch.cat([fused[:n], fused[n:]], dim=1))

    def nlvr_losses(self, images0, images1, ids, mask, targets) -> dict:
        return {"loss_nlvr": nlvr_loss(self.nlvr_logits(images0, images1, ids, mask), targets)}

    def forward(self, *args, nlvr=None, **kwargs) -> dict:
        """`nlvr` (blip.data.batches.ClassBatch with images1, [CLS] first) -> loss_nlvr; anything else: XFM's
        streams."""
        if nlvr is not None:
            return self.nlvr_losses(nlvr.images, nlvr.images1, nlvr.ids, nlvr.mask, nlvr.targets)
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def predict(self, pixel_values_0, pixel_values_1, texts) -> torch.Tensor:
        """The predicted label of each (image pair, sentence): 1 = true (blip.evaluation.loops.evaluate_nlvr's call)."""
        ids, mask = tokenize(texts, max_length=self.text_max_length, device=self.device)
        return self.nlvr_logits(pixel_values_0, pixel_values_1, ids, mask).argmax(-1)
