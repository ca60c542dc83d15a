"""Decoding for the MED decoder: greedy, beam search and nucleus sampling over a KV cache.

Semantics follow what the original BLIP ran (transformers 4.15's `generate`): log-softmax then the logits
processors (repetition penalty, min length) for beam search, length penalty 1.0, no early stopping, the
same finished-hypothesis bookkeeping; top-k 50 then top-p for sampling. The image's cross-attention K/V
are projected once per image and read by all its beams (see `MultiHeadAttention`).
"""
from __future__ import annotations

import dataclasses

import threading
from contextlib import nullcontext
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batches import sample_one
from .med import TextDecoder
from ..data.tokenizer import PAD_ID, SEP_ID


def _repetition_penalty(scores, ids, penalty):
    if penalty == 1.0:
        return scores
    s = torch.gather(scores, 1, ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(1, ids, s)


def _process(scores, ids, *, min_length, eos_id, repetition_penalty):
    scores = _repetition_penalty(scores, ids, repetition_penalty)
    if ids.shape[1] < min_length:
        scores = scores.clone()
        scores[:, eos_id] = -float("inf")
    return scores


def _top_k_top_p(logits, top_k, top_p):
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return logits


class _Hypotheses:
    """Finished beams of one input (transformers 4.15 BeamHypotheses, length_penalty 1, no early stop)."""

    def __init__(self, num_beams, length_penalty=1.0):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams, self.worst = [], 1e9

    def add(self, ids, sum_logprobs):
        score = sum_logprobs / (len(ids) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self.beams) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / cur_len ** self.length_penalty

    def best(self):
        return sorted(self.beams, key=lambda b: b[0])[-1][1]  # ties: the later one, as transformers


@dataclass(frozen=True)
class Decoding:
    """How to decode (transformers' GenerationConfig, the part BLIP uses). max_length counts the prompt."""
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.0
    sample: bool = False        # nucleus sampling (top-k, then top-p) instead of beam search
    top_p: float = 0.9
    top_k: int = 50
    eos_id: int = SEP_ID
    pad_id: int = PAD_ID
    static: bool | None = None  # rows of fixed layout over a preallocated cache, the step captured as a CUDA graph
    #                             on a GPU (StaticRows); None: on CUDA. The same tokens either way.


def decoding_of(default: Decoding, how: Decoding | None = None, **options) -> Decoding:
    """`how` (else `default`) with `options` (Decoding fields: num_beams=..., sample=...) over it; another key is
    refused by name."""
    known = {f.name for f in dataclasses.fields(Decoding)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown decoding option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(how or default, **options)


@torch.no_grad()
def generate_ids(decoder: TextDecoder, encoder_states, prompt_ids, how: Decoding, *, encoder_mask=None,
                 generator=None) -> list[list[int]]:
    """Token ids (prompt included) of one output per input.

    encoder_states [B, N, w]: what the decoder cross-attends to, ONE row per input (not per beam).
    prompt_ids [B, L0]: the first tokens ([DEC] + prompt). Greedy and sampling also take [B * n, L0]: n outputs
    per encoder row (rows i*n ... i*n + n-1 read row i), its cross-attention K/V projected once for all n.
    """
    cross_kv = decoder.bert.cross_kv(encoder_states)
    if len(prompt_ids) != len(encoder_states) and (not (how.sample or how.num_beams == 1)
                                                   or len(prompt_ids) % len(encoder_states)):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(encoder_states)} encoder rows: beam search takes one "
                         f"prompt per row, greedy and sampling a whole multiple")
    one_path = how.sample or how.num_beams == 1
    static = (encoder_states.device.type == "cuda" if how.static is None else how.static) and encoder_mask is None
    rows = (StaticRows if static else DynamicRows)(decoder, cross_kv, encoder_mask, how.max_length,
                                                    beams=1 if one_path else how.num_beams)
    with StaticRows.lock if static else nullcontext():
        return _one_path(rows, prompt_ids, how, generator) if one_path else _beam_search(rows, prompt_ids, how)


def _step(decoder, new_ids, cross_kv, encoder_mask, past):
    """Next-token logits [B, V] and the grown cache; the vocabulary projection (the decoder's largest matmul) runs
    for the last position only, so a prompt of L tokens costs one projection per row, not L."""
    hidden, past = decoder.bert(new_ids, None, None, encoder_mask, causal=True, cross_kv=cross_kv, past=past,
                                use_cache=True)
    return decoder.cls.predictions(hidden[:, -1]).float(), past


