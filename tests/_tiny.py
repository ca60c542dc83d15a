"""Tiny deterministic models, data and configs shared by the engine tests and their torchrun worker."""
import torch
from torch.utils.data import Dataset

from blip.config import load_config

MED = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SIZES = dict(image_size=32, patch_size=16, vision_width=24, vision_depth=1, vision_heads=2, embed_dim=8,
             drop_path_rate=0.0, med_config=MED)
WORDS = ["red circle", "blue square", "green triangle", "two yellow crosses", "a big star", "left", "right"]


class PairData(Dataset):
    """Random images with short texts and labels, a pure function of the index."""

    def __init__(self, n=32, kind="pretrain"):
        self.n, self.kind = n, kind

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        img = torch.randn(3, 32, 32, generator=g)
        text = WORDS[i % len(WORDS)] + " " + WORDS[(i // 3) % len(WORDS)]
        if self.kind == "nlvr":
            return img, torch.randn(3, 32, 32, generator=g), text, i % 2
        return img, text


def tiny_config(**kw):
    overrides = [f"{k}={v}" for k, v in kw.items()]
    cfg = load_config(None, overrides)
    for k, v in SIZES.items():
        setattr(cfg, k, v)
    return cfg
