"""Composition-aware hard negative captions (NegCLIP, Yuksekgonul et al. 2023), made by rule from a caption's words.

A negative swaps two words (or two noun phrases) of one kind inside the caption, or turns a spatial word into its
opposite: "a red circle to the left of a blue square" -> "a blue circle to the left of a red square" (attributes),
"a blue square to the left of a red circle" (objects), "a red circle to the right of a blue square" (relation).
Every negative keeps the caption's words outside the swapped parts and is never the caption itself.

The kinds of words come from a part-of-speech tagger: any callable `tokens -> Penn tags`. NegCLIP used spaCy; no
English tagger on PyPI works without downloading a model or data at run time, so the default, `lexicon_tagger`, is
rule-based (closed word classes, a caption adjective list, suffixes). `spacy_tagger("en_core_web_sm")` plugs in
spaCy where the user has a model installed. `shapes_tagger` knows the shapes world's words exactly and tags colours,
sizes, kinds and counts apart, so its swaps exchange like with like (a colour with a colour).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

Tagger = Callable[[Sequence[str]], list[str]]

# ---- the default tagger: closed classes + a caption lexicon + suffixes ---------------------------------------------
_DT = set("a an the this that these those some each every another any no its his her their".split())
_CD = set("one two three four five six seven eight nine ten eleven twelve several many few".split())
_IN = set(("of in on at by with from to into onto over under above below beside behind near between across through "
           "around along against toward towards inside outside beneath underneath atop among upon off up down "
           "while during for like than next").split())
_PRP = set("he she it they him them we you i me us himself herself itself themselves".split())
_CC = set("and or but nor".split())
_VB = set(("is are was were be been being has have had do does did can could will would "
           "sits stands holds rides eats walks runs plays lies lays looks flies carries waits grazes wears "
           "sit stand hold ride eat walk run play lie lay look fly carry wait graze wear").split())
_JJ = set(("white black red blue green yellow brown orange pink purple gray grey silver golden gold dark bright light "
           "big small large little tall short long old young new huge tiny giant wide narrow thick thin "
           "empty full open closed clean dirty wet dry hot cold warm fresh ripe sliced round square wooden metal "
           "plastic glass stone brick striped checkered plain colorful multicolored busy cloudy sunny snowy grassy "
           "sandy rocky shiny fluffy furry hairy happy pretty beautiful nice cute ugly fancy modern antique "
           "double single several various different same other").split())
_RB_NOT = set("fly belly family only jelly rally lily bully ally holly july italy".split())
_IRREGULAR_PLURALS = set("people men women children mice geese feet teeth sheep fish deer police".split())
_JJ_SUFFIXES = ("ful", "ous", "ive", "ish", "able", "ible", "less", "ic", "ical", "ary")


def lexicon_tagger(tokens: Sequence[str]) -> list[str]:
    """Penn tags (NN, NNS, JJ, VB, VBG, RB, IN, DT, CD, PRP, CC) from word lists and suffixes: no model, no data.

    Good enough for short captions ("a man riding a brown horse on the beach"); it knows no context beyond the
    previous word (an -ing word after a determiner or adjective is a noun: "a building")."""
    tags: list[str] = []
    for i, raw in enumerate(tokens):
        w = raw.lower()
        prev = tags[-1] if tags else ""
        if w in _DT:
            t = "DT"
        elif w in _CD or w.isdigit():
            t = "CD"
        elif w in _CC:
            t = "CC"
        elif w in _PRP:
            t = "PRP"
        elif w in _IN:
            t = "IN"
        elif w in _VB:
            t = "VB"
        elif w in _JJ:
            t = "JJ"
        elif w.endswith("ing") and len(w) > 4:
            t = "NN" if prev in ("DT", "JJ") else "VBG"
        elif w.endswith("ly") and len(w) > 4 and w not in _RB_NOT:
            t = "RB"
        elif w.endswith(_JJ_SUFFIXES) and len(w) > 5:
            t = "JJ"
        elif w in _IRREGULAR_PLURALS or (len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is"))):
            t = "NNS"
        elif w.isalpha():
            t = "NN"
        else:
            t = "X"
        tags.append(t)
    return tags


def spacy_tagger(model: str = "en_core_web_sm") -> Tagger:
    """A tagger over an installed spaCy model (NegCLIP's); the tokens are kept as given (no re-tokenisation)."""
    try:
        import spacy
        from spacy.tokens import Doc
        nlp = spacy.load(model)
    except (ImportError, OSError) as e:
        raise RuntimeError(f"spacy_tagger: cannot load spaCy model {model!r} ({e}); install spaCy and the model, "
                           f"or use the default lexicon_tagger") from None

    def tag(tokens):
        doc = Doc(nlp.vocab, words=list(tokens))
        for _, proc in nlp.pipeline:
            doc = proc(doc)
        return [t.tag_ for t in doc]
    return tag


# The shapes world's vocabulary (data/shapes.py; blip/ imports nothing from data/, a test checks they agree).
SHAPES_WORDS = {**{c: "JJ-color" for c in ("red", "green", "blue", "yellow", "purple", "orange")},
                **{s: "JJ-size" for s in ("small", "large")},
                **{k: "NN" for k in ("circle", "square", "triangle", "cross")},
                **{k: "NNS" for k in ("circles", "squares", "triangles", "crosses")},
                **{n: "CD" for n in ("one", "two", "three")},
                **{b: "JJ-background" for b in ("white", "black", "striped", "checkered")},
                "background": "NN-background", "a": "DT", "the": "DT"}


def shapes_tagger(tokens: Sequence[str]) -> list[str]:
    """The shapes world's words by kind (colour, size, shape kind singular/plural, number, background)."""
    return [SHAPES_WORDS.get(t, "IN" if t in _IN else "X") for t in tokens]


TAGGERS = {"lexicon": lexicon_tagger, "shapes": shapes_tagger}


def get_tagger(name: str) -> Tagger:
    """'lexicon' (default, rule-based), 'shapes' (the shapes world), or 'spacy:<model>' (an installed spaCy model)."""
    if name.startswith("spacy:"):
        return spacy_tagger(name.split(":", 1)[1])
    if name not in TAGGERS:
        raise ValueError(f"hard negatives: unknown tagger {name!r}; choose 'lexicon', 'shapes' or 'spacy:<model>'")
    return TAGGERS[name]


# ---- the swaps ---------------------------------------------------------------------------------------------------
# Word kinds whose members are exchanged (as NegCLIP: nouns, plural nouns, adjectives, adverbs, verbs). A tagger may
# refine a tag ('JJ-color'): words are only swapped with words of the very same tag.
SWAP_TAGS = {"NN": "object", "NNS": "object", "JJ": "attribute", "RB": "attribute", "VB": "relation",
             "VBG": "relation", "VBZ": "relation", "VBN": "relation", "VBD": "relation", "VBP": "relation"}
OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
             "bottom": "top", "over": "under", "under": "over", "front": "behind", "behind": "front",
             "before": "after", "after": "before", "inside": "outside", "outside": "inside"}


