"""BLIP's image transforms: train = RandomResizedCrop + flip + RandAugment(2, 5); test = square resize.

RandAugment works on uint8 HWC arrays with OpenCV semantics, as the original `transform/randaugment.py`
(itself a port of PIL's ops). Random draws come from torch's generator, so `torch.manual_seed` and the
DataLoader's per-worker seeding make the whole pipeline reproducible.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LEVEL = 10
FILL = (128, 128, 128)
# The original's list for every BLIP task (Color, Contrast, Posterize, Solarize, Cutout are left out).
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


# ---- ops: uint8 HWC array in, uint8 array of the same shape out ----

def _per_channel(img, table_fn):
    return np.stack([table_fn(img[..., c])[img[..., c]] for c in range(img.shape[-1])], -1)


def autocontrast(img):
    """PIL.ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    def table(ch):
        lo, hi = int(ch.min()), int(ch.max())
        if hi <= lo:
            return np.arange(256, dtype=np.uint8)
        scale = 255.0 / (hi - lo)
        return (np.arange(256) * scale - lo * scale).clip(0, 255).astype(np.uint8)
    return _per_channel(img, table)


def equalize(img):
    """PIL.ImageOps.equalize (which differs from cv2.equalizeHist)."""
    def table(ch):
        hist = np.bincount(ch.ravel(), minlength=256)
        step = hist[hist != 0][:-1].sum() // 255
        if step == 0:
            return np.arange(256, dtype=np.uint8)
        lut = np.concatenate([[step // 2], hist[:-1]]).cumsum() // step
        return lut.clip(0, 255).astype(np.uint8)
    return _per_channel(img, table)


def brightness(img, factor):
    return (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)[img]


def sharpness(img, factor):
    """Blend with a 3x3 smoothed copy, interior only (PIL leaves the border pixels alone)."""
    if factor == 1.0:
        return img
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    blurred = cv2.filter2D(img, -1, kernel / 13)
    if factor == 0.0:
        return blurred
    out = img.astype(np.float32)
    inner = blurred[1:-1, 1:-1].astype(np.float32)
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    return out.astype(np.uint8)


def _affine(img, matrix, fill=FILL):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, np.float32(matrix), (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)


def shear_x(img, f, fill=FILL):
    return _affine(img, [[1, f, 0], [0, 1, 0]], fill)


def shear_y(img, f, fill=FILL):
    return _affine(img, [[1, 0, 0], [f, 1, 0]], fill)


def translate_x(img, px, fill=FILL):
    return _affine(img, [[1, 0, -px], [0, 1, 0]], fill)


def translate_y(img, px, fill=FILL):
    return _affine(img, [[1, 0, 0], [0, 1, -px]], fill)


def rotate(img, degrees, fill=FILL):
    h, w = img.shape[:2]
    return _affine(img, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1), fill)


def _signed(x):
    # Each geometric magnitude gets a random sign, 50/50.
    return -x if torch.rand((), device="cpu").item() < 0.5 else x


# name -> (op, level -> args); levels as the original: enhance (M/10)*1.8+0.1 (1.0 at M=5),
# shear (M/10)*0.3, translate (M/10)*10 px, rotate (M/10)*30 degrees.
OPS = {
    "Identity": (lambda img: img, lambda m: ()),
    "AutoContrast": (autocontrast, lambda m: ()),
    "Equalize": (equalize, lambda m: ()),
    "Brightness": (brightness, lambda m: (m / MAX_LEVEL * 1.8 + 0.1,)),
    "Sharpness": (sharpness, lambda m: (m / MAX_LEVEL * 1.8 + 0.1,)),
    "ShearX": (shear_x, lambda m: (_signed(m / MAX_LEVEL * 0.3),)),
    "ShearY": (shear_y, lambda m: (_signed(m / MAX_LEVEL * 0.3),)),
    "TranslateX": (translate_x, lambda m: (_signed(m / MAX_LEVEL * 10.0),)),
    "TranslateY": (translate_y, lambda m: (_signed(m / MAX_LEVEL * 10.0),)),
    "Rotate": (rotate, lambda m: (_signed(m / MAX_LEVEL * 30.0),)),
}


class RandomAugment:
    """Draw `n` ops with replacement; apply each with probability 0.5 at magnitude `m` (of 10).

    Takes a PIL image (is_pil=True) or a uint8 HWC array and returns a uint8 HWC array, which
    ToTensor accepts.
    """

    def __init__(self, n: int = 2, m: int = 5, is_pil: bool = True, augs=BLIP_OPS):
        self.n, self.m, self.is_pil, self.augs = n, m, is_pil, list(augs)

    def __call__(self, img):
        img = np.array(img, dtype=np.uint8) if self.is_pil else img  # a writable copy
        picks = torch.randint(len(self.augs), (self.n,), device="cpu").tolist()
        for name in (self.augs[i] for i in picks):
            if torch.rand((), device="cpu").item() > 0.5:
                continue
            op, level_to_args = OPS[name]
            img = op(img, *level_to_args(self.m))
        return img

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, m={self.m}, augs={self.augs})"


def normalize():
    return transforms.Normalize(MEAN, STD)


def train_transform(image_size: int, scale=(0.5, 1.0), hflip: bool = True, randaugment: bool = True):
    """The original's training pipeline. Pretraining uses scale=(0.2, 1.0).

    `hflip=False` is for data whose text names left and right inside the image (the shapes world):
    a flip would make those captions false. `randaugment=False` drops RandAugment (tiny images, where its
    fixed ±5 px translations and colour ops change what the text says).
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        *([transforms.RandomHorizontalFlip()] if hflip else []),
        *([RandomAugment(2, 5, is_pil=True, augs=BLIP_OPS)] if randaugment else []),
        transforms.ToTensor(),
        normalize(),
    ])


def test_transform(image_size: int):
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        normalize(),
    ])


def test_transform_uint8(image_size: int):
    """test_transform up to its float conversion: a uint8 [3, S, S] tensor, a quarter of the float one's bytes to
    move between processes and to the device; `to_model_input` finishes it there, to test_transform's values."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.PILToTensor(),
    ])


def to_model_input(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3, S, S] -> the normalised float pixels test_transform gives (the same operations: /255, then
    - mean, / std, each correctly rounded on any device), on the tensor's device."""
    mean = torch.tensor(MEAN, device=pixels_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels_uint8.device).view(1, 3, 1, 1)
    return pixels_uint8.float().div(255).sub(mean).div(std)
