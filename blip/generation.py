"""Decoding for the MED decoder: greedy, beam search and nucleus sampling over a KV cache.

Semantics follow what the original BLIP ran (transformers 4.15's `generate`): log-softmax then the logits
processors (repetition penalty, min length) for beam search, length penalty 1.0, no early stopping, the
same finished-hypothesis bookkeeping; top-k 50 then top-p for sampling. The image's cross-attention K/V
are projected once per image and read by all its beams (see `MultiHeadAttention`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .med import TextDecoder
from .tokenizer import PAD_ID, SEP_ID


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
    if how.sample or how.num_beams == 1:
        return _one_path(decoder, cross_kv, encoder_mask, prompt_ids, how, generator)
    return _beam_search(decoder, cross_kv, encoder_mask, prompt_ids, how)


def _step(decoder, new_ids, cross_kv, encoder_mask, past):
    """Next-token logits [B, V] and the grown cache; the vocabulary projection (the decoder's largest matmul) runs
    for the last position only, so a prompt of L tokens costs one projection per row, not L."""
    hidden, past = decoder.bert(new_ids, None, None, encoder_mask, causal=True, cross_kv=cross_kv, past=past,
                                use_cache=True)
    return decoder.cls.predictions(hidden[:, -1]).float(), past


def _one_path(decoder, cross_kv, encoder_mask, ids, how: Decoding, generator):
    """Greedy decoding, or nucleus sampling with `how.sample`: one path per input."""
    past, new, unfinished = None, ids, torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    while ids.shape[1] < how.max_length:
        logits, past = _step(decoder, new, cross_kv, encoder_mask, past)
        scores = _process(logits, ids, min_length=how.min_length, eos_id=how.eos_id,
                          repetition_penalty=how.repetition_penalty)
        if how.sample:
            probs = _top_k_top_p(scores, how.top_k, how.top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, how.pad_id))
        ids, new = torch.cat([ids, nxt[:, None]], 1), nxt[:, None]
        unfinished &= nxt != how.eos_id
        if not unfinished.any():
            break
    return ids.tolist()


def _beam_search(decoder, cross_kv, encoder_mask, prompt_ids, how: Decoding):
    """Batched beam search. An input whose search is done leaves the batch at once (its rows, cache and image K/V
    dropped): with length penalty 1 and no early stopping its beams could never change its result, and the other
    inputs' rows are computed independently of it."""
    nb, max_length, eos_id = how.num_beams, how.max_length, how.eos_id
    b = prompt_ids.shape[0]
    ids = prompt_ids.repeat_interleave(nb, dim=0)
    beam_scores = torch.zeros(b, nb, device=ids.device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step one
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(nb) for _ in range(b)]
    done = [False] * b
    active = list(range(b))  # the input each slot of the batch holds
    # the beams of an input start identical: the prompt runs once per input and its cache is copied per beam
    logits, past = _step(decoder, prompt_ids, cross_kv, encoder_mask, None)
    logits = logits.repeat_interleave(nb, dim=0)
    past = [(k.repeat_interleave(nb, dim=0), v.repeat_interleave(nb, dim=0)) for k, v in past]
    while True:
        scores = _process(F.log_softmax(logits, -1), ids, min_length=how.min_length, eos_id=eos_id,
                          repetition_penalty=how.repetition_penalty)
        n, vocab = len(active), scores.shape[-1]
        scores = (scores + beam_scores[:, None]).view(n, nb * vocab)
        top_scores, top_tokens = torch.topk(scores, 2 * nb, dim=1)
        top_beams, top_tokens = top_tokens // vocab, top_tokens % vocab
        cur_len = ids.shape[1]
        next_scores = torch.zeros(n, nb, device=ids.device)
        next_tokens = torch.zeros(n, nb, dtype=torch.long, device=ids.device)
        next_src = torch.zeros(n, nb, dtype=torch.long, device=ids.device)
        ts, tt, tb = top_scores.tolist(), top_tokens.tolist(), top_beams.tolist()
        for slot, i in enumerate(active):
            k = 0
            for rank, (score, tok, beam) in enumerate(zip(ts[slot], tt[slot], tb[slot])):
                src = slot * nb + beam
                if tok == eos_id:
                    if rank < nb:
                        hyps[i].add(ids[src].tolist(), score)
                else:
                    next_scores[slot, k], next_tokens[slot, k], next_src[slot, k] = score, tok, src
                    k += 1
                if k == nb:
                    break
            done[i] = hyps[i].is_done(max(ts[slot]), cur_len)
        src = next_src.view(-1)
        beam_scores = next_scores.view(-1)
        ids = torch.cat([ids[src], next_tokens.view(-1, 1)], 1)
        new = next_tokens.view(-1, 1)
        past = [(k.index_select(0, src), v.index_select(0, src)) for k, v in past]
        if all(done) or ids.shape[1] >= max_length:
            break
        keep = [slot for slot, i in enumerate(active) if not done[i]]
        if len(keep) < len(active):  # finished inputs leave the batch
            slots = torch.tensor(keep, device=ids.device)
            rows = (slots[:, None] * nb + torch.arange(nb, device=ids.device)).view(-1)
            ids, new, beam_scores = ids[rows], new[rows], beam_scores[rows]
            past = [(k[rows], v[rows]) for k, v in past]
            cross_kv = [(k[slots], v[slots]) for k, v in cross_kv]
            encoder_mask = None if encoder_mask is None else encoder_mask[slots]
            active = [active[slot] for slot in keep]
        logits, past = _step(decoder, new, cross_kv, encoder_mask, past)
    for slot, i in enumerate(active):
        if not done[i]:
            for j in range(nb):
                hyps[i].add(ids[slot * nb + j].tolist(), beam_scores[slot * nb + j].item())
    out = []
    for i in range(b):
        best = hyps[i].best()
        # as 4.15's finalize: a hypothesis that ended on [SEP] (shorter than max_length) gets it back
        out.append(best + [eos_id] if len(best) < max_length else best)
    return out
