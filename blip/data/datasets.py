"""What every dataset of the project reads by (SPEC §7): annotation files, checked as they are read (an entry without
a required field raises ValueError naming the file and the entry's index); the one image reader (read_image); the
skip-and-count base (ImageDataset: an unreadable image is skipped, logged once and counted in `num_skipped`, shared
memory, so counts made in DataLoader workers reach the trainer; evaluation stops instead, naming every unreadable
image). Each task's own datasets live in its file under blip/tasks/ and hold cleaned raw strings (pre_caption / pre_question); the model tokenises."""
from __future__ import annotations

import io
import json
import logging
import os
import re

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ---- annotation files ----

def as_list(x):
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def read_json(path):
    """json.load, with any error naming the file (and the line and column of a syntax error)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def load_entries(path, required=()) -> list[dict]:
    """A JSON list of dicts, each holding every `required` key, else ValueError naming the file and the line/column
    (a syntax error) or the entry's index."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of annotation entries, found a {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: entry {i} is a {type(e).__name__}, not an object with fields {list(required)}")
        missing = [k for k in required if k not in e]
        if missing:
            raise ValueError(f"{path}: entry {i} is missing required field(s) {missing}")
    return entries


def int_id(value) -> int:
    """An integer id: the value itself, or the last run of digits in a string
    ('val2014/COCO_val2014_000000391895.jpg' -> 391895, 'coco_57870' -> 57870)."""
    if isinstance(value, int):
        return value
    digits = re.findall(r"\d+", os.path.basename(str(value)))
    if not digits:
        raise ValueError(f"no integer id in {value!r}")
    return int(digits[-1])


# ---- image reading: one set of rules for training, evaluation, CapFilt and inference ----

class UnreadableImage(ValueError):
    """An image that is not read, with the reason."""


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as img2dataset does


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, with the rules in README_DATA.md ("Image handling rules")."""
    mode = img.mode
    if mode in ("RGB",):
        return img
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode == "I":  # 16-bit greyscale (PNG): scale 0..65535 to 0..255, not clip
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms
            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: PIL's own CMYK -> RGB
            pass
    return img.convert("RGB")


def read_image(src, name=None) -> Image.Image:
    """Decode `src` (path or file object) fully into an 8-bit RGB PIL image, EXIF orientation applied, or raise
    UnreadableImage naming it: missing, empty, not an image, truncated, over PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS; refused from 1x the limit, where PIL itself only warns), or a mode PIL cannot
    convert. Never a partly decoded or clipped picture."""
    import warnings
    from PIL import ImageFile, ImageOps
    name = name or str(src)
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file fails, even if another library set this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                img.load()
                img = ImageOps.exif_transpose(img)  # a no-op without an orientation tag
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"{name}: over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
                              f"({e})") from None
    except Exception as e:  # OSError (missing, empty, not an image, truncated), SyntaxError, ValueError, ...
        raise UnreadableImage(f"{name}: {type(e).__name__}: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def read_image_or_refuse(src, name=None) -> Image.Image:
    """read_image for a user's own file: its failure a plain ValueError, 'cannot read image NAME: reason'."""
    try:
        return read_image(src, name)
    except UnreadableImage as e:
        raise ValueError(f"cannot read image {e}") from None


class UnreadableEvalImages(RuntimeError):
    """An evaluation dataset met unreadable images: evaluation stops, naming every one."""


class NoReadableImage(RuntimeError):
    """A training dataset none of whose images can be read (a wrong image_root, most often)."""


NAMED_BAD_IMAGES = 10  # unreadable images named one by one in the log, per process; the rest are counted


class SkipsBadImages:
    """Mixin: `load_image` returns None for an unreadable image, after logging and counting it."""

    def _init_skips(self):
        self.bad_images: list[str] = []
        self._skipped = torch.zeros(1, dtype=torch.int64, device="cpu").share_memory_()
        self._recent: list[str] = []

    def take_skipped(self) -> list[str]:
        """Names of the images skipped (in this process) since the last call. The trainer calls it after every
        sample, in whichever worker made it, and carries the names to the main process with the batch."""
        out, self._recent = self._recent, []
        return out

    @property
    def num_skipped(self) -> int:
        """Samples skipped for an unreadable image, summed over every process using this dataset."""
        return int(self._skipped.item())

    def load_image(self, src, name=None):
        name = name or str(src)
        try:
            img = read_image(src, name)
        except UnreadableImage as e:
            self._skipped += 1
            self._recent.append(name)
            if name not in self.bad_images:
                self.bad_images.append(name)
                if len(self.bad_images) <= NAMED_BAD_IMAGES:
                    log.warning("skipping unreadable image %s", e)
                if len(self.bad_images) == NAMED_BAD_IMAGES:
                    log.warning("further unreadable images are counted, not named here (the epoch's data report "
                                "in metrics.jsonl lists them)")
            return None
        return self.transform(img) if self.transform is not None else img


class ImageDataset(SkipsBadImages, Dataset):
    """Map-style base: subclasses implement `load(index)`, returning None when an image is bad, and
    `image_files(index)`, the image paths of entry `index`.

    Training (`evaluation` False) returns the next readable sample instead of an unreadable one. Evaluation
    (`evaluation` True) never does — that would score another image under this entry's id — it stops with
    UnreadableEvalImages naming every unreadable image of the dataset (entry index and path), so the annotation
    file can be fixed and the scores stay comparable with everyone else's.
    """

    evaluation = False

    def __init__(self, transform):
        self.transform = transform
        self._init_skips()

    def image_files(self, index) -> list[str]:
        raise NotImplementedError

    def unreadable(self) -> list[tuple[int, str, str]]:
        """(entry index, path, reason) of every image of the dataset that cannot be read (decodes them all)."""
        out = []
        for i in range(len(self)):
            for path in self.image_files(i):
                try:
                    read_image(path)
                except UnreadableImage as e:
                    out.append((i, path, str(e)))
        return out

    def __getitem__(self, index):
        if self.evaluation:
            sample = self.load(index)
            if sample is None:
                bad = self.unreadable()
                listing = "\n".join(f"  entry {i}: {reason}" for i, _, reason in bad[:50])
                more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
                raise UnreadableEvalImages(
                    f"{type(self).__name__} ({getattr(self, 'ann_file', '?')}): {len(bad)} of its images cannot be "
                    f"read. Evaluation stops rather than score a different set of images than the annotations "
                    f"name; fix or remove these entries:\n{listing}{more}")
            return sample
        n = len(self)
        for k in range(n):  # the next readable sample, wrapping around
            sample = self.load((index + k) % n)
            if sample is not None:
                return sample
        root = getattr(self, "image_root", None)
        where = f"under config key 'image_root' ({root!r})" if root else "at the paths its annotation files give"
        raise NoReadableImage(f"{type(self).__name__} ({getattr(self, 'ann_file', '?')}): no readable image in the "
                              f"dataset: all {len(self.bad_images)} tried are unreadable (first: "
                              f"{self.bad_images[0] if self.bad_images else '?'}); are the images {where}?")
