"""X-FM (Zhang et al. 2023): a language encoder, a vision encoder and a separate fusion encoder, and their losses.

- language encoder: the MED stack without cross-attention (`text_encoder`), MLM head tied to its word embeddings;
- vision encoder: BLIP's timm ViT (`visual_encoder`) + a learned mask token that replaces masked patch embeddings;
- fusion encoder: MED layers (self-attention -> cross-attention to every image token -> FFN) over the language
  encoder's output, no embeddings of its own (`fusion_encoder`), its own MLM head and the ITM head.

Objectives (the original's names): text-only `loss_mlm` on the language encoder; for pairs `loss_itc` (language
[CLS] vs vision [CLS], no queues), `loss_itm` (hard negatives), image-conditioned `loss_mlm` on the fusion encoder and
`loss_mim` (regress the vision encoder's own detached output on the unmasked image); image-only data `loss_mim`.
Stop-gradient: the language encoder's output is detached before the fusion encoder, so it learns from text MLM and
ITC only; image tokens are not detached. The masks (whole-word MLM, BEiT block MIM) are made on the host, by a
collate: `mlm_mask`, `block_mask`.

Fine-tuned for retrieval (`retrieval_losses`: ITC + ITM, every encoder learning), X-FM runs the retrieval protocol of
BLIP's models (blip.models.retrieval.RetrievalProtocol: ITC top-k, ITM re-rank on the fusion encoder).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import draw_hard_negatives, itm_pairs
from .retrieval import RetrievalProtocol
from .med import Encoder, LMPrediction, TextConfig, TextModel, additive_mask, init_bert_weights
from ..data.tokenizer import CLS_ID, DEC_ID, ENC_ID, MASK_ID, PAD_ID, SEP_ID, VOCAB_SIZE, get_tokenizer, tokenize
from .vit import VisionConfig, build_vit

MIM_RATIO = 75 / 196  # X-FM masks 75 of the 196 patches at 224 / 16


@dataclass
class XFMConfig:
    vocab_size: int = VOCAB_SIZE
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    fusion_layers: int = 12  # the fusion encoder has the language encoder's width and heads
    intermediate_size: int | None = None  # text and fusion FFN width; None: 4 × text_width
    max_position_embeddings: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    embed_dim: int = 256  # ITC projection
    temp: float = 0.07
    dropout: float = 0.1  # text / fusion hidden and attention dropout (BERT's)
    drop_path_rate: float = 0.0
    answers: list[str] | None = None  # VQA fine-tuning (xfm_vqa): the classifier's answer vocabulary, in its order

    @classmethod
    def from_preset(cls, name: str = "base", **overrides) -> XFMConfig:
        return cls.from_overrides(preset=name, **overrides)

    @classmethod
    def from_overrides(cls, stored: dict | None = None, *, preset: str | None = None, **options) -> XFMConfig:
        """As ModelConfig's (blip.load_model calls it): the defaults, then the `preset`, then a checkpoint's `stored`
        description, then the user's own keys."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown X-FM preset {preset!r}; choose from {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown X-FM option(s) {unknown}; known: {sorted(known)}")
        return cls(**{**PRESETS.get(preset, {}), **(stored or {}), **options})

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, **overrides) -> TextConfig:
        d = dict(vocab_size=self.vocab_size, hidden_size=self.text_width, num_hidden_layers=self.text_layers,
                 num_attention_heads=self.text_heads, intermediate_size=self.intermediate_size or 4 * self.text_width,
                 hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
                 max_position_embeddings=self.max_position_embeddings, add_cross_attention=False,
                 encoder_width=self.vision_width)
        return TextConfig(**{**d, **overrides})

    def fusion(self) -> TextConfig:
        return self.text(num_hidden_layers=self.fusion_layers, add_cross_attention=True)

    def vision(self) -> VisionConfig:
        return VisionConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
                            depth=self.vision_layers, heads=self.vision_heads, drop_path_rate=self.drop_path_rate)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_masked_patches(self) -> int:
        """MIM's masked patches per image: 75 of 196 at 224 / 16, the same ratio at other sizes."""
        return round(MIM_RATIO * self.grid ** 2)


