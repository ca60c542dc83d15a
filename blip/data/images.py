"""Images for a model from Python: the original preprocessing (`blip.image_transform`) and files or PIL images as
one pixel batch (`blip.load_images`), read by the one reader every path uses."""
from __future__ import annotations

import torch
from PIL import Image

from .datasets import _to_rgb, read_image_or_refuse
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
