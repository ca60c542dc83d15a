"""CapFilt, BLIP's dataset bootstrapping: a captioner writes synthetic captions for web images, a filter (ITM)
scores every web and synthetic text against its image, and the texts it judges matched are kept.

The input (pretraining JSON lists and/or webdataset .tar shards) is cut into shards of `shard_size` pairs;
shard i is done by rank i % world and written atomically to `out_dir/shards/shard-XXXXX.json` with every
candidate's score, so a rerun skips finished shards and the threshold is applied only when rank 0 merges
them. Captions are sampled with a generator seeded per shard: results do not depend on the world size or on
where a crash happened. Outputs (see `merge`): the cleaned pretraining JSON, a summary, a score histogram.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..models.checkpoint import atomic_write
from ..precision import autocast
from ..data.tokenizer import CLS_ID, ENC_ID, pre_caption
from ..data.datasets import IMAGE_EXTS
from ..data.shards import expand_shards, is_remote, tar_caption, tar_headers
from ..training.config import option, register_options

log = logging.getLogger(__name__)


@dataclass
class CapFiltOptions:
    """The config keys of `task: capfilt` (capfilt.py)."""
    train_file: list[str] = option([])  # the web pairs: pretraining JSON lists and/or webdataset shards (globs)
    captioner: str = option("", path="file")  # caption checkpoint writing the synthetic captions
    filter: str = option("", path="file")  # ITM checkpoint scoring every text against its image
    filter_task: str = option("retrieval", choices=("retrieval", "itm"))  # its ITM first token: [ENC] | [CLS]
    num_captions: int = option(1, at_least=1)  # synthetic captions per image (nucleus sampling)
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 20
    repetition_penalty: float = 1.0
    filter_threshold: float = 0.5       # keep a text when its ITM match probability >= this
    shard_size: int = option(1000, at_least=1)  # pairs per resumable work unit
    noise_file: str = ""                # optional per-pair booleans (True = wrong caption): the filter's P/R


register_options(("capfilt",), CapFiltOptions)


# ---- input: web image-text pairs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One web pair. `image` is a file, or the .tar holding the image bytes at [offset, offset + size)."""
    image: str
    caption: str
    offset: int = -1
    size: int = 0
    name: str = ""      # how reports name it: the file path, or 'shard.tar:key'

    @property
    def in_tar(self) -> bool:
        return self.offset >= 0

    def open(self):
        """The image's path, or a tar member's bytes as a file object (blip.data.images.ImageReads)."""
        return io.BytesIO(read_bytes(self)) if self.in_tar else self.image


def list_pairs(sources) -> list[Pair]:
    """Every pair of the sources, in order: JSON lists of {image, caption} (paths relative to the JSON file)
    and webdataset shards (KEY.jpg|png|... + KEY.txt|json; globs, braces and `::` allowed, as in training).
    Shards are read by offset (random access), so they must be local files: `pipe:` and http URLs are refused."""
    pairs = []
    for path in expand_shards(sources):
        if path.endswith(".tar") or is_remote(path):
            pairs += _tar_pairs(path)
        else:
            pairs += _json_pairs(path)
    return pairs


def _json_pairs(path) -> list[Pair]:
    from ..data.datasets import load_entries
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for e in load_entries(path, ("image", "caption")):
        image = os.path.normpath(os.path.join(root, e["image"]))
        out.append(Pair(image, e["caption"], name=image))
    return out


def _tar_pairs(path) -> list[Pair]:
    """Pairs of a webdataset tar, reading only the text members (image bytes are located, not read). Members
    must be adjacent per sample, as training needs them (blip.data.shards.ShardOrderError otherwise)."""
    if is_remote(path):
        raise ValueError(f"{path}: CapFilt reads shard images by offset and needs local .tar files; streamed "
                         f"(`pipe:`, http) shards are not supported here: copy them locally first")
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for key, ext, m in tar_headers(path):
            files = samples.setdefault(key, {})
            if ext in ("txt", "json"):
                files[ext] = tar.extractfile(m).read()
            elif ext in IMAGE_EXTS and "image" not in files:
                files["image"] = (m.offset_data, m.size, ext)
    path = os.path.abspath(path)
    out = []
    for key, files in samples.items():
        try:
            caption = tar_caption(files, f"{path}:{key}")
        except ValueError as e:
            log.warning("skipping %s:%s: %s", path, key, e)
            continue
        if "image" not in files or caption is None:
            log.warning("skipping %s:%s: no image or no caption", path, key)
            continue
        offset, size, ext = files["image"]
        out.append(Pair(path, caption, offset, size, f"{path}:{key}.{ext}"))
    return out


