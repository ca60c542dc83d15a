"""Tiny deterministic models, data and configs shared by the engine tests and their torchrun worker."""
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

from blip.tasks.base import Task
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


# -- several streams (tests/test_streams.py) ------------------------------------------------------------------------
class Rows(Dataset):
    """n rows (index, features), a pure function of (offset, index): what a stream drew is read back from its batch."""

    def __init__(self, n, offset=0, dim=8):
        self.n, self.offset, self.dim = n, offset, dim

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, torch.randn(self.dim, generator=torch.Generator().manual_seed(self.offset * 100_003 + i))


@dataclass
class StreamsModelConfig:
    streams: list
    dim: int = 8
    dropout: float = 0.0

    def to_dict(self):
        return asdict(self)


class StreamsModel(torch.nn.Module):
    """A shared layer and a head per stream; loss_<stream>: the mean square of its head's output less 1 (a mean over
    samples: DDP's mean over ranks is then the global batch's)."""
    task = "streams"

    def __init__(self, cfg: StreamsModelConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = torch.nn.Linear(cfg.dim, cfg.dim)
        self.drop = torch.nn.Dropout(cfg.dropout)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(cfg.dim, 1) for name in cfg.streams})

    def forward(self, **batches):
        return {f"loss_{name}": (self.heads[name](self.drop(torch.tanh(self.shared(x)))) - 1).pow(2).mean()
                for name, (_, x) in batches.items()}


@dataclass
class StreamsOptions(Task.Options):
    batch_size_streams: dict | None = None  # {stream: per-rank batch}; a stream not named: batch_size_train


class StreamsTask(Task):
    """A toy task over several Rows streams ({name: length}, the first the primary)."""
    Options = StreamsOptions
    names = ("streams",)

    def __init__(self, cfg, lengths, dropout=0.0):
        super().__init__(cfg)
        self.lengths, self.dropout = dict(lengths), dropout

    def build_model(self):
        torch.manual_seed(0)
        return StreamsModel(StreamsModelConfig(list(self.lengths), dropout=self.dropout))

    def train_data(self, model):
        return {name: Rows(n, offset=k) for k, (name, n) in enumerate(self.lengths.items())}

    def stream_batch_sizes(self):
        return self.options.batch_size_streams

    def losses(self, forward, batch, progress):
        return forward(**batch)


class OneDatasetTask(StreamsTask):
    """The same toy with its one stream given as a plain dataset (the engine's single-dataset path)."""

    def train_data(self, model):
        (stream,) = super().train_data(model).values()
        return stream

    def losses(self, forward, batch, progress):
        return forward(**{next(iter(self.lengths)): batch})
