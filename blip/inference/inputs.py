"""What inference reads: image files, folders, globs, path lists, annotation files and tar shards, as one list of
`Item`s, and the DataLoader that decodes them in workers (skipping, and naming, the unreadable ones).

Every source becomes a list of items in a fixed order (a folder: its image files sorted, recursively), so a rerun
sees the same list and can skip what is done, and torchrun ranks can each take a part of it.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..data.datasets import IMAGE_EXTS, load_entries
from ..data.shards import expand_shards, is_remote, tar_headers

IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTS) + (".bmp", ".gif", ".tif", ".tiff")
TAR_MEMBER = re.compile(r"^(?P<tar>.+\.tar):(?P<key>.+)$")


@dataclass(frozen=True)
class Item:
    """One image to run on. `id` names it in every output (a path, or `shard.tar:key` for a tar member);
    `tar` / `offset` / `size` locate a tar member's bytes; `label` is its class when the input gives one (the
    sub-folder of a class-per-folder layout); `text` a caption or question that comes with it."""
    id: str
    tar: str | None = None
    offset: int = 0
    size: int = 0
    label: str | None = None
    text: str | None = None

    @property
    def name(self) -> str:  # what a report calls it (blip.data.images.ImageReads)
        return self.id

    def open(self):
        """The image's bytes as a file object (tar member) or its path."""
        if self.tar is None:
            return self.id
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return io.BytesIO(f.read(self.size))


def is_image_file(path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _folder(root: str) -> list[Item]:
    """Every image file under `root`, sorted; `label` = the top sub-folder when every image lies in one
    (the one-sub-folder-per-class layout of ImageNet-style datasets)."""
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root, followlinks=True) for f in names
                   if is_image_file(f))
    rel = [os.path.relpath(f, root).split(os.sep) for f in files]
    per_class = bool(files) and all(len(r) >= 2 for r in rel)
    return [Item(f, label=r[0] if per_class else None) for f, r in zip(files, rel)]


def _tar(path: str) -> list[Item]:
    """The image members of a local shard, located by offset (headers only: no image is read here); a sample's
    caption (.txt) is not needed for inference and is not read."""
    if is_remote(path):
        raise ValueError(f"{path}: inference reads local .tar shards (it seeks to each image by offset); "
                         f"copy remote shards locally first")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such shard")
    return [Item(f"{path}:{key}", tar=path, offset=m.offset_data, size=m.size)
            for key, ext, m in tar_headers(path) if ext in IMAGE_EXTS]


def _path_list(path: str) -> list[Item]:
    """A text file of image paths (or other sources), one a line; relative paths are relative to the file."""
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out += collect(os.path.join(root, line) if not os.path.isabs(line) else line, _nested=True)
    return out


def _annotations(path: str) -> list[Item]:
    """A JSON list in the pretraining format, [{image, caption}] (caption optional here); relative image paths
    are relative to the file, as in training."""
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for e in load_entries(path, ("image",)):
        text = e.get("caption")
        if isinstance(text, list):  # karpathy test files: several captions per image; the first one
            text = text[0] if text else None
        out.append(Item(os.path.join(root, e["image"]), text=text))
    return out


def collect(source, _nested=False) -> list[Item]:
    """The items of one source (or a list of them): an image file, a folder (recursive), a glob, a `.txt`
    list of paths, a `.json` annotation file, a `.tar` shard (or a brace/glob pattern of shards), or a
    `shard.tar:key` id. A source that names nothing raises FileNotFoundError naming it."""
    if isinstance(source, (list, tuple)):
        return [item for s in source for item in collect(s)]
    s = str(source)
    if os.path.isdir(s):
        return _folder(s)
    if os.path.isfile(s):
        low = s.lower()
        if low.endswith(".tar"):
            return _tar(s)
        if low.endswith(".json"):
            return _annotations(s)
        if low.endswith(".txt") or low.endswith(".lst"):
            return _path_list(s)
        return [Item(s)]  # an image (or a file that will fail to read: it is tried and named)
    m = TAR_MEMBER.match(s)
    if m and os.path.isfile(m["tar"]):
        found = [it for it in _tar(m["tar"]) if it.id == s]
        if found:
            return found
    if ".tar" in s and ("{" in s or "::" in s):
        return [item for url in expand_shards(s) for item in _tar(url)]
    if any(c in s for c in "*?["):
        matches = sorted(glob.glob(s, recursive=True))
        if not matches:
            raise FileNotFoundError(f"{s}: the pattern matches no file")
        return [item for p in matches if os.path.isdir(p) or os.path.isfile(p) for item in collect(p)]
    if _nested or is_image_file(s):
        return [Item(s)]  # a listed image that is missing: named as unreadable, not a fatal error
    raise FileNotFoundError(f"{s}: no such file, folder, shard or pattern")


