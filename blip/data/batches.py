"""Typed training batches: what a task's collate makes in the DataLoader workers and its model's losses take.

Everything host-side is done here, on the CPU, before the batch reaches the device: texts are tokenized (the first
token a model needs is set by the model), NegCLIP's hard captions are tokenized with the row each belongs to, and
the LM loss's target positions are listed. So a training step on the device never waits for the host: no
tokenizer on the main process, no `nonzero` to find targets, no Python lists to turn into tensors.

`static=True` pads every text to the model's maximum length and lists every LM position (ignored ones carry -100):
the shapes of a batch then depend only on the batch size, what `torch.compile` wants. Otherwise texts are padded to
the longest of the batch (the original's) and the LM head runs at the target positions only.

    batch = PairBatch.of(images, captions, max_length=30, lm=True)      # in a collate, or the models' string API
    batch = batch.to(device, non_blocking=True)
    losses = model(batch, alpha=0.4)
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from .tokenizer import DEC_ID, ENC_ID, PAD_ID, tokenize


@dataclass
class Batch:
    """Tensors (or None) in named fields; moved and pinned as one."""

    def _map(self, fn) -> "Batch":
        return dataclasses.replace(self, **{f.name: fn(v) for f in dataclasses.fields(self)
                                            if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # the DataLoader's pin_memory thread calls this on custom batch types
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))


def texts(strings, max_length: int, first_token: int | None = None, static: bool = False):
    """(ids, mask) on the CPU: padded to the longest text, or (static) to max_length."""
    with torch.device("cpu"):  # the tokenizer's own tensors: host-side, whatever the default device
        return tokenize(list(strings), max_length=max_length, first_token=first_token,
                        padding="max_length" if static else "longest")


def lm_positions(labels: torch.Tensor, static: bool = False) -> torch.Tensor:
    """Flat indices into [B, L - 1] of the positions whose next token is a target (labels -100 are not): position t
    predicts token t + 1. Static: every position (the ignored ones then weigh nothing in the loss)."""
    targets = labels[:, 1:]
    if static:
        return torch.arange(targets.numel(), device="cpu")
    return (targets.reshape(-1) != -100).nonzero()[:, 0]


def decoder_labels(ids: torch.Tensor, ignore_first: int = 0) -> torch.Tensor:
    """LM labels of decoder ids: padding (and the first `ignore_first` tokens: a prompt) -100."""
    labels = ids.masked_fill(ids == PAD_ID, -100)
    labels[:, :ignore_first] = -100
    return labels


@dataclass
class PairBatch(Batch):
    """Image-text pairs (pretraining, retrieval). ids are the text encoder's ([CLS] first)."""
    images: torch.Tensor                      # [B, 3, H, W]
    ids: torch.Tensor                         # [B, L]
    mask: torch.Tensor                        # [B, L]
    idx: torch.Tensor | None = None           # [B] image index of each caption (retrieval: positives share it)
    neg_ids: torch.Tensor | None = None       # [M, L'] NegCLIP hard captions, all rows' together
    neg_mask: torch.Tensor | None = None
    neg_owner: torch.Tensor | None = None     # [M] the row whose caption each was made from
    neg_rows: torch.Tensor | None = None      # [R] the rows that have at least one
    neg_weights: torch.Tensor | None = None   # [R, M] uniform over each such row's own hard captions
    lm_positions: torch.Tensor | None = None  # pretraining's decoder: see lm_positions()

    @classmethod
    def of(cls, images, captions, max_length: int, *, idx=None, negatives=None, lm: bool = False,
           static: bool = False) -> "PairBatch":
        """negatives: one list of hard captions per caption (None: the option is off)."""
        ids, mask = texts(captions, max_length, static=static)
        out = cls(images, ids, mask, idx=None if idx is None else torch.as_tensor(idx, device="cpu"))
        flat = [t for row in negatives or [] for t in row]
        if flat:
            out.neg_ids, out.neg_mask = texts(flat, max_length, static=static)
            out.neg_owner = torch.tensor([i for i, row in enumerate(negatives) for _ in row], device="cpu")
            rows = [i for i, row in enumerate(negatives) if row]
            out.neg_rows = torch.tensor(rows, device="cpu")
            out.neg_weights = (out.neg_owner[None, :] == out.neg_rows[:, None]).float()
        if lm:
            out.lm_positions = lm_positions(decoder_labels(ids), static)
        return out


