"""Images read by the one reader every path uses (blip.data.datasets.read_image): `ImageReads`, the dataset behind
every feature pass, inference collection and CapFilt shard (decoded in DataLoader workers; an unreadable image is
handed back with its reason, never replaced), and, for Python, the original preprocessing (`blip.image_transform`)
and files or PIL images as one pixel batch (`blip.load_images`)."""
from __future__ import annotations

import io
import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import UnreadableImage, _to_rgb, read_image, read_image_or_refuse
from .transforms import test_transform, train_transform


def image_transform(image_size: int, train: bool = False):
    """The original preprocessing: test = bicubic resize + CLIP normalisation; train adds the augmentations."""
    return train_transform(image_size) if train else test_transform(image_size)


def load_images(images, image_size: int, device=None):
    """File paths and/or PIL images -> normalised pixel_values [n, 3, S, S]. Files are read with the training
    rules (blip.data.datasets.read_image: EXIF orientation applied, alpha on white, 16-bit scaled, CMYK converted);
    an unreadable file raises ValueError naming it."""
    tf = image_transform(image_size)
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = read_image_or_refuse(im)
        out.append(tf(_to_rgb(im)))
    x = torch.stack(out)
    return x if device is None else x.to(device)


class ImageReads(Dataset):
    """Item i read and passed through every transform given: (i, [tensors], raw, None), or (i, None, None, reason)
    when it cannot be read (the caller skips it and names it; `collate_image_reads` batches both). A source is a path,
    or an object with `open()` (a path or a binary file object) and `name`, what a report calls it. `boxes[i]`
    (x, y, w, h) crops image i; `keep_bytes`: `raw` is the encoded bytes of a source opened as bytes (CapFilt writes
    tar members out), else None."""

    def __init__(self, sources, transforms, *, boxes=None, keep_bytes=False):
        self.sources, self.transforms, self.boxes, self.keep_bytes = list(sources), list(transforms), boxes, keep_bytes

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        src = self.sources[i]
        is_path = isinstance(src, (str, os.PathLike))
        name = str(src) if is_path else src.name
        try:
            data = src if is_path else src.open()
            raw = data.getvalue() if self.keep_bytes and isinstance(data, io.BytesIO) else None
            img = read_image(data, name)
        except UnreadableImage as e:
            return i, None, None, str(e)
        except OSError as e:  # a shard that went away, ...
            return i, None, None, f"{name}: {type(e).__name__}: {e}"
        box = None if self.boxes is None else self.boxes[i]
        if box is not None:
            x, y, w, h = box
            img = img.crop((x, y, x + w, y + h))
        return i, [t(img) for t in self.transforms], raw, None


def collate_image_reads(batch):
    """(readable indices, one stacked tensor per transform, their raw bytes, [(index, reason)] of the unreadable)."""
    good = [b for b in batch if b[1] is not None]
    bad = [(b[0], b[3]) for b in batch if b[1] is None]
    if not good:
        return [], [], [], bad
    n = len(good[0][1])
    return [b[0] for b in good], [torch.stack([b[1][k] for b in good]) for k in range(n)], [b[2] for b in good], bad
