"""NegCLIP's strong alternative images (Yuksekgonul et al. 2023): each training image's nearest neighbours, so that a
batch holds every image next to one that looks like it and the losses must tell their captions apart.

    table = load_or_build(model, dataset, k, transform, out_dir)   # once, as training starts (blip.training.engine.setup)
    sampler = NeighbourSampler(len(dataset), b, table, ...)        # each anchor brings one neighbour: 2b per rank

The neighbours are the exact top-k by cosine of the ITC image features of the model training starts from (the
pretrained checkpoint for fine-tuning; NegCLIP used CLIP's), every distinct image once with the test transform,
itself and the unreadable images left out. The table is written to the run directory (`neighbours.json`) and read
back on resume, so a resumed run pairs as the first did and never recomputes it with a trained model.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .. import distributed as dist
from ..models.checkpoint import atomic_write
from ..data.images import ImageReads, collate_image_reads
from ..evaluation.loops import eval_mode, rank_loader

log = logging.getLogger(__name__)

FILE = "neighbours.json"


@dataclass
class NeighbourTable:
    """Distinct images of a dataset, the rows (samples) showing each, and each image's k nearest other images."""
    k: int
    images: list[str]            # image path per image index
    row_image: list[int]         # image index of every dataset row
    neighbours: list[list[int]]  # per image, up to k image indices, nearest first ([] for an unreadable image)
    unreadable: list[str]

    def image_rows(self) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in self.images]
        for row, image in enumerate(self.row_image):
            rows[image].append(row)
        return rows

    def to_json(self) -> dict:
        return {"k": self.k, "images": self.images, "row_image": self.row_image, "neighbours": self.neighbours,
                "unreadable": self.unreadable}


def dataset_images(dataset) -> tuple[list[str], list[int]]:
    """(distinct image paths in order of first appearance, image index per row), from `dataset.image_files`."""
    if isinstance(dataset, IterableDataset):
        raise ValueError("hard_negatives.images: the nearest-neighbour images need a map-style dataset (JSON files "
                         "of image paths); a stream of shards cannot fetch a given image")
    if not hasattr(dataset, "image_files"):
        raise ValueError(f"hard_negatives.images: {type(dataset).__name__} does not name its images "
                         f"(no image_files(index)); the nearest-neighbour images need a map-style dataset of files")
    index: dict[str, int] = {}
    row_image = [index.setdefault(dataset.image_files(i)[0], len(index)) for i in range(len(dataset))]
    return list(index), row_image


def nearest(features: torch.Tensor, k: int, valid: torch.Tensor | None = None, chunk: int | None = None
            ) -> list[list[int]]:
    """Per row of `features` (unit vectors), the indices of the k most similar other rows (cosine, exact), among
    the `valid` ones; an invalid row gets none. Rows go `chunk` at a time (default: ~512 MB of similarities)."""
    n = features.shape[0]
    chunk = chunk or max(1, (1 << 27) // max(n, 1))
    valid = torch.ones(n, dtype=torch.bool, device=features.device) if valid is None else valid.to(features.device)
    k = min(k, int(valid.sum()) - 1)
    out: list[list[int]] = []
    for s in range(0, n, chunk):
        sims = features[s:s + chunk].float() @ features.float().t()
        sims[:, ~valid] = float("-inf")
        rows = torch.arange(s, min(n, s + chunk), device=features.device)
        sims[rows - s, rows] = float("-inf")  # not itself
        top = sims.topk(max(k, 0), dim=1).indices.tolist() if k > 0 else [[] for _ in rows]
        keep = valid[s:s + chunk].tolist()
        out += [t if ok else [] for ok, t in zip(keep, top)]
    return out


@torch.no_grad()
def image_features(model, paths, transform, batch_size=64, num_workers=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITC features of every image, readable mask), each rank embedding its share in eval mode, then gathered;
    an unreadable image's row is zeros."""
    rows = [None] * len(paths)
    with eval_mode(model):
        loader = rank_loader(ImageReads(paths, [transform]), batch_size, num_workers, collate_fn=collate_image_reads)
        for index, pixels, _, bad in loader:
            for why in (w for _, w in bad):
                log.warning("neighbours: skipping unreadable image %s", why)
            if index:
                feats = model.image_features(pixels[0].to(model.device))[1].float().cpu()
                for i, f in zip(index, feats):
                    rows[i] = f
    merged = [next((r for r in per_rank if r is not None), None) for per_rank in zip(*dist.all_gather_object(rows))]
    width = next((r.shape[0] for r in merged if r is not None), 1)
    valid = torch.tensor([r is not None for r in merged], dtype=torch.bool, device="cpu")
    return torch.stack([torch.zeros(width, device="cpu") if r is None else r for r in merged]), valid


def build(model, dataset, k: int, transform, *, batch_size=64, num_workers=0, listing=None) -> NeighbourTable:
    """The table from `model`'s features; `listing`: dataset_images(dataset) when the caller has it already."""
    images, row_image = listing or dataset_images(dataset)
    feats, valid = image_features(model, images, transform, batch_size, num_workers)
    unreadable = [p for p, ok in zip(images, valid.tolist()) if not ok]
    near = nearest(feats.to(model.device), k, valid)  # n² · d multiply-adds: on the model's device
    return NeighbourTable(k, images, row_image, near, unreadable)


def _write(table: NeighbourTable, out_dir):
    if dist.is_main():
        atomic_write(Path(out_dir) / FILE, lambda tmp: Path(tmp).write_text(json.dumps(table.to_json())))


def load_or_build(model, dataset, k: int, transform, out_dir, *, resume_dir=None, batch_size=64,
                  num_workers=0) -> NeighbourTable:
    """The run's table: `neighbours.json` of the run (or of the checkpoint resumed from) when it was made for these
    images with this k, else built from `model` now and written there (atomically, by rank 0)."""
    images, row_image = dataset_images(dataset)
    for folder in filter(None, (out_dir, resume_dir)):
        path = Path(folder) / FILE
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["k"] == k and saved["images"] == images and saved["row_image"] == row_image:
                log.info("neighbours: %d images, k=%d, from %s", len(images), k, path)
                table = NeighbourTable(**saved)
                if Path(folder) != Path(out_dir):
                    _write(table, out_dir)  # a run resumed into a new folder keeps its table there too
                return table
            log.warning("neighbours: %s was made for other images or another k; building the table again", path)
    start = time.time()
    table = build(model, dataset, k, transform, batch_size=batch_size, num_workers=num_workers,
                  listing=(images, row_image))
    _write(table, out_dir)
    log.info("neighbours: %d images, k=%d, from the initial model's ITC features in %.1f s (%d unreadable)",
             len(images), k, time.time() - start, len(table.unreadable))
    return table