# Named sizes, as data. `base`: the paper's 12 / 12 / 12 layers of width 768 at 224 (its vision encoder is BEiT-v2,
# drop path 0.1); `tiny`: the unit tests'.
PRESETS: dict[str, dict] = {
    "base": dict(drop_path_rate=0.1),
    "tiny": dict(text_width=32, text_layers=2, text_heads=2, fusion_layers=2, intermediate_size=64,
                 max_position_embeddings=64, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                 vision_heads=2, embed_dim=16, dropout=0.0),
}


# -- masks (host side: a collate makes them) ------------------------------------------------------------------------

@functools.cache
def _continuation_table() -> torch.Tensor:
    """True for each `##` token of the vocabulary (a word's continuation)."""
    tok = get_tokenizer()
    return torch.tensor([t.startswith("##") for t in tok.convert_ids_to_tokens(list(range(len(tok))))], device="cpu")


def wordpiece_word_ids(ids: torch.Tensor) -> torch.Tensor:
    """Word index of each WordPiece token [B, L]: a word is a token and the `##` tokens after it; special tokens and
    padding are -1 (never masked)."""
    table = _continuation_table().to(ids.device)
    special = torch.isin(ids, torch.tensor([PAD_ID, CLS_ID, SEP_ID, MASK_ID, DEC_ID, ENC_ID], device=ids.device))
    starts = ~table[ids] & ~special
    return (starts.long().cumsum(1) - 1).masked_fill(special, -1)


def mlm_mask(ids: torch.Tensor, word_ids: torch.Tensor, *, prob: float = 0.15, vocab_size: int = VOCAB_SIZE,
             generator: torch.Generator | None = None):
    """Whole-word masking as BERT's: per row, words in random order are taken while their tokens fit in
    round(prob × maskable tokens); each taken token becomes [MASK] (80%), a random token (10%) or stays (10%).
    CPU tensors (a collate's). Returns (masked ids, labels: the original ids where taken, -100 elsewhere)."""
    taken = torch.zeros_like(ids, dtype=torch.bool)
    for r in range(ids.shape[0]):
        row = word_ids[r]
        n_words = int(row.max()) + 1
        if n_words <= 0:
            continue
        sizes = torch.bincount(row[row >= 0], minlength=n_words).tolist()
        budget, covered, chosen = max(1, round(prob * sum(sizes))), 0, []
        order = torch.randperm(n_words, generator=generator, device="cpu").tolist()
        for w in order:
            if covered + sizes[w] <= budget:
                chosen.append(w)
                covered += sizes[w]
        # a row whose words are all longer than its budget still predicts one word (an empty batch's loss is NaN)
        taken[r] = torch.isin(row, torch.tensor(chosen or order[:1], device=row.device))
    u = torch.rand(ids.shape, generator=generator, device="cpu")
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device="cpu")
    masked = torch.where(taken & (u < 0.8), MASK_ID, ids)
    masked = torch.where(taken & (u >= 0.8) & (u < 0.9), random_ids, masked)
    return masked, ids.masked_fill(~taken, -100)


def _uniform(lo: float, hi: float, generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, device="cpu"))