def read_bytes(pair: Pair) -> bytes:
    with open(pair.image, "rb") as f:
        if pair.in_tar:
            f.seek(pair.offset)
            return f.read(pair.size)
        return f.read()


# ---- the two models -------------------------------------------------------------------------------------------

class CapFilt:
    """A captioner (BlipCaption) and a filter (a BlipITM; `first_token` [ENC] for a retrieval-trained filter,
    [CLS] for the standalone ITM model) with the sampling settings of the original's nucleus decoding."""

    def __init__(self, captioner, filter_model, *, filter_task="retrieval", num_captions=1, top_p=0.9,
                 top_k=50, min_length=10, max_length=30, repetition_penalty=1.1, prompt="a picture of ",
                 max_words=30, precision="fp32"):
        if filter_task not in ("retrieval", "itm"):
            raise ValueError(f"filter_task must be 'retrieval' or 'itm', not {filter_task!r}")
        self.captioner, self.filter = captioner, filter_model
        self.first_token = ENC_ID if filter_task == "retrieval" else CLS_ID
        self.num_captions, self.top_p, self.top_k = num_captions, top_p, top_k
        self.min_length, self.max_length, self.repetition_penalty = min_length, max_length, repetition_penalty
        self.prompt, self.max_words, self.precision = prompt, max_words, precision

    @property
    def device(self):
        return self.filter.device

    @torch.no_grad()
    def captions(self, pixel_values, generator=None) -> list[list[str]]:
        """`num_captions` nucleus-sampled captions per image (the prompt cut off, as the captioner's generate)."""
        n = self.num_captions
        with autocast(self.device, self.precision):
            texts = self.captioner.generate(pixel_values, sample=True, num_captions=n, max_length=self.max_length,
                                            min_length=self.min_length, repetition_penalty=self.repetition_penalty,
                                            top_p=self.top_p, top_k=self.top_k, prompt=self.prompt,
                                            generator=generator)
        return [texts[i * n:(i + 1) * n] for i in range(len(pixel_values))]

    @torch.no_grad()
    def itm_scores(self, pixel_values, texts_per_image) -> list[list[float]]:
        """ITM match probability of every text of image i against image i (one ViT pass per image)."""
        rows = [i for i, texts in enumerate(texts_per_image) for _ in texts]
        texts = [pre_caption(t, self.max_words) for ts in texts_per_image for t in ts]
        with autocast(self.device, self.precision):
            probs = self.filter.itm_score(pixel_values, texts, image_index=rows, first_token=self.first_token).tolist()
        out, k = [], 0
        for ts in texts_per_image:
            out.append(probs[k:k + len(ts)])
            k += len(ts)
        return out


# ---- one shard ---------------------------------------------------------------------------------------------