@dataclass
class CaptionBatch(Batch):
    """Captioning: the decoder reads [DEC] + prompt + caption; the prompt's tokens are not targets."""
    images: torch.Tensor
    ids: torch.Tensor          # [B, L], [DEC] first
    mask: torch.Tensor
    labels: torch.Tensor       # ids with the prompt and padding at -100
    lm_positions: torch.Tensor

    @classmethod
    def of(cls, images, captions, prompt: str, max_length: int, static: bool = False) -> "CaptionBatch":
        ids, mask = texts([prompt + c for c in captions], max_length, first_token=DEC_ID, static=static)
        prompt_len = texts([prompt], max_length, first_token=DEC_ID)[0].shape[1] - 1  # [DEC] + prompt, no [SEP]
        labels = decoder_labels(ids, prompt_len)
        return cls(images, ids, mask, labels, lm_positions(labels, static))


@dataclass
class VQABatch(Batch):
    """Questions with their answers: answer a belongs to question a_question[a] and weighs weights[a]."""
    images: torch.Tensor
    q_ids: torch.Tensor        # [B, Lq], [ENC] first
    q_mask: torch.Tensor
    a_ids: torch.Tensor        # [A, La], [DEC] first
    a_mask: torch.Tensor
    a_labels: torch.Tensor
    a_question: torch.Tensor   # [A]
    weights: torch.Tensor      # [A]
    lm_positions: torch.Tensor

    @classmethod
    def of(cls, images, questions, answers, n, weights, *, question_max_length: int, answer_max_length: int,
           static: bool = False) -> "VQABatch":
        """answers flattened; n[b] of them belong to question b."""
        q_ids, q_mask = texts(questions, question_max_length, first_token=ENC_ID, static=static)
        a_ids, a_mask = texts(answers, answer_max_length, first_token=DEC_ID, static=static)
        labels = decoder_labels(a_ids)
        owner = torch.repeat_interleave(torch.as_tensor(list(n), device="cpu"))
        return cls(images, q_ids, q_mask, a_ids, a_mask, labels, owner,
                   torch.as_tensor(weights, dtype=torch.float32, device="cpu"), lm_positions(labels, static))


@dataclass
class ClassBatch(Batch):
    """A text ([ENC] first; X-FM's: [CLS]) about one image (VE) or two (NLVR2: images1), and a class index."""
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    images1: torch.Tensor | None = None

    @classmethod
    def of(cls, images, sentences, targets, max_length: int, *, images1=None, static: bool = False,
           first_token: int | None = ENC_ID) -> "ClassBatch":
        ids, mask = texts(sentences, max_length, first_token=first_token, static=static)
        return cls(images, ids, mask, torch.as_tensor(targets, device="cpu"), images1)


def soft_targets(labels, weights, index: dict[str, int]) -> torch.Tensor:
    """[B, len(index)] soft targets: row b holds weights[b][j] at index[labels[b][j]] (summed if one repeats); a
    label outside `index` is dropped (VQA: an answer outside the classifier's vocabulary)."""
    out = torch.zeros(len(labels), len(index), device="cpu")
    for row, (names, ws) in enumerate(zip(labels, weights)):
        for name, w in zip(names, ws):
            if name in index:
                out[row, index[name]] += float(w)
    return out


@dataclass
class SoftTargetBatch(Batch):
    """A text ([CLS] first) about one image and soft targets over a fixed vocabulary (X-FM's VQA classifier: each
    annotated answer's weight at its index)."""
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor      # [B, n_labels]

    @classmethod
    def of(cls, images, questions, answers, weights, index: dict[str, int], max_length: int, *,
           static: bool = False) -> "SoftTargetBatch":
        """answers[b], weights[b]: question b's annotated answers and their weights."""
        ids, mask = texts(questions, max_length, static=static)
        return cls(images, ids, mask, soft_targets(answers, weights, index))


@dataclass
class MaskedTextBatch(Batch):
    """Text for masked language modelling (X-FM's text stream): ids ([CLS] first) and their masked copy."""
    ids: torch.Tensor
    mask: torch.Tensor
    mlm_ids: torch.Tensor      # whole words replaced ([MASK] 80%, a random token 10%, kept 10%)
    mlm_labels: torch.Tensor   # the original ids where taken, -100 elsewhere
    mlm_positions: torch.Tensor | None = None  # flat indices of the taken tokens (no host sync in the step)