class Negative(NamedTuple):
    text: str
    kind: str                        # 'attribute' | 'object' | 'relation' | 'phrase'
    spans: tuple[tuple[int, int], ...]  # the token spans [start, end) of the caption that changed


def _kind_of(tag: str) -> str | None:
    return SWAP_TAGS.get(tag.split("-")[0])


def noun_phrases(tags: Sequence[str]) -> list[tuple[int, int]]:
    """Spans [start, end) of determiner/number + modifiers + nouns, ending on a noun (NegCLIP's noun chunks)."""
    spans, i, n = [], 0, len(tags)
    while i < n:
        j = i
        while j < n and tags[j].split("-")[0] in ("DT", "CD"):
            j += 1
        while j < n and tags[j].split("-")[0] in ("JJ", "VBN"):
            j += 1
        k = j
        while k < n and tags[k].split("-")[0] in ("NN", "NNS"):
            k += 1
        if k > j:
            spans.append((i, k))
            i = k
        else:
            i = max(i + 1, j if j > i else i + 1)
    return spans


def caption_negatives(caption: str, tagger: Tagger = lexicon_tagger, min_phrase_words: int = 2) -> list[Negative]:
    """Every rule-based negative of `caption` (words split on spaces), deduplicated, none equal to the caption.

    - two words of one tag exchanged (objects: nouns; attributes: adjectives, adverbs; relations: verbs);
    - two noun phrases of at least `min_phrase_words` words exchanged ('phrase');
    - one spatial word turned into its opposite (left/right, above/below, top/bottom, ...: 'relation').
    """
    tokens = caption.split()
    tags = tagger(tokens)
    if len(tags) != len(tokens):
        raise ValueError(f"tagger returned {len(tags)} tags for {len(tokens)} tokens: {caption!r}")
    out: dict[str, Negative] = {}

    def add(words, kind, spans):
        text = " ".join(words)
        if text != caption and text not in out:
            out[text] = Negative(text, kind, tuple(spans))

    for i in range(len(tokens)):
        kind = _kind_of(tags[i])
        if kind is None:
            continue
        for j in range(i + 1, len(tokens)):
            if tags[j] == tags[i] and tokens[j].lower() != tokens[i].lower():
                words = list(tokens)
                words[i], words[j] = words[j], words[i]
                add(words, kind, [(i, i + 1), (j, j + 1)])
    phrases = [s for s in noun_phrases(tags) if s[1] - s[0] >= min_phrase_words]
    for a in range(len(phrases)):
        for b in range(a + 1, len(phrases)):
            (s0, e0), (s1, e1) = phrases[a], phrases[b]
            words = tokens[:s0] + tokens[s1:e1] + tokens[e0:s1] + tokens[s0:e0] + tokens[e1:]
            add(words, "phrase", [(s0, e0), (s1, e1)])
    for i, w in enumerate(tokens):
        if w.lower() in OPPOSITES:
            words = list(tokens)
            words[i] = OPPOSITES[w.lower()]
            add(words, "relation", [(i, i + 1)])
    return list(out.values())


