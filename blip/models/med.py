"""MED: BLIP's BERT-style text stack, written once for its three roles.

- text encoder: bidirectional self-attention only (ITC features);
- multimodal encoder: + cross-attention to image tokens in every layer (ITM, VQA question, NLVR2);
- decoder: causal self-attention + cross-attention + LM head (captioning, VQA answers, pretraining LM).

The role is chosen by arguments (`encoder_hidden_states`, `causal`), never by mode strings. Module and
parameter names are BERT's, i.e. the original checkpoint's (`embeddings.word_embeddings`,
`encoder.layer.N.attention.self.query`, `...crossattention.output.LayerNorm`, `cls.predictions.*`), so both
the original `.pth` files and transformers' BLIP load without renaming. Every attention is one call to
`F.scaled_dot_product_attention` (inside `keep_attention_probs`, for Grad-CAM only, the chosen modules write it out
and keep the probabilities). NLVR2's two-image layers are an option of the same stack.
"""
from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_VALUE = -10000.0  # the original's additive mask value: (1 - mask) * -10000
_KEPT = threading.local()  # keep_attention_probs' opt-in, per thread: a server's other requests keep SDPA


@contextmanager
def keep_attention_probs(*modules: "MultiHeadAttention"):
    """Inside, in this thread only, these attention modules compute softmax(QK^T/sqrt(d) + mask) explicitly and
    keep it (SDPA never materialises the probabilities); yields {module: probabilities [B, heads, Lq, Lk]}, filled
    by the forward passes run inside. Grad-CAM (blip.inference.explain) differentiates a score with respect to them."""
    kept = {m: None for m in modules}
    outer = getattr(_KEPT, "probs", None)
    _KEPT.probs = kept
    try:
        yield kept
    finally:
        _KEPT.probs = outer


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 768  # width of what cross-attention reads
    add_cross_attention: bool = True
    twin_cross_attention: bool = False  # NLVR2: one cross-attention per image
    merge_from_layer: int = 6  # NLVR2: layers from here on concatenate the two branches

    # BERT config keys that carry no information for this stack (accepted so original JSON files load).
    _IGNORED = {"architectures", "model_type", "type_vocab_size", "initializer_range", "hidden_act",
                "position_embedding_type", "use_cache", "transformers_version", "torch_dtype",
                "classifier_dropout", "gradient_checkpointing"}

    @classmethod
    def from_any(cls, src: "TextConfig | dict | str | Path | None", **overrides) -> "TextConfig":
        """From a BERT-style dict or JSON file (as the original med_config.json); unknown keys refused."""
        if isinstance(src, TextConfig):
            d = {f.name: getattr(src, f.name) for f in fields(cls)}
        elif src is None:
            d = {}
        elif isinstance(src, (str, Path)):
            d = json.loads(Path(src).read_text())
        else:
            d = dict(src)
        d.update(overrides)
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"med_config: hidden_act {d['hidden_act']!r} is not supported (BLIP uses 'gelu')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in cls._IGNORED)
        if unknown:
            raise ValueError(f"med_config: unknown key(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def additive_mask(mask: torch.Tensor | None, q_len: int, device: torch.device, causal: bool = False,
                  past_len: int = 0):
    """[B, Lk] 0/1 mask → additive [B, 1, Lq|1, Lk] on `device` (None when nothing is masked)."""
    if mask is None and (not causal or q_len == 1):  # one new token may see every cached one
        return None
    if causal:
        k_len = past_len + q_len if mask is None else mask.shape[1]
        ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        allowed = torch.tril(ones, diagonal=k_len - q_len)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :].bool()
        m = allowed.float()
    else:
        m = mask[:, None, None, :].float()
    return (1.0 - m) * MASK_VALUE