class DynamicRows:
    """Decoding rows over a cache grown by concatenation (the CPU's path): a finished input's rows can leave."""

    def __init__(self, decoder, cross_kv, encoder_mask, max_length, beams=1):
        self.decoder, self.cross_kv, self.encoder_mask, self.beams = decoder, cross_kv, encoder_mask, beams
        self.past = None

    def prefill(self, prompt_ids):
        """Logits after the prompt (one row per prompt; beam search: run once per input, copied per beam)."""
        logits, self.past = _step(self.decoder, prompt_ids, self.cross_kv, self.encoder_mask, None)
        if self.beams > 1:
            logits = logits.repeat_interleave(self.beams, dim=0)
            self.past = [(k.repeat_interleave(self.beams, 0), v.repeat_interleave(self.beams, 0)) for k, v in self.past]
        return logits

    def step(self, tokens, src=None):
        """Logits after one more token per row; rows first reordered by `src` (beam search)."""
        if src is not None:
            self.past = [(k.index_select(0, src), v.index_select(0, src)) for k, v in self.past]
        logits, self.past = _step(self.decoder, tokens[:, None], self.cross_kv, self.encoder_mask, self.past)
        return logits

    def keep(self, slots):
        """Only these inputs go on (their rows are picked by the next step's `src`)."""
        self.cross_kv = [(k[slots], v[slots]) for k, v in self.cross_kv]
        self.encoder_mask = None if self.encoder_mask is None else self.encoder_mask[slots]


class StaticRows:
    """Decoding rows in a fixed layout over every layer's self-attention K/V preallocated to max_length; a step
    reorders the rows (beam search), embeds one new token per row at position `pos` (a device tensor) and attends
    over the whole cache, the positions after `pos` masked: its shapes never change. On CUDA the step is captured
    once per shape as a CUDA graph (its inputs copied into fixed buffers, kept with the graph for the next call of
    the same shape) and replayed: one launch per token instead of a few hundred kernels from Python. Elsewhere it
    runs eagerly (the tests compare its tokens with DynamicRows')."""

    _captured = weakref.WeakKeyDictionary()  # decoder -> {shape key: (graph, buffers)}
    lock = threading.Lock()  # captured buffers are shared by calls of one shape: one decode at a time

    def __init__(self, decoder, cross_kv, encoder_mask, max_length, beams=1):
        self.decoder, self.cross_kv, self.max_length, self.beams = decoder, cross_kv, max_length, beams
        self.graph = self.buffers = None

    def prefill(self, prompt_ids):
        logits, past = _step(self.decoder, prompt_ids, self.cross_kv, None, None)  # the prompt's own length
        k0, kx = past[0][0], self.cross_kv[0][0]
        rows, cuda = len(prompt_ids) * self.beams, k0.device.type == "cuda"
        key = (rows, self.max_length, self.beams, k0.shape[1], k0.shape[3], tuple(kx.shape), k0.dtype, kx.dtype,
               k0.device, torch.is_autocast_enabled(k0.device.type))
        known = StaticRows._captured.setdefault(self.decoder, {}) if cuda else {}
        self.graph, self.buffers = known.get(key) or (None, self._allocate(rows, len(past), k0))
        b = self.buffers
        for (k, v), (kc, vc) in zip(past, b["cache"]):
            kc[:, :, :k.shape[2]].copy_(k.repeat_interleave(self.beams, 0))
            vc[:, :, :v.shape[2]].copy_(v.repeat_interleave(self.beams, 0))
        for (k, v), (kb, vb) in zip(self.cross_kv, b["cross"]):
            kb.copy_(k)
            vb.copy_(v)
        b["pos"].fill_(k0.shape[2])
        self.key, self.known = key, known
        return logits.repeat_interleave(self.beams, dim=0) if self.beams > 1 else logits

    def _allocate(self, rows, layers, k0):
        zeros = lambda: torch.zeros(rows, k0.shape[1], self.max_length, k0.shape[3], dtype=k0.dtype,  # noqa: E731
                                    device=k0.device)
        return {"cache": [(zeros(), zeros()) for _ in range(layers)],
                "cross": [(torch.empty_like(k), torch.empty_like(v)) for k, v in self.cross_kv],
                "tokens": torch.zeros(rows, 1, dtype=torch.long, device=k0.device),
                "src": torch.arange(rows, device=k0.device),
                "pos": torch.zeros((), dtype=torch.long, device=k0.device), "logits": None}

    def _run(self):
        """The step itself: reorder, one token at `pos`, the next logits. What the CUDA graph records."""
        b = self.buffers
        if self.beams > 1:
            for kc, vc in b["cache"]:
                kc.copy_(kc.index_select(0, b["src"]))
                vc.copy_(vc.index_select(0, b["src"]))
        hidden = self.decoder.bert(b["tokens"], None, None, None, causal=True, cross_kv=b["cross"],
                                   cache=(b["cache"], b["pos"]))
        b["logits"] = self.decoder.cls.predictions(hidden[:, -1]).float()
        return b["logits"]

    def step(self, tokens, src=None):
        b = self.buffers
        b["tokens"].copy_(tokens.view(-1, 1))
        if src is not None:
            b["src"].copy_(src)
        if b["pos"].device.type != "cuda":
            logits = self._run()
        else:
            if self.graph is None:
                self.graph = self._capture()
                self.known[self.key] = (self.graph, b)
            self.graph.replay()
            logits = b["logits"]
        b["pos"] += 1
        return logits.clone()  # the graph's output buffer is rewritten by the next step

    def _capture(self):
        """Warm up on a side stream with the rows in place (src = identity: the warm-up only writes position `pos`,
        which the real step rewrites after its reorder), then record the step."""
        b = self.buffers
        src = b["src"].clone()
        b["src"].copy_(torch.arange(len(src), device=src.device))
        # under autocast (--fp16) the casts are recorded as kernels: no cached cast may outlive the capture
        casts = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) \
            if torch.is_autocast_enabled("cuda") else nullcontext()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with casts, torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread records
        with casts, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._run()
        b["src"].copy_(src)
        return graph