def process_shard(capfilt: CapFilt, pairs: list[Pair], start: int, seed: int, *, out_dir, batch_size=32,
                  num_workers=0, progress=False) -> dict:
    """Caption and score the pairs of one shard (`start` = the global index of its first pair).

    Returns {'pairs': [{index, image, web, web_score, synthetic, synthetic_scores}...], 'unreadable': [...]}.
    Images read from .tar shards are written under out_dir/images/ (the cleaned JSON lists them by path).
    """
    device = capfilt.device
    size_c, size_f = capfilt.captioner.vision_cfg.image_size, capfilt.filter.vision_cfg.image_size
    from ..data.transforms import test_transform
    from ..data.images import ImageReads, collate_image_reads
    sizes = [size_c] if size_c == size_f else [size_c, size_f]
    data = ImageReads(pairs, [test_transform(s) for s in sizes], keep_bytes=True)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_image_reads)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, unreadable = {}, []
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=f"shard from {start}", leave=False, dynamic_ncols=True)
    for idx, pixels, raw, bad in batches:
        for i, why in bad:
            log.warning("skipping unreadable image %s", why)
            unreadable.append({"index": start + i, "image": pairs[i].name})
        if not idx:
            continue
        pix_c, pix_f = pixels[0], pixels[-1]
        synthetic = capfilt.captions(pix_c.to(device, non_blocking=True), generator)
        web = [pre_caption(pairs[i].caption, capfilt.max_words) for i in idx]
        scores = capfilt.itm_scores(pix_f.to(device, non_blocking=True), [[w] + s for w, s in zip(web, synthetic)])
        for i, w, s, sc, data_bytes in zip(idx, web, synthetic, scores, raw):
            rows[i] = {"index": start + i, "image": _image_path(pairs[i], start + i, data_bytes, out_dir),
                       "web": w, "web_score": round(sc[0], 6), "synthetic": s,
                       "synthetic_scores": [round(x, 6) for x in sc[1:]]}
    return {"pairs": [rows[i] for i in sorted(rows)], "unreadable": unreadable}


def _image_path(pair: Pair, index: int, data: bytes | None, out_dir) -> str:
    """The image as the cleaned JSON (in out_dir) refers to it: relative to out_dir. Tar images are
    extracted to out_dir/images/<tar name>/<index>.<ext> first."""
    out_dir = Path(out_dir)
    if not pair.in_tar:
        return os.path.relpath(pair.image, out_dir)
    ext = pair.name.rsplit(".", 1)[-1]
    target = out_dir / "images" / Path(pair.image).stem / f"{index:09d}.{ext}"
    if not target.exists():
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return os.path.relpath(target, out_dir)


# ---- the run: shards over ranks, resumable, merged by rank 0 --------------------------------------------

def shard_path(out_dir, i) -> Path:
    return Path(out_dir) / "shards" / f"shard-{i:05d}.json"