class MultiHeadAttention(nn.Module):
    """BERT's `attention.self`: q/k/v projections + one SDPA call. Self, causal or cross by arguments."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x):  # [B, L, H*d] -> [B, H, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def project_kv(self, context: torch.Tensor):
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(self, x, mask=None, context=None, kv=None, past=None, cache=None):
        """x [B, L, h]; `context` (cross) or precomputed `kv`; `past` = cached self-attention (k, v), grown by
        concatenation; or `cache` = (k, v, pos): preallocated [B, heads, max_length, d] caches that the new
        position's k, v are written into at `pos` (a 0-dim device tensor), attended over whole (mask: the positions
        after `pos` off) — shapes that never change, for a captured decode step.

        Cross-attention K/V may be per image while queries are per beam (B = n_images * group): the
        beams' queries are stacked along the sequence axis so K/V are read once, never copied per beam.
        Returns (output [B, L, h], (k, v) to cache).
        """
        q = self._heads(self.query(x))
        if cache is not None:
            k_cache, v_cache, pos = cache
            k_new, v_new = self.project_kv(x)
            k_cache.index_copy_(2, pos.view(1), k_new.to(k_cache.dtype))
            v_cache.index_copy_(2, pos.view(1), v_new.to(v_cache.dtype))
            kv = (k_cache, v_cache)
        elif kv is None:
            kv = self.project_kv(x if context is None else context)
            if past is not None:
                kv = (torch.cat([past[0], kv[0]], dim=2), torch.cat([past[1], kv[1]], dim=2))
        k, v = kv
        if mask is not None:
            mask = mask.to(q.dtype)
        p = self.dropout_p if self.training else 0.0
        b, group = k.shape[0], q.shape[0] // k.shape[0]
        if group > 1:  # beams of one image share its K/V
            nh, L, d = q.shape[1], q.shape[2], q.shape[3]
            q = q.view(b, group, nh, L, d).transpose(1, 2).reshape(b, nh, group * L, d)
            out = self._attend(q, k, v, mask, p)
            out = out.view(b, nh, group, L, d).transpose(1, 2).reshape(b * group, nh, L, d)
        else:
            out = self._attend(q, k, v, mask, p)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return out, kv

    def _attend(self, q, k, v, mask, p):
        kept = None if torch.compiler.is_compiling() else getattr(_KEPT, "probs", None)
        if kept is None or self not in kept:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        probs = (scores if mask is None else scores + mask).softmax(-1)
        kept[self] = probs
        return F.dropout(probs, p) @ v


class AddNorm(nn.Module):
    """BERT's `*.output`: dense → dropout → residual → LayerNorm."""

    def __init__(self, in_width: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """`attention` / `crossattention`: MultiHeadAttention (`self`) + AddNorm (`output`)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg.hidden_size, cfg)

    def forward(self, x, mask=None, context=None, kv=None, past=None, cache=None):
        h, kv = self.self(x, mask, context=context, kv=kv, past=past, cache=cache)
        return self.output(h, x), kv


class TwinOutput(nn.Module):
    """NLVR2's cross-attention output: one dense per image, averaged or (late layers) merged."""

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        h = cfg.hidden_size
        self.dense0, self.dense1 = nn.Linear(h, h), nn.Linear(h, h)
        self.merge_layer = nn.Linear(2 * h, h) if merge else None
        self.LayerNorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h0, h1, residual):
        h0, h1 = self.dense0(h0), self.dense1(h1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinCrossAttention(nn.Module):
    """NLVR2: the text attends to image 0 (`self0`) and image 1 (`self1`) separately."""

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        self.self0 = MultiHeadAttention(cfg, cfg.encoder_width)
        self.self1 = MultiHeadAttention(cfg, cfg.encoder_width)
        self.output = TwinOutput(cfg, merge)

    def forward(self, x, masks, contexts):
        h0, _ = self.self0(x, masks[0], context=contexts[0])
        h1, _ = self.self1(x, masks[1], context=contexts[1])
        return self.output(h0, h1, x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if cfg.twin_cross_attention:
            self.crossattention = TwinCrossAttention(cfg, merge=index >= cfg.merge_from_layer)
        elif cfg.add_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, self_mask, context=None, context_mask=None, *, cross_kv=None, past=None, cache=None):
        x, kv = self.attention(x, self_mask, past=past, cache=cache)
        if isinstance(context, (list, tuple)):  # NLVR2: two images
            x = self.crossattention(x, context_mask, context)
        elif context is not None or cross_kv is not None:
            x, _ = self.crossattention(x, context_mask, context=context, kv=cross_kv)
        return self.output(self.intermediate(x), x), kv


def init_bert_weights(module):
    """BERT's initialisation (initializer_range 0.02), which the original's text stacks get before any
    checkpoint is loaded: what a model trained from scratch starts from."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Embeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, past_len: int | torch.Tensor = 0):
        """`past_len`: tokens before these, an int or a 0-dim device tensor (a captured decode step's position)."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) + past_len
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False


class TextModel(nn.Module):
    """The BERT stack (`text_encoder`, or `text_decoder.bert`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.apply(init_bert_weights)

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
                causal: bool = False, cross_kv=None, past=None, use_cache: bool = False, cache=None):
        """Returns the last hidden states [B, L, h] (and the self-attention cache when `use_cache`).

        encoder_hidden_states: image tokens [B, N, w], or a pair of them for NLVR2; absent → text only.
        cross_kv: per-layer precomputed cross-attention (k, v), from `cross_kv()`, in place of them.
        cache: (per-layer preallocated (k, v), pos) for one new token per row at position `pos` (a 0-dim device
        tensor): the static-shape decode step (blip.models.generation), causal by construction.
        """
        dev = input_ids.device
        if cache is not None:
            layer_caches, pos = cache
            x = self.embeddings(input_ids, pos)
            keys = torch.arange(layer_caches[0][0].shape[2], device=dev)
            self_mask = ((keys > pos).float() * MASK_VALUE)[None, None, None, :]
            past = [(k, v, pos) for k, v in layer_caches]
        else:
            past_len = 0 if past is None else past[0][0].shape[2]
            x = self.embeddings(input_ids, past_len)
            self_mask = additive_mask(attention_mask, input_ids.shape[1], dev, causal=causal, past_len=past_len)
        if isinstance(encoder_hidden_states, (list, tuple)):
            ctx_mask = [additive_mask(m, 1, dev) for m in encoder_attention_mask]
        else:
            ctx_mask = additive_mask(encoder_attention_mask, 1, dev)
        ckpt = self.encoder.gradient_checkpointing and self.training and torch.is_grad_enabled()
        grown = []
        for i, layer in enumerate(self.encoder.layer):
            step = {"cache" if cache is not None else "past": None if past is None else past[i],
                    "cross_kv": None if cross_kv is None else cross_kv[i]}
            if ckpt:
                x, kv = torch.utils.checkpoint.checkpoint(layer, x, self_mask, encoder_hidden_states, ctx_mask,
                                                          use_reentrant=False, **step)
            else:
                x, kv = layer(x, self_mask, encoder_hidden_states, ctx_mask, **step)
            grown.append(kv)
        return (x, grown) if use_cache else x

    def cross_kv(self, encoder_hidden_states, index=None):
        """Each layer's cross-attention (k, v) of the image tokens, computed once for a whole decode.

        With `index` (row i reads image index[i]): each image's K/V are projected once however many rows
        read it, one layer at a time (when that layer asks), then gathered per row."""
        if index is None:
            return [layer.crossattention.self.project_kv(encoder_hidden_states) for layer in self.encoder.layer]
        return _IndexedCrossKV(self, encoder_hidden_states, index)


class _IndexedCrossKV:
    """Per-layer (k, v) of a few images, read by many rows: projected lazily, so one layer's are alive at a time."""

    def __init__(self, model: TextModel, images: torch.Tensor, index: torch.Tensor):
        self.model, self.images, self.index = model, images, index
        # rows already grouped as [image 0 × g, image 1 × g, ...]: attention reads each image's K/V in place
        counts = torch.bincount(index, minlength=len(images))
        self.grouped = bool((counts == counts[0]).all() and (index[1:] >= index[:-1]).all())

    def __len__(self):
        return len(self.model.encoder.layer)

    def __getitem__(self, i):
        k, v = self.model.encoder.layer[i].crossattention.self.project_kv(self.images)
        return (k, v) if self.grouped else (k[self.index], v[self.index])


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """`cls.predictions`: transform → decoder (weight tied to the word embeddings, bias = `bias`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPrediction(cfg)


class TextDecoder(nn.Module):
    """`text_decoder`: causal TextModel (`bert`) + LM head (`cls`), tied to its word embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.bert = TextModel(cfg)
        self.cls = LMHead(cfg)
        self.cls.predictions.transform.apply(init_bert_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
                cross_kv=None, past=None, use_cache=False):
        out = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True,
                        cross_kv=cross_kv, past=past, use_cache=use_cache)
        if use_cache:
            return self.cls.predictions(out[0]), out[1]
        return self.cls.predictions(out)

    def loss(self, input_ids, labels, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
             reduction: str = "mean", label_smoothing: float = 0.1, positions=None):
        """`lm_loss` of `labels` (the inputs with ignored positions −100), vocabulary logits only at targets."""
        h = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True)
        return lm_loss(h, labels, self.cls.predictions, reduction, label_smoothing, positions)