def with_texts(items: list[Item], path) -> list[Item]:
    """Per-image texts (questions) from a JSON ({image: text} or [{image, question|text|caption}]) or CSV
    (`image,question` header) file; images are matched by path as given or relative to the file. Items
    without a text are dropped; a text for an image not in `items` is added as a new item."""
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    if str(path).lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            field = next((k for k in ("question", "text", "caption") if k in (reader.fieldnames or [])), None)
            if "image" not in (reader.fieldnames or []) or field is None:
                raise ValueError(f"{path}: a CSV with columns `image` and `question` is expected, "
                                 f"found {reader.fieldnames}")
            pairs = [(r["image"], r[field]) for r in reader]
    else:
        from ..data.datasets import read_json
        data = read_json(path)
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list):
            for i, e in enumerate(data):
                field = next((k for k in ("question", "text", "caption") if isinstance(e, dict) and k in e), None)
                if field is None or "image" not in e:
                    raise ValueError(f"{path}: entry {i} needs `image` and `question`")
                pairs.append((e["image"], e[field]))
        else:
            raise ValueError(f"{path}: expected {{image: question}} or [{{image, question}}]")
    by_id = {it.id: it for it in items}
    by_path = {os.path.abspath(it.id): it for it in items}
    out = []
    for image, text in pairs:
        if not isinstance(text, str):
            raise ValueError(f"{path}: the text of {image!r} is not a string")
        full = os.path.normpath(image if os.path.isabs(image) else os.path.join(root, image))
        base = by_id.get(image) or by_path.get(full) or Item(full)
        out.append(Item(base.id, base.tar, base.offset, base.size, base.label, text))
    return out


def read_labels_csv(path) -> dict[str, str]:
    """{image: label} from a CSV with `image,label` columns; relative paths are relative to the file."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image", "label"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: a CSV with columns `image` and `label` is expected, found {reader.fieldnames}")
        out = {}
        for r in reader:
            out[r["image"]] = r["label"]
            out[os.path.normpath(os.path.join(root, r["image"]))] = r["label"]
        return out


def resolve(image_id: str) -> Item:
    """The item of an id written by an earlier run (a path or `shard.tar:key`)."""
    m = TAR_MEMBER.match(image_id)
    if m and os.path.isfile(m["tar"]) and not os.path.exists(image_id):
        found = [it for it in _tar(m["tar"]) if it.id == image_id]
        if found:
            return found[0]
    return Item(image_id)


def image_batches(items: list[Item], image_size: int, *, batch_size: int = 8, workers: int = 2, device=None,
                  unreadable: list | None = None, progress=None):
    """(items of the batch, pixel_values [n, 3, S, S]) for every batch of readable images, in order. Decoding and
    resizing run in `workers` DataLoader workers, which hand over uint8 pixels (a quarter of float32's bytes,
    pinned for the GPU); the conversion to normalised floats runs on the device, to test_transform's values. The
    next batch's copy to the device is issued before the current one is handed out, so it overlaps that batch's
    model work. Each unreadable image is appended to `unreadable` as (item, reason) (and logged when no list is
    given) and left out of its batch."""
    import logging
    from ..data.transforms import test_transform_uint8, to_model_input
    cuda = device is not None and torch.device(device).type == "cuda"
    from ..data.images import ImageReads, collate_image_reads
    loader = DataLoader(ImageReads(items, [test_transform_uint8(image_size)]), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_image_reads, prefetch_factor=4 if workers else None,
                        persistent_workers=False, pin_memory=cuda)
    ahead = None  # (items, pixels already on their way to the device)
    for idx, pixels, _, bad in loader:
        for i, reason in bad:
            if unreadable is None:
                logging.getLogger(__name__).warning("skipping unreadable image %s", reason)
            else:
                unreadable.append((items[i], reason))
        if progress is not None:
            progress.update(len(bad))
        if idx:
            pixels = pixels[0]
            moved = to_model_input(pixels if device is None else pixels.to(device, non_blocking=True))
            if ahead is not None:
                yield ahead
            ahead = [items[i] for i in idx], moved
    if ahead is not None:
        yield ahead
