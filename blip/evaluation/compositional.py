"""Compositional probes scored by BLIP's own heads: ARO, What'sUp, SugarCrepe, and the shapes world's probe set.

Every test case is one image and a few candidate captions; the prediction is the best-scored caption. Each caption
is scored by four heads: `itc` (cosine of the projected [CLS] features, no temperature), `itm` (the ITM head's raw
match logit, [ENC] first, as the probes' own BLIP code), `itc+itm` (their sum, as the retrieval re-rank) and
`caption` (the captioner's log-likelihood of the caption's tokens given the image, divided by their number). The
ViT runs once per distinct image (a crop is a distinct image); captions are scored in batches, each image's
cross-attention K/V projected once. Accuracy is reported the way each benchmark's paper does (SPEC §11).

Unreadable images are skipped, counted and named (their cases leave the accuracy: a probe is a measurement of the
model on the cases it can see, and the report says how many it could not).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.images import ImageReads, collate_image_reads
from ..data.tokenizer import DEC_ID, ENC_ID, first_token_as, pre_caption
from ..data.transforms import test_transform

HEADS = ("itc", "itm", "itc+itm", "caption")

# ARO's replication notebook ("Replicate ARO! VG-Relation, VG-Attribution.ipynb", its `symmetric` list) drops these
# 157 VG-Relation relations (symmetric ones, and ones whose swapped caption is no test of word order) before the
# macro average.
ARO_DROPPED_RELATIONS = frozenset((
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of",
    "parked near", "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on",
    "playing with", "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to",
    "staring at", "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around"))


@dataclass
class Case:
    """One test case: an image (optionally cropped to a box x, y, w, h), candidate captions, the right one."""
    image: str
    captions: list[str]
    correct: int
    box: tuple[float, float, float, float] | None = None
    meta: dict = field(default_factory=dict)


# ---- reading the benchmarks' files -------------------------------------------------------------------------------
def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the annotation file ({e})") from None


def _field(entry, key, path, i):
    try:
        return entry[key]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{path}: entry {i} has no {key!r} ({str(entry)[:120]})") from None


def _resolve(root, rel, *subdirs):
    """The first of root/rel, root/<subdir>/basename(rel), root/basename(rel) that exists (else root/rel, which
    is then reported unreadable): the benchmarks' files name images relative to different folders."""
    rel = str(rel)
    options = [os.path.join(root, rel)] + [os.path.join(root, d, os.path.basename(rel)) for d in subdirs]
    options.append(os.path.join(root, os.path.basename(rel)))
    return next((p for p in options if os.path.exists(p)), options[0])