@dataclass
class MaskedImageBatch(Batch):
    """Images for masked image modelling (X-FM's image stream)."""
    images: torch.Tensor
    patch_mask: torch.Tensor   # [B, N] True = a masked patch


@dataclass
class MaskedPairBatch(Batch):
    """Image-text pairs with both masks (X-FM's pair stream: ITC, ITM, image-conditioned MLM, MIM)."""
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    mlm_ids: torch.Tensor
    mlm_labels: torch.Tensor
    patch_mask: torch.Tensor
    mlm_positions: torch.Tensor | None = None


# -- collates: samples -> a typed batch, in the DataLoader's workers ------------------------------------------------
class PairCollate:
    """(image, caption[, image index]) samples -> PairBatch. With a NegativeSampler, each caption's hard captions are
    drawn from a stream seeded by its sample's seed (blip.training.engine gives every sample one), so a rank, a worker or a
    resumed run draws what any other would."""
    seeded = True

    def __init__(self, max_length: int, *, negatives=None, lm: bool = False, static: bool = False):
        self.max_length, self.negatives, self.lm, self.static = max_length, negatives, lm, static

    def __call__(self, samples, seeds=None):
        images = torch.stack([s[0] for s in samples])
        captions = [s[1] for s in samples]
        idx = [s[2] for s in samples] if len(samples[0]) > 2 else None
        negatives = None
        if self.negatives is not None:
            seeds = seeds if seeds is not None else range(len(samples))
            negatives = [self.negatives(c, random.Random(f"negatives:{s}")) for c, s in zip(captions, seeds)]
        return PairBatch.of(images, captions, self.max_length, idx=idx, negatives=negatives, lm=self.lm,
                            static=self.static)


class CaptionCollate:
    """(image, caption, ...) samples -> CaptionBatch."""

    def __init__(self, prompt: str, max_length: int, static: bool = False):
        self.prompt, self.max_length, self.static = prompt, max_length, static

    def __call__(self, samples):
        return CaptionBatch.of(torch.stack([s[0] for s in samples]), [s[1] for s in samples], self.prompt,
                               self.max_length, self.static)


class VQACollate:
    """(image, question, answers, weights) samples -> VQABatch."""

    def __init__(self, question_max_length: int, answer_max_length: int, static: bool = False):
        self.q_len, self.a_len, self.static = question_max_length, answer_max_length, static

    def __call__(self, samples):
        answers = [a for s in samples for a in s[2]]
        weights = [w for s in samples for w in s[3]]
        return VQABatch.of(torch.stack([s[0] for s in samples]), [s[1] for s in samples], answers,
                           [len(s[2]) for s in samples], weights, question_max_length=self.q_len,
                           answer_max_length=self.a_len, static=self.static)


class ClassCollate:
    """(image, sentence, label) (VE) or (image0, image1, sentence, label) (NLVR2) samples -> ClassBatch; the text's
    first token [ENC] (BLIP's), or `first_token` (X-FM's: None, the tokenizer's [CLS])."""

    def __init__(self, max_length: int, static: bool = False, first_token: int | None = ENC_ID):
        self.max_length, self.static, self.first_token = max_length, static, first_token

    def __call__(self, samples):
        pair = len(samples[0]) == 4
        images = torch.stack([s[0] for s in samples])
        images1 = torch.stack([s[1] for s in samples]) if pair else None
        return ClassBatch.of(images, [s[-2] for s in samples], [s[-1] for s in samples], self.max_length,
                             images1=images1, static=self.static, first_token=self.first_token)


class SoftTargetCollate:
    """(image, question, answers, weights) samples (VQADataset's) -> SoftTargetBatch over the vocabulary `labels`."""

    def __init__(self, max_length: int, labels, static: bool = False):
        self.max_length, self.static = max_length, static
        self.index = {name: i for i, name in enumerate(labels)}

    def __call__(self, samples):
        return SoftTargetBatch.of(torch.stack([s[0] for s in samples]), [s[1] for s in samples],
                                  [s[2] for s in samples], [s[3] for s in samples], self.index, self.max_length,
                                  static=self.static)


def sample_one(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row, with probability proportional to the row's weights: torch.multinomial(weights, 1)[:, 0],
    draw for draw (the same exponential race torch runs for one sample), without its validity checks, which read the
    weights back to the host (a device sync per call on a GPU)."""
    race = torch.empty_like(weights, dtype=torch.float32).exponential_(1, generator=generator)
    return (weights.float() / race).argmax(-1)