def fingerprint(settings: dict) -> str:
    """What a finished shard's content depends on (not the threshold: the merge applies it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _done(path: Path, fp: str) -> bool:
    if not path.exists():
        return False
    try:
        ok = json.loads(path.read_text()).get("fingerprint") == fp
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("%s was made with other settings (or is unreadable): redoing it", path)
    return ok


def run_shards(capfilt: CapFilt, pairs: list[Pair], out_dir, *, shard_size, seed, settings: dict,
               batch_size=32, num_workers=0, max_shards=None) -> list[int]:
    """Do this rank's unfinished shards (shard i → rank i % world). `max_shards` stops after that many
    (tests simulate a crash with it). Returns the shards done in this call."""
    n_shards = (len(pairs) + shard_size - 1) // shard_size
    fp = fingerprint(settings)
    mine = [i for i in range(dist.get_rank(), n_shards, dist.get_world_size()) if not _done(shard_path(out_dir, i), fp)]
    if max_shards is not None:
        mine = mine[:max_shards]
    it = mine
    if dist.is_main():
        from tqdm import tqdm
        it = tqdm(mine, desc=f"capfilt shards (rank 0 of {dist.get_world_size()})", dynamic_ncols=True)
    for i in it:
        start = i * shard_size
        # per-shard seed: same captions whatever the world size or where a previous run stopped
        result = process_shard(capfilt, pairs[start:start + shard_size], start, seed * 2 ** 32 + i,
                               out_dir=out_dir, batch_size=batch_size, num_workers=num_workers,
                               progress=dist.is_main())
        record = {"shard": i, "fingerprint": fp, "n_pairs": len(pairs[start:start + shard_size]), **result}
        atomic_write(shard_path(out_dir, i), lambda tmp: Path(tmp).write_text(json.dumps(record)))
    return mine


def merge(out_dir, n_shards: int, threshold: float, noise=None, extra: dict | None = None) -> dict:
    """Read every shard, keep texts scoring >= threshold, write capfilt.json ([{image, caption, source, score}]),
    capfilt_summary.json and capfilt_scores.png. `noise`: per input pair, True = wrong web caption (scores the
    filter with filter_precision_recall). Returns the summary."""
    out_dir = Path(out_dir)
    from ..data.datasets import read_json
    shards = [read_json(shard_path(out_dir, i)) for i in range(n_shards)]
    kept, unreadable = [], []
    counts = {s: {"candidates": 0, "kept": 0, "dropped": 0} for s in ("web", "synthetic")}
    scores = {"web": [], "synthetic": []}
    n_pairs = 0
    web_kept, web_score = {}, {}
    for shard in shards:
        n_pairs += shard["n_pairs"]
        unreadable += shard["unreadable"]
        for p in shard["pairs"]:
            texts = [("web", p["web"], p["web_score"])] + [("synthetic", t, s) for t, s in
                                                             zip(p["synthetic"], p["synthetic_scores"])]
            for source, text, score in texts:
                keep = score >= threshold
                c = counts[source]
                c["candidates"] += 1
                c["kept" if keep else "dropped"] += 1
                scores[source].append(score)
                if source == "web":
                    web_kept[p["index"]], web_score[p["index"]] = keep, score
                if keep:
                    kept.append({"image": p["image"], "caption": text, "source": source, "score": score})
    total = {k: counts["web"][k] + counts["synthetic"][k] for k in ("candidates", "kept", "dropped")}
    summary = {"pairs": n_pairs, "images_scored": n_pairs - len(unreadable), "threshold": threshold,
               **counts, "total": total,
               "unreadable": {"count": len(unreadable), "images": unreadable}, **(extra or {})}
    if noise is not None:
        if len(noise) != n_pairs:
            log.warning("noise file lists %d pairs, the input has %d: filter precision/recall skipped",
                        len(noise), n_pairs)
        else:
            summary["filter_vs_noise"] = filter_precision_recall([web_kept.get(i) for i in range(n_pairs)], noise)
            summary["filter_vs_noise"]["auc"] = separation_auc(
                [web_score[i] for i in range(n_pairs) if i in web_score and not noise[i]],
                [web_score[i] for i in range(n_pairs) if i in web_score and noise[i]])
    atomic_write(out_dir / "capfilt.json", lambda tmp: Path(tmp).write_text(json.dumps(kept)))
    atomic_write(out_dir / "capfilt_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    plot_scores(scores, threshold, out_dir / "capfilt_scores.png")
    return summary


def filter_precision_recall(kept_flags, noise_flags) -> dict:
    """How well the filter catches wrong web captions. kept_flags[i]: the filter kept pair i's web text (None:
    not scored, e.g. an unreadable image; left out); noise_flags[i]: that text is wrong. A 'catch' is a drop.
    precision = wrong among dropped, recall = dropped among wrong (0 when undefined)."""
    if len(kept_flags) != len(noise_flags):
        raise ValueError(f"{len(kept_flags)} filter decisions but {len(noise_flags)} noise flags")
    pairs = [(k, bool(n)) for k, n in zip(kept_flags, noise_flags) if k is not None]
    tp = sum(1 for k, n in pairs if not k and n)
    fp = sum(1 for k, n in pairs if not k and not n)
    fn = sum(1 for k, n in pairs if k and n)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "caught": tp, "false_alarms": fp, "missed": fn,
            "scored": len(pairs)}


def separation_auc(right_scores, wrong_scores) -> float | None:
    """Threshold-free check of the filter: the probability that a right text outscores a wrong one (ties
    count half); 0.5 = no better than chance. None when either list is empty."""
    if not right_scores or not wrong_scores:
        return None
    ranked = sorted([(s, 1) for s in right_scores] + [(s, 0) for s in wrong_scores])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks (1-based) over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(r for _, r in ranked[i:j]) * (i + 1 + j) / 2
        i = j
    n_r, n_w = len(right_scores), len(wrong_scores)
    return (rank_sum - n_r * (n_r + 1) / 2) / (n_r * n_w)


def plot_scores(scores: dict, threshold: float, png) -> None:
    """Histogram of ITM match probabilities by source, the threshold marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = [i / 40 for i in range(41)]
    for source, values in scores.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{source} ({len(values)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("ITM match probability")
    ax.set_ylabel("texts")
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