def read_vg(path, root, kind) -> list[Case]:
    """ARO VG-Relation / VG-Attribution: image cropped to the box, candidates [false, true] (correct index 1)."""
    cases = []
    for i, e in enumerate(_load_json(path)):
        box = tuple(float(_field(e, k, path, i)) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        meta = ({"relation": _field(e, "relation_name", path, i)} if kind == "relation"
                else {"attributes": "_".join(_field(e, "attributes", path, i))})
        cases.append(Case(_resolve(root, _field(e, "image_path", path, i), "images"),
                          [_field(e, "false_caption", path, i), _field(e, "true_caption", path, i)], 1, box, meta))
    return cases


def order_perturbations(caption: str, tagger, rng: np.random.Generator) -> list[str]:
    """ARO's four shuffles of a caption: nouns and adjectives among themselves; everything else; words within each
    trigram; the trigrams. Tags NN*/JJ* from `tagger` (ARO used spaCy and nltk's tokenizer)."""
    tokens = re.findall(r"\w+|[^\w\s]", caption)
    tags = tagger(tokens)
    text = np.array(tokens, dtype=object)
    out = []
    t = text.copy()
    for prefix in ("NN", "JJ"):
        idx = [i for i, g in enumerate(tags) if g.split("-")[0].startswith(prefix)]
        t[idx] = rng.permutation(t[idx])
    out.append(" ".join(t))
    t = text.copy()
    rest = [i for i, g in enumerate(tags) if not g.split("-")[0].startswith(("NN", "JJ"))]
    t[rest] = rng.permutation(t[rest])
    out.append(" ".join(t))
    trigrams = [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]
    out.append(" ".join(" ".join(rng.permutation(g)) for g in trigrams))
    out.append(" ".join(" ".join(trigrams[k]) for k in rng.permutation(len(trigrams))))
    return out


def read_order(path, root, tagger=None, seed=0, max_words=30) -> list[Case]:
    """COCO-Order / Flickr30k-Order from a Karpathy test file: per caption [original, 4 shuffles] (correct 0),
    each through pre_caption(30). The shuffles are random: seeded here (ARO's are not)."""
    from ..data.negatives import lexicon_tagger
    tagger, rng, cases = tagger or lexicon_tagger, np.random.default_rng(seed), []
    for i, e in enumerate(_load_json(path)):
        image = _resolve(root, _field(e, "image", path, i))
        caps = _field(e, "caption", path, i)
        for c in ([caps] if isinstance(caps, str) else caps):
            shuffles = order_perturbations(c, tagger, rng)
            options = [pre_caption(c, max_words)] + [pre_caption(p, max_words) for p in shuffles]
            cases.append(Case(image, options, 0))
    return cases


def whatsup_slot(image_path: str, subset: str) -> tuple[tuple[str, str], str]:
    """What'sUp controlled images: (object pair, preposition slot) from the file name, as its code parses them:
    'mug_left_of_table.jpeg' -> (('mug', 'table'), 'left')."""
    name = os.path.basename(image_path)
    parts = name.split("_")
    stem = os.path.splitext(parts[-1])[0]
    return (parts[0], stem), parts[1]


def read_whatsup_controlled(path, root, subset) -> list[Case]:
    cases = []
    for i, e in enumerate(_load_json(path)):
        rel = _field(e, "image_path", path, i)
        pair, slot = whatsup_slot(rel, subset)
        cases.append(Case(_resolve(root, rel, "controlled_images" if subset == "A" else "controlled_clevr"),
                          list(_field(e, "caption_options", path, i)), 0, meta={"pair": pair, "slot": slot}))
    return cases


def read_whatsup_spatial(path, root, source) -> list[Case]:
    """COCO-spatial / GQA-spatial: records [image_id, right caption, wrong caption] (correct 0)."""
    cases = []
    for i, e in enumerate(_load_json(path)):
        if not isinstance(e, list) or len(e) != 3:
            raise ValueError(f"{path}: entry {i} is not [image_id, caption, wrong caption]: {str(e)[:120]}")
        name = f"{int(e[0]):012d}.jpg" if source == "coco" else f"{e[0]}.jpg"
        cases.append(Case(_resolve(root, name, "val2017" if source == "coco" else "vg_images"), [e[1], e[2]], 0))
    return cases


def read_sugarcrepe(path, root) -> list[Case]:
    """One SugarCrepe file: {"0": {filename, caption, negative_caption}, ...} (correct 0, strictly higher)."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a SugarCrepe file is an object keyed '0', '1', ...")
    return [Case(_resolve(root, _field(e, "filename", path, k), "val2017"),
                 [_field(e, "caption", path, k), _field(e, "negative_caption", path, k)], 0)
            for k, e in data.items()]


def read_shapes_probes(path, root) -> list[Case]:
    """The shapes world's probe set (data/shapes_probes.py): [{image, caption_options, correct, subset}]."""
    return [Case(_resolve(root, _field(e, "image", path, i)), list(_field(e, "caption_options", path, i)),
                 int(_field(e, "correct", path, i)), meta={"subset": _field(e, "subset", path, i)})
            for i, e in enumerate(_load_json(path))]


# ---- accuracy, the way each paper reports it -----------------------------------------------------------------------
def first_max_correct(scores: list[np.ndarray], cases: list[Case]) -> np.ndarray:
    """argmax with the first maximum winning (numpy's, as ARO's and What'sUp's code): a tie picks index 0."""
    return np.array([int(np.argmax(s)) == c.correct for s, c in zip(scores, cases)], dtype=bool)


def strict_correct(scores: list[np.ndarray], cases: list[Case]) -> np.ndarray:
    """The right caption scores strictly higher than every other (SugarCrepe; a tie is wrong)."""
    return np.array([all(s[c.correct] > s[j] for j in range(len(s)) if j != c.correct)
                     for s, c in zip(scores, cases)], dtype=bool)


def _pct(x) -> float:
    return float(100 * np.mean(x)) if len(x) else float("nan")


def vg_relation_metrics(cases, scores):
    ok = first_max_correct(scores, cases)
    by = defaultdict(list)
    for c, o in zip(cases, ok):
        by[c.meta["relation"]].append(o)
    kept = {r: v for r, v in by.items() if r not in ARO_DROPPED_RELATIONS}
    return {"accuracy": _pct([np.mean(v) for v in kept.values()]), "micro_accuracy": _pct(ok),
            "relations": len(kept), "relations_dropped": len(by) - len(kept)}


def vg_attribution_metrics(cases, scores):
    ok = first_max_correct(scores, cases)
    by = defaultdict(list)
    for c, o in zip(cases, ok):
        by[c.meta["attributes"]].append(o)
    kept = {a: v for a, v in by.items() if len(v) >= 25}
    return {"accuracy": _pct([np.mean(v) for v in kept.values()]), "micro_accuracy": _pct(ok),
            "attribute_pairs": len(kept)}


def order_metrics(cases, scores):
    return {"accuracy": _pct(first_max_correct(scores, cases))}  # ARO's "Precision@1"


def whatsup_controlled_metrics(cases, scores):
    """Individual accuracy; pair accuracy (both of an opposite pair right) over n/2 pairs; set accuracy (all four
    of an object pair right) over n/4 sets; per preposition. As What'sUp's code, pairs = (left, right) and
    (on, under) for subset A, (left, right) and (in-front, behind) for B."""
    ok = first_max_correct(scores, cases)
    slots = defaultdict(dict)
    for c, o in zip(cases, ok):
        slots[c.meta["pair"]][c.meta["slot"]] = bool(o)
    pair_ok = set_ok = 0
    for s in slots.values():
        pair_ok += bool(s.get("left") and s.get("right"))
        pair_ok += bool((s.get("on") and s.get("under")) or (s.get("in-front") and s.get("behind")))
        set_ok += len(s) == 4 and all(s.values())
    per = defaultdict(list)
    for c, o in zip(cases, ok):
        per[c.meta["slot"]].append(o)
    n = len(cases)
    return {"accuracy": _pct(ok), "pair_accuracy": 100 * pair_ok / (n / 2) if n else float("nan"),
            "set_accuracy": 100 * set_ok / (n / 4) if n else float("nan"),
            "per_preposition": {k: _pct(v) for k, v in sorted(per.items())}}


def accuracy_metrics(cases, scores):
    return {"accuracy": _pct(first_max_correct(scores, cases))}


def strict_metrics(cases, scores):
    return {"accuracy": _pct(strict_correct(scores, cases))}


def shapes_metrics(cases, scores):
    """Per subset, strict (a tie is wrong: a model that ignores the image cannot score above chance)."""
    ok = strict_correct(scores, cases)
    by = defaultdict(list)
    for c, o in zip(cases, ok):
        by[c.meta["subset"]].append(o)
    return {"accuracy": _pct(ok), **{f"{k}_accuracy": _pct(v) for k, v in sorted(by.items())}}


@dataclass
class Benchmark:
    read: Callable[[str, str], list[Case]]
    metrics: Callable
    chance: float


BENCHMARKS = {
    "vg_relation": Benchmark(lambda p, r: read_vg(p, r, "relation"), vg_relation_metrics, 50),
    "vg_attribution": Benchmark(lambda p, r: read_vg(p, r, "attribution"), vg_attribution_metrics, 50),
    "coco_order": Benchmark(read_order, order_metrics, 20),
    "flickr30k_order": Benchmark(read_order, order_metrics, 20),
    "whatsup_a": Benchmark(lambda p, r: read_whatsup_controlled(p, r, "A"), whatsup_controlled_metrics, 25),
    "whatsup_b": Benchmark(lambda p, r: read_whatsup_controlled(p, r, "B"), whatsup_controlled_metrics, 25),
    "coco_spatial": Benchmark(lambda p, r: read_whatsup_spatial(p, r, "coco"), accuracy_metrics, 50),
    "gqa_spatial": Benchmark(lambda p, r: read_whatsup_spatial(p, r, "gqa"), accuracy_metrics, 50),
    "sugarcrepe": Benchmark(read_sugarcrepe, strict_metrics, 50),
    "shapes": Benchmark(read_shapes_probes, shapes_metrics, 50),
}
SUGARCREPE_FILES = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")


def expand(name: str, ann: str, root: str) -> list[tuple[str, str, list[Case]]]:
    """(report name, benchmark, cases) for one --probe: a SugarCrepe directory gives its 7 files, one each."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown probe {name!r}; choose from {sorted(BENCHMARKS)}")
    if name == "sugarcrepe" and os.path.isdir(ann):
        found = [f for f in SUGARCREPE_FILES if os.path.exists(os.path.join(ann, f + ".json"))]
        if not found:
            raise ValueError(f"{ann}: no SugarCrepe file ({', '.join(f + '.json' for f in SUGARCREPE_FILES)})")
        return [(f"sugarcrepe_{f}", name, read_sugarcrepe(os.path.join(ann, f + ".json"), root)) for f in found]
    report = name
    if name in ("sugarcrepe", "coco_spatial", "gqa_spatial"):  # one file per subset: name it by the file
        report = f"{name}_{os.path.splitext(os.path.basename(ann))[0]}"
    return [(report, name, BENCHMARKS[name].read(ann, root))]


# ---- scoring ---------------------------------------------------------------------------------------------------------
class ProbeScorer:
    """Scores every candidate caption of every case by each head the given models have.

    `model`: an itm / retrieval / pretrain model (ITC, ITM, ITC+ITM; a pretrain model also has the captioner).
    `captioner`: a caption model (or None: the pretrain model's decoder when it has one)."""

    def __init__(self, model=None, captioner=None, *, batch_size=32, pair_batch=256, num_workers=0, progress=True,
                 itm_first_token=ENC_ID):
        if captioner is None and model is not None and hasattr(model, "text_decoder"):
            captioner = model
        if model is None and captioner is None:
            raise ValueError("ProbeScorer needs a model with ITC/ITM heads, a captioner, or both")
        self.model, self.captioner = model, captioner
        self.batch_size, self.pair_batch, self.num_workers = batch_size, pair_batch, num_workers
        self.progress, self.itm_first_token = progress, itm_first_token

    @property
    def heads(self) -> tuple[str, ...]:
        return ((("itc", "itm", "itc+itm") if self.model is not None else ())
                + (("caption",) if self.captioner is not None else ()))

    def _sizes(self):
        models = [m for m in (self.model, self.captioner) if m is not None]
        return sorted({m.cfg.image_size for m in models})

    @torch.no_grad()
    def score(self, cases: list[Case], desc="probe"):
        """({head: [scores per case]}, kept case indices, [(image path, why) unreadable])."""
        for m in (self.model, self.captioner):
            if m is not None:
                m.eval()
        keys = sorted({(c.image, c.box) for c in cases}, key=lambda k: (k[0], k[1] or ()))
        key_index = {k: i for i, k in enumerate(keys)}
        by_image = defaultdict(list)
        for n, c in enumerate(cases):
            by_image[key_index[(c.image, c.box)]].append(n)
        sizes = self._sizes()
        reads = ImageReads([path for path, _ in keys], [test_transform(s) for s in sizes], boxes=[b for _, b in keys])
        loader = DataLoader(reads, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_image_reads)
        if self.progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc=desc, leave=False)
        out = {h: [None] * len(cases) for h in self.heads}
        unreadable = []
        for image_ids, pixels, _, bad in loader:
            unreadable += [(keys[i][0], why) for i, why in bad]
            if not image_ids:
                continue
            pairs = [(row, n, k) for row, i in enumerate(image_ids) for n in by_image[i]
                     for k in range(len(cases[n].captions))]
            texts = [cases[n].captions[k] for _, n, k in pairs]
            rows = torch.tensor([p[0] for p in pairs], device="cpu")  # image rows of the batch, moved per model
            for head, values in self._score_batch(pixels, sizes, rows, texts).items():
                for (_, n, k), v in zip(pairs, values):
                    if out[head][n] is None:
                        out[head][n] = np.zeros(len(cases[n].captions), dtype=np.float64)
                    out[head][n][k] = v
        kept = [n for n in range(len(cases)) if out[self.heads[0]][n] is not None]
        return {h: [out[h][n] for n in kept] for h in self.heads}, kept, unreadable

    def _score_batch(self, pixels, sizes, rows, texts):
        scores = {}
        if self.model is not None:
            m = self.model
            px = pixels[sizes.index(m.cfg.image_size)].to(m.device)
            image_embeds, image_feat = m.image_features(px)
            itc, itm = [], []
            for s in range(0, len(texts), self.pair_batch):
                r = rows[s:s + self.pair_batch].to(m.device)
                ids, mask, feat = m.text_features(texts[s:s + self.pair_batch])
                itc.append((image_feat[r] * feat).sum(-1).float())
                ids = first_token_as(ids, self.itm_first_token)
                images, index = r.unique(return_inverse=True)
                itm.append(m.itm_logits(image_embeds[images], ids, mask, image_index=index)[:, 1].float())
            itc, itm = torch.cat(itc).cpu(), torch.cat(itm).cpu()
            scores.update({"itc": itc.tolist(), "itm": itm.tolist(), "itc+itm": (itc + itm).tolist()})
        if self.captioner is not None:
            c = self.captioner
            px = pixels[sizes.index(c.cfg.image_size)].to(c.device)
            image_embeds = c.visual_encoder(px)
            values = []
            for s in range(0, len(texts), self.pair_batch):
                values.append(caption_log_likelihood(c, image_embeds, rows[s:s + self.pair_batch].to(c.device),
                                                     texts[s:s + self.pair_batch]))
            scores["caption"] = torch.cat(values).cpu().tolist()
        return scores


def caption_log_likelihood(captioner, image_embeds, image_index, texts, prompt=None):
    """Mean log-probability of each caption's tokens ([SEP] included, the prompt excluded) under the decoder,
    text i given image_embeds[image_index[i]]: the length-normalised log-likelihood. A caption model reads its
    prompt ('a picture of ') first as in its training; a pretraining decoder has none."""
    if prompt is None:
        prompt = captioner.cfg.prompt if captioner.task == "caption" else ""
    decoder = captioner.text_decoder
    ids, mask = captioner.tokenize([prompt + t for t in texts], max_length=40, first_token=DEC_ID)
    n_prompt = captioner.tokenize([prompt], first_token=DEC_ID)[0].shape[1] - 1  # [DEC] + prompt tokens
    logits = decoder(ids, mask, cross_kv=decoder.bert.cross_kv(image_embeds, index=image_index))
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    target = mask[:, 1:].bool().clone()
    target[:, :max(0, n_prompt - 1)] = False  # position t predicts token t + 1: prompt tokens are not scored
    return (logp * target).sum(1) / target.sum(1).clamp(min=1)


# ---- running and reporting -------------------------------------------------------------------------------------
def evaluate(scorer: ProbeScorer, probes: list[tuple[str, str, str]], limit: int | None = None) -> dict:
    """probes: (benchmark name, annotation path, image root). Returns {report: {head: metrics, 'cases', ...}}."""
    results = {}
    for name, ann, root in probes:
        for report, bench, cases in expand(name, ann, root):
            if limit:
                cases = cases[:limit]
            scores, kept, unreadable = scorer.score(cases, desc=report)
            kept_cases = [cases[n] for n in kept]
            entry = {"benchmark": bench, "cases": len(cases), "scored": len(kept), "chance": BENCHMARKS[bench].chance,
                     "unreadable_images": [{"image": p, "error": why} for p, why in unreadable]}
            for head in scorer.heads:
                entry[head] = BENCHMARKS[bench].metrics(kept_cases, scores[head])
            if unreadable:
                print(f"{report}: {len(unreadable)} unreadable images skipped "
                      f"({len(cases) - len(kept)} cases), e.g. {unreadable[0][0]}")
            results[report] = entry
    return results


def write_report(results: dict, out_dir: str) -> tuple[str, str]:
    """compositional.json and compositional.png (accuracy per probe and subset, one bar per head, chance dashed)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "compositional.json"), os.path.join(out_dir, "compositional.png")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = []  # (label, chance, {head: value})
    for report, r in results.items():
        heads = [h for h in HEADS if h in r]
        metric_names = [k for k, v in r[heads[0]].items() if k.endswith("accuracy") and not isinstance(v, dict)
                        and k != "micro_accuracy"] if heads else []
        for k in metric_names:
            label = report if k == "accuracy" else f"{report}\n{k.replace('_accuracy', '')}"
            bars.append((label, r["chance"] if k in ("accuracy",) or r["benchmark"] == "shapes" else None,
                         {h: r[h][k] for h in heads}))
    heads = [h for h in HEADS if any(h in b[2] for b in bars)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars) + 2), 4))
    w = 0.8 / max(1, len(heads))
    for j, h in enumerate(heads):
        ax.bar([i + j * w for i in range(len(bars))], [b[2].get(h, np.nan) for b in bars], w, label=h)
    for i, (_, chance, _) in enumerate(bars):
        if chance is not None:
            ax.plot([i - w / 2, i + 0.8 - w / 2], [chance, chance], "k--", lw=1)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(bars))], [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title("compositional probes (dashed: chance)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path