def lm_loss(hidden, labels, head=None, reduction: str = "mean", label_smoothing: float = 0.1, positions=None):
    """Next-token cross-entropy (labels −100 ignored), label smoothing 0.1 as the original.

    `hidden` [B, L, h] are decoder states and `head` maps them to vocabulary logits; the head runs only at
    `positions` (flat indices into [B, L - 1], blip.data.batches.lm_positions: position t predicts token t + 1), the
    targets a collate listed on the host; without them they are found here (a host sync on a GPU). Positions whose
    label is −100 weigh nothing (a static batch lists them all). The same numbers as full logits for a fraction of
    the vocabulary projection's cost. Without `head`, `hidden` are the logits.
    reduction 'none' gives one loss per sequence: the sum of its token losses.
    """
    targets = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = (targets != -100).nonzero()[:, 0]
    picked = hidden[:, :-1].reshape(-1, hidden.shape[-1])[positions]
    logits = (picked if head is None else head(picked)).float()
    loss = F.cross_entropy(logits, targets[positions], reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.new_zeros(labels.shape[0]).index_add_(0, positions // (labels.shape[1] - 1), loss)
    return loss


def tie_decoder_to_encoder(decoder: TextDecoder, encoder: TextModel):
    """Pretraining shares every decoder weight with the encoder except the self-attention blocks."""
    decoder.bert.embeddings = encoder.embeddings
    for d, e in zip(decoder.bert.encoder.layer, encoder.encoder.layer):
        d.crossattention, d.intermediate, d.output = e.crossattention, e.intermediate, e.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