def _one_path(rows, ids, how: Decoding, generator):
    """Greedy decoding, or nucleus sampling with `how.sample`: one path per input."""
    if ids.shape[1] >= how.max_length:
        return ids.tolist()
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits = rows.prefill(ids)
    while True:
        scores = _process(logits, ids, min_length=how.min_length, eos_id=how.eos_id,
                          repetition_penalty=how.repetition_penalty)
        if how.sample:
            nxt = sample_one(_top_k_top_p(scores, how.top_k, how.top_p).softmax(-1), generator)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, how.pad_id))
        ids = torch.cat([ids, nxt[:, None]], 1)
        unfinished &= nxt != how.eos_id
        if ids.shape[1] >= how.max_length or not unfinished.any():
            break
        logits = rows.step(nxt)
    return ids.tolist()


def _beam_search(rows, prompt_ids, how: Decoding):
    """Batched beam search. The candidates of a step are read to the host once (the hypotheses' bookkeeping is
    transformers 4.15's, in Python); an input whose search is done leaves the batch on the dynamic path (with
    length penalty 1 and no early stopping its beams could never change its result), or stays, ignored, on the
    static one."""
    nb, max_length, eos_id = how.num_beams, how.max_length, how.eos_id
    b, dev = prompt_ids.shape[0], prompt_ids.device
    ids = prompt_ids.repeat_interleave(nb, dim=0)
    host_ids = ids.tolist()  # the host's copy of every row's tokens: hypotheses are read from it
    beam_scores = torch.zeros(b, nb, device=dev)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step one
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(nb) for _ in range(b)]
    done = [False] * b
    active = list(range(b))  # the input each slot of the batch holds
    logits = rows.prefill(prompt_ids)  # the prompt runs once per input; its cache is copied per beam
    while True:
        scores = _process(F.log_softmax(logits, -1), ids, min_length=how.min_length, eos_id=eos_id,
                          repetition_penalty=how.repetition_penalty)
        n, vocab = len(active), scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(n, nb * vocab)
        top_scores, top_tokens = torch.topk(scores, 2 * nb, dim=1)
        top_beams, top_tokens = top_tokens // vocab, top_tokens % vocab
        cur_len = ids.shape[1]
        ts, tt, tb = top_scores.tolist(), top_tokens.tolist(), top_beams.tolist()  # one read of the candidates
        next_scores, next_tokens, next_src = [0.0] * (n * nb), [how.pad_id] * (n * nb), list(range(n * nb))
        for slot, i in enumerate(active):
            if done[i]:  # (static rows) finished: its rows are ignored
                continue
            k = 0
            for rank, (score, tok, beam) in enumerate(zip(ts[slot], tt[slot], tb[slot])):
                src = slot * nb + beam
                if tok == eos_id:
                    if rank < nb:
                        hyps[i].add(host_ids[src], score)
                else:
                    j = slot * nb + k
                    next_scores[j], next_tokens[j], next_src[j] = score, tok, src
                    k += 1
                if k == nb:
                    break
            done[i] = hyps[i].is_done(max(ts[slot]), cur_len)
        host_ids = [host_ids[r] + [t] for r, t in zip(next_src, next_tokens)]
        ids = torch.cat([ids[torch.tensor(next_src, device=dev)], torch.tensor(next_tokens, device=dev)[:, None]], 1)
        if all(done) or ids.shape[1] >= max_length:
            break
        keep = [slot for slot, i in enumerate(active) if not done[i]]
        if isinstance(rows, DynamicRows) and len(keep) < len(active):  # finished inputs leave the batch
            kept = [slot * nb + j for slot in keep for j in range(nb)]
            ids, host_ids = ids[torch.tensor(kept, device=dev)], [host_ids[r] for r in kept]
            next_src, next_tokens, next_scores = ([x[r] for r in kept] for x in (next_src, next_tokens, next_scores))
            rows.keep(torch.tensor(keep, device=dev))
            active = [active[slot] for slot in keep]
        beam_scores = torch.tensor(next_scores, device=dev)
        logits = rows.step(torch.tensor(next_tokens, device=dev), torch.tensor(next_src, device=dev))
    for slot, i in enumerate(active):
        if not done[i]:
            for j in range(nb):
                hyps[i].add(host_ids[slot * nb + j], next_scores[slot * nb + j])
    out = []
    for i in range(b):
        best = hyps[i].best()
        # as 4.15's finalize: a hypothesis that ended on [SEP] (shorter than max_length) gets it back
        out.append(best + [eos_id] if len(best) < max_length else best)
    return out