@dataclass
class HardNegatives:
    """The training option (config key `hard_negatives`): `captions` negatives per caption (0 = off), drawn each
    step from the caption's rule-based negatives by `tagger` ('lexicon', 'shapes', 'spacy:<model>'); `images`: each
    sample's batch partner drawn from its image's `images` nearest neighbours (NegCLIP: 3; 0 = off; blip.training.neighbours)."""
    captions: int = 0
    tagger: str = "lexicon"
    images: int = 0

    KEYS = ("captions", "tagger", "images")

    @classmethod
    def from_config(cls, value: dict | None) -> "HardNegatives":
        if not value:
            return cls()
        import difflib
        for key in value:
            if key not in cls.KEYS:
                close = difflib.get_close_matches(str(key), cls.KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"config key 'hard_negatives': unknown option '{key}'{hint}; options: {cls.KEYS}")
        out = cls(**value)
        for key in ("captions", "images"):
            n = getattr(out, key)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"hard_negatives.{key} must be an integer >= 0, got {n!r}")
        if out.tagger not in TAGGERS and not str(out.tagger).startswith("spacy:"):
            raise ValueError(f"hard_negatives.tagger: unknown tagger {out.tagger!r}; "
                             f"choose 'lexicon', 'shapes' or 'spacy:<model>'")
        return out

    @property
    def enabled(self) -> bool:
        return self.captions > 0 or self.images > 0


class NegativeSampler:
    """Draws up to n negatives per caption (cached per caption: tagging runs once per distinct caption)."""

    def __init__(self, n: int, tagger: Tagger | str = "lexicon"):
        self.n, self.tagger = n, get_tagger(tagger) if isinstance(tagger, str) else tagger
        self._cache: dict[str, list[str]] = {}

    def candidates(self, caption: str) -> list[str]:
        if caption not in self._cache:
            self._cache[caption] = [neg.text for neg in caption_negatives(caption, self.tagger)]
        return self._cache[caption]

    def __call__(self, caption: str, rng: random.Random) -> list[str]:
        """min(n, available) distinct negatives of `caption`, drawn without replacement."""
        cands = self.candidates(caption)
        return rng.sample(cands, min(self.n, len(cands)))


def caption_sampler(option: dict | None) -> NegativeSampler | None:
    """The sampler of the config's `hard_negatives` option (its `captions` and `tagger`), None when it draws none. A
    training collate calls it once per caption with a stream seeded by that sample's seed (blip.data.batches.PairCollate),
    so workers, ranks and a resumed run draw the same; off, the losses are the original's bit for bit."""
    opt = HardNegatives.from_config(option)
    return NegativeSampler(opt.captions, opt.tagger) if opt.captions else None
