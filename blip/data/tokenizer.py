"""Uncased BERT WordPiece tokenizer with BLIP's two extra tokens, built offline, and BLIP's text cleaning.

[DEC] (id 30522) is the decoder's bos token; [ENC] (id 30523) replaces [CLS] when text is encoded
against an image (ITM, VQA questions, NLVR2).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

VOCAB_FILE = Path(__file__).parents[1] / "assets" / "bert-base-uncased-vocab.txt"
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
DEC_ID, ENC_ID = 30522, 30523
VOCAB_SIZE = 30524


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """The shared fast tokenizer (vocabulary from the package, never from a hub)."""
    from transformers import BertTokenizerFast

    # `vocab=` and not `vocab_file=`: transformers 5 silently ignores the latter.
    tok = BertTokenizerFast(vocab=str(VOCAB_FILE), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tok.bos_token_id == DEC_ID and tok.convert_tokens_to_ids("[ENC]") == ENC_ID, "vocabulary mismatch"
    return tok


def tokenize(texts, *, max_length=None, padding="longest", first_token=None, device=None):
    """Tokenise a list of strings → (input_ids, attention_mask) as int64 tensors.

    `first_token` replaces the leading [CLS] (DEC_ID for the decoder, ENC_ID for multimodal encoding).
    """
    tok = get_tokenizer()
    if isinstance(texts, str):
        texts = [texts]
    out = tok(list(texts), padding=padding, truncation=max_length is not None, max_length=max_length,
              return_tensors="pt", return_token_type_ids=False)
    ids, mask = out["input_ids"], out["attention_mask"]
    if first_token is not None:
        ids[:, 0] = first_token
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def first_token_as(ids, token: int):
    """A copy of `ids` whose first position is `token`: the tokenizer's [CLS] becomes [ENC] for image-grounded
    matching or [DEC] for the decoder (the input is left as it is: it is usually a cached or shared batch)."""
    ids = ids.clone()
    ids[:, 0] = token
    return ids


def decode(ids) -> str:
    # clean_up_tokenization_spaces=True: the original ran transformers 4.15, where that was the default.
    return get_tokenizer().decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")
_QUESTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lower-case, punctuation to spaces, collapse whitespace runs, cap words."""
    caption = _CAPTION_PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lower-case, punctuation deleted (not spaced), cap words."""
    question = _QUESTION_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
