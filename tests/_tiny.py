"""Tiny deterministic models, data and configs shared by the engine tests and their torchrun worker."""
import torch
from torch.utils.data import Dataset

from blip.training.config import load_config

WORDS = ["red circle", "blue square", "green triangle", "two yellow crosses", "a big star", "left", "right"]


class PairData(Dataset):
    """Random images with short texts and labels, a pure function of the index; `augment` adds noise drawn from
    the process-wide torch generator, as a real augmentation does."""

    def __init__(self, n=32, kind="pretrain", augment=False):
        self.n, self.kind, self.augment = n, kind, augment

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        img = torch.randn(3, 32, 32, generator=g)
        if self.augment:
            img = img + 0.1 * torch.randn(3, 32, 32)
        text = WORDS[i % len(WORDS)] + " " + WORDS[(i // 3) % len(WORDS)]
        if self.kind == "nlvr":
            return img, torch.randn(3, 32, 32, generator=g), text, i % 2
        if self.kind == "retrieval":
            return img, text, i // 2  # two captions per image index
        return img, text


def tiny_config(*overrides, **kw):
    """Defaults + the `micro` model preset + `overrides` ('key=value') and `kw`, as --set would give them."""
    return load_config(None, ["preset=micro", *overrides, *[f"{k}={v}" for k, v in kw.items()]])


def tiny_model(task_cls, cfg, seed=0):
    """The task's model at the config's (micro) sizes, from a fixed seed."""
    torch.manual_seed(seed)
    return task_cls(cfg).build_model()


def scrambled_model(task, seed=0, scale=0.3, **options):
    """blip.load_model(task, **options) from `seed`, every weight moved by `scale` noise: outputs that differ between
    inputs (a freshly initialised micro model's are near-uniform)."""
    import blip
    torch.manual_seed(seed)
    model = blip.load_model(task, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()