def block_mask(grid_h: int, grid_w: int, num_masked: int, generator: torch.Generator | None = None, *,
               min_block: int = 16, min_aspect: float = 0.3) -> torch.Tensor:
    """BEiT's block masking (X-FM: 75 of 14 × 14, blocks of at least 16 patches): rectangles of random area and
    aspect ratio are added while they fit, then random single patches make the count exactly `num_masked`
    (BEiT-v2's rule). Returns a CPU bool [grid_h, grid_w]."""
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool, device="cpu")
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        left, delta = num_masked - count, 0
        for _ in range(10):  # BEiT's attempts per block
            area = _uniform(min_block, left, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < grid_w and h < grid_h:
                top = int(torch.randint(grid_h - h + 1, (), generator=generator, device="cpu"))
                lft = int(torch.randint(grid_w - w + 1, (), generator=generator, device="cpu"))
                new = h * w - int(mask[top:top + h, lft:lft + w].sum())
                if 0 < new <= left:  # never past the count: the block only adds what is left
                    mask[top:top + h, lft:lft + w] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    if count < num_masked:
        free = (~mask).flatten().nonzero()[:, 0]
        mask.view(-1)[free[torch.randperm(len(free), generator=generator, device="cpu")[:num_masked - count]]] = True
    return mask


# -- losses ---------------------------------------------------------------------------------------------------------

def mlm_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into [B * L] of the tokens MLM predicts (labels != -100): found on the host by a collate, so the
    step indexes with them and never reads the labels back (a boolean index would)."""
    return (labels.reshape(-1) != -100).nonzero()[:, 0]


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked tokens (labels -100 elsewhere), mean over them; no label smoothing (BERT)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def same_image(idx: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """[n, n] True where rows i and j are pairs of one image (`idx`: each row's image index; None: the diagonal)."""
    if idx is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return idx.view(-1, 1) == idx.view(1, -1)


def itc_loss_xfm(image_feat: torch.Tensor, text_feat: torch.Tensor, temp, idx=None) -> torch.Tensor:
    """Symmetric InfoNCE of normalised features (no queues): row i of each the positive of row i of the other, or,
    given `idx` (retrieval fine-tuning: each caption's image index), of every row of the same image, the target
    spread evenly over them (X-VLM's / X-FM's fine-tuning)."""
    logits = image_feat.float() @ text_feat.float().t() / temp
    positives = same_image(idx, len(logits), logits.device).float()
    targets = positives / positives.sum(1, keepdim=True)
    i2t = -(F.log_softmax(logits, 1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(logits.t(), 1) * targets).sum(1).mean()  # same_image is symmetric: targets.t() = targets
    return (i2t + t2i) / 2


def hard_negative_weights(sim: torch.Tensor, idx=None) -> torch.Tensor:
    """X-FM's negative-sampling weights of a similarity matrix: softmax + 1e-5 per row, the positives 0 (the
    diagonal; given `idx`, every pair of the same image)."""
    w = F.softmax(sim.float(), dim=1) + 1e-5
    return w.masked_fill(same_image(idx, len(w), w.device), 0)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ITM head's two-way cross-entropy (label 1: matched pair, 0: hard negative)."""
    return F.cross_entropy(logits.float(), labels)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the masked patches + MSE of [CLS]. pred, target [B, 1 + N, D]; mask [B, N] (True = masked).
    The target is detached here: the encoder's own unmasked output is a target, never a path for gradients."""
    err = (pred.float() - target.detach().float()) ** 2
    m = mask.to(err.dtype)
    patches = (err[:, 1:].mean(-1) * m).sum() / m.sum().clamp(min=1)  # no boolean index: no host sync
    return patches + err[:, 0].mean()


# -- the model ------------------------------------------------------------------------------------------------------

class XFM(RetrievalProtocol, nn.Module):
    task = "xfm"                # blip.load_model's name; saved with the weights (blip.models.checkpoint)
    config_class = XFMConfig    # what load_model builds its description with (BLIP's models: ModelConfig)
    fresh_keys: tuple[str, ...] = ()
    starts_every_task = True    # a pretraining checkpoint starts every X-FM task (blip.models.xfm_heads): no warning
    text_max_length = 35        # tokens of a training text, as BLIP's pretraining
    itm_first_token = CLS_ID    # the fusion encoder reads the language encoder's states, [CLS] first

    def __init__(self, cfg: XFMConfig):
        super().__init__()
        self.cfg = cfg
        tcfg, fcfg = cfg.text(), cfg.fusion()
        self.text_encoder = TextModel(tcfg)
        self.visual_encoder = build_vit(cfg.vision())
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.fusion_encoder = Encoder(fcfg)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        w = cfg.text_width
        self.itm_head = nn.Sequential(nn.Linear(w, 2 * w), nn.LayerNorm(2 * w), nn.GELU(), nn.Linear(2 * w, 2))
        self.mlm_head = LMPrediction(tcfg)
        # The fusion encoder's MLM head has its own decoder: tied to the language encoder's word embeddings, it would
        # carry image-conditioned MLM's gradient into the language encoder past the stop-gradient.
        self.fusion_mlm_head = LMPrediction(fcfg)
        for m in (self.fusion_encoder, self.text_proj, self.vision_proj, self.itm_head, self.mlm_head,
                  self.fusion_mlm_head):
            m.apply(init_bert_weights)
        self.mlm_head.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # -- encoders --------------------------------------------------------------------------------------------------
    def encode_text(self, ids, mask):
        """The language encoder's hidden states [B, L, text_width]."""
        return self.text_encoder(ids, mask)

    def encode_image(self, images, patch_mask=None):
        """The vision encoder's tokens [B, 1 + N, vision_width]; `patch_mask` [B, N] (True = masked): those patch
        embeddings are replaced by the mask token before the position embeddings are added (BEiT)."""
        vit = self.visual_encoder
        if patch_mask is None:
            return vit(images)
        x = vit.patch_embed(images)
        x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def fuse(self, text_hidden, text_mask, image_embeds):
        """The fusion encoder over the language encoder's states, cross-attending to every image token."""
        self_mask = additive_mask(text_mask, text_hidden.shape[1], text_hidden.device)
        x = text_hidden
        for layer in self.fusion_encoder.layer:
            x, _ = layer(x, self_mask, image_embeds)
        return x

    # -- the retrieval protocol's (RetrievalProtocol) --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.temp.device

    def image_features(self, pixel_values):
        """(vision tokens, ITC feature)."""
        image_embeds = self.encode_image(pixel_values)
        return image_embeds, self.image_feat(image_embeds)

    def text_features(self, texts, max_length=None):
        """(ids, mask, ITC feature) of the language encoder."""
        ids, mask = tokenize(texts, max_length=max_length or self.text_max_length, device=self.device)
        return ids, mask, self.text_feat(self.encode_text(ids, mask))

    def itm_logits(self, image_embeds, ids, mask, image_index=None):
        """The ITM head over paired rows: ids[i] with image_embeds[i], or with image_embeds[image_index[i]]."""
        if image_index is not None:
            image_embeds = image_embeds[image_index]
        return self.itm_head(self.fuse(self.encode_text(ids, mask), mask, image_embeds)[:, 0])

    def image_feat(self, image_embeds):
        """The normalised projected [CLS] feature of each image, ITC's."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, text_hidden):
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def features(self, image_embeds, text_hidden):
        """ITC's features (image, text)."""
        return self.image_feat(image_embeds), self.text_feat(text_hidden)

    # -- objectives, one scalar each ------------------------------------------------------------------------------
    def _mlm(self, hidden, labels, head, positions=None):
        """The vocabulary projection only where a token is predicted: at `positions` (mlm_positions, from the
        collate), else found here (a host sync on a GPU)."""
        if positions is None:
            positions = mlm_positions(labels)
        return mlm_loss(head(hidden.reshape(-1, hidden.shape[-1])[positions]), labels.reshape(-1)[positions])

    def loss_text_mlm(self, masked_ids, mask, labels, positions=None):
        """Text-only MLM on the language encoder."""
        return self._mlm(self.encode_text(masked_ids, mask), labels, self.mlm_head, positions)

    def loss_itc(self, image_embeds, text_hidden, idx=None):
        """ITC; the temperature parameter is clamped to [0.001, 0.5] in place first (the original, each step)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        return itc_loss_xfm(*self.features(image_embeds, text_hidden), self.temp, idx)

    def loss_itm(self, image_embeds, text_hidden, mask, *, idx=None, detach_text=True, generator=None):
        """ITM over b pairs, b (text, hard negative image), b (hard negative text, image); negatives drawn by the ITC
        similarity softmax (never a pair of the same image, `idx`). `detach_text`: the language encoder's states are
        detached (pretraining's stop-gradient); the image tokens never are."""
        with torch.no_grad():
            image_feat, text_feat = self.features(image_embeds, text_hidden)
            # clamped out of place: changing the parameter after ITC has used it would break ITC's backward
            sim = image_feat @ text_feat.t() / self.temp.clamp(0.001, 0.5)
            negatives = draw_hard_negatives(hard_negative_weights(sim.t(), idx), hard_negative_weights(sim, idx),
                                            generator)
        hidden = text_hidden.detach() if detach_text else text_hidden
        # itm_pairs gathers rows of any tensor: here the text rows are hidden states, not ids
        images, hidden, mask, labels = itm_pairs(image_embeds, hidden, mask, neg_image_for_text=negatives[0],
                                                 neg_text_for_image=negatives[1], neg_image_embeds=image_embeds,
                                                 neg_ids=hidden, neg_mask=mask)
        return itm_loss(self.itm_head(self.fuse(hidden, mask, images)[:, 0]), labels)

    def loss_fused_mlm(self, masked_ids, mask, labels, image_embeds, positions=None):
        """Image-conditioned MLM on the fusion encoder, over the language encoder's detached states."""
        hidden = self.encode_text(masked_ids, mask).detach()
        return self._mlm(self.fuse(hidden, mask, image_embeds), labels, self.fusion_mlm_head, positions)

    def loss_mim(self, images, patch_mask, *, target=None):
        """MIM: the encoder on the masked image regresses its own detached output on the whole image (`target`, or
        computed here without gradient). As the original, the prediction is the masked image's tokens as they are."""
        if target is None:
            with torch.no_grad():
                target = self.encode_image(images)
        return mim_loss(self.encode_image(images, patch_mask), target, patch_mask)

    def pair_losses(self, images, ids, mask, *, mlm_ids, mlm_labels, patch_mask, generator=None,
                    mlm_positions=None) -> dict:
        """Every pair objective from one pass of each encoder: loss_itc, loss_itm, loss_mlm (image-conditioned),
        loss_mim (the unmasked pass's tokens, detached, are the target)."""
        image_embeds = self.encode_image(images)
        text_hidden = self.encode_text(ids, mask)
        return {"loss_itc": self.loss_itc(image_embeds, text_hidden),
                "loss_itm": self.loss_itm(image_embeds, text_hidden, mask, generator=generator),
                "loss_mlm": self.loss_fused_mlm(mlm_ids, mask, mlm_labels, image_embeds, mlm_positions),
                "loss_mim": self.loss_mim(images, patch_mask, target=image_embeds)}

    def retrieval_losses(self, images, ids, mask, idx=None, *, generator=None) -> dict:
        """Retrieval fine-tuning's objectives: ITC (the captions of one image, `idx`, all positives) and ITM on hard
        negatives, every encoder learning (the stop-gradient is pretraining's)."""
        image_embeds, text_hidden = self.encode_image(images), self.encode_text(ids, mask)
        return {"loss_itc": self.loss_itc(image_embeds, text_hidden, idx),
                "loss_itm": self.loss_itm(image_embeds, text_hidden, mask, idx=idx, detach_text=False,
                                          generator=generator)}

    def forward(self, pairs=None, text=None, images=None, *, retrieval=None, generator=None) -> dict:
        """The losses of one micro-step over the streams it has (blip.data.batches): `pairs` (MaskedPairBatch) ->
        loss_itc, loss_itm, loss_mlm, loss_mim; `text` (MaskedTextBatch) -> loss_text_mlm; `images`
        (MaskedImageBatch) -> loss_image_mim; `retrieval` (PairBatch, fine-tuning) -> loss_itc, loss_itm."""
        if retrieval is not None:
            return self.retrieval_losses(retrieval.images, retrieval.ids, retrieval.mask, retrieval.idx,
                                         generator=generator)
        losses = {}
        if pairs is not None:
            losses.update(self.pair_losses(pairs.images, pairs.ids, pairs.mask, mlm_ids=pairs.mlm_ids,
                                           mlm_labels=pairs.mlm_labels, patch_mask=pairs.patch_mask,
                                           generator=generator, mlm_positions=pairs.mlm_positions))
        if text is not None:
            losses["loss_text_mlm"] = self.loss_text_mlm(text.mlm_ids, text.mask, text.mlm_labels, text.mlm_positions)
        if images is not None:
            losses["loss_image_mim"] = self.loss_mim(images.images, images.patch_mask)
        return losses
