"""What a training epoch reads: a resumable sample order (plain, or NegCLIP's neighbour pairs) over ranks, each
sample augmented in a private RNG stream seeded by (seed, epoch, index), skipped images carried to the trainer, and
the micro-batches of one epoch (EpochData) from a map-style dataset or a stream of shards, and several datasets
read together, one micro-batch of each per micro-step (Streams: X-FM's text, image and pair streams)."""
from __future__ import annotations

import itertools
import random
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from .. import distributed as dist
from .batches import Batch


class ResumableSampler(Sampler):
    """Seeded shuffle per epoch; global batch j is perm[j*B:(j+1)*B] (B = batch × world) and rank r takes
    its r-th slice, so one process with batch B sees exactly what `world` ranks see together. `start_batch`
    skips batches already trained (resume) without loading them."""

    def __init__(self, n, batch_size, world=1, rank=0, shuffle=True, seed=0):
        self.n, self.b, self.world, self.rank, self.shuffle, self.seed = n, batch_size, world, rank, shuffle, seed
        self.epoch, self.start_batch = 0, 0
        self.num_batches = n // (batch_size * world)  # drop_last, as the original train loaders
        if self.num_batches == 0:
            raise ValueError(f"dataset of {n} samples is smaller than one global batch ({batch_size} x {world})")

    @property
    def rank_batch(self) -> int:
        """Samples in one of this rank's micro-batches."""
        return self.b

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def rank_slices(self):
        """This rank's share of each global batch, from `start_batch` on."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g, device="cpu").tolist()
        else:
            perm = list(range(self.n))
        B = self.b * self.world
        for j in range(self.start_batch, self.num_batches):
            yield perm[j * B + self.rank * self.b: j * B + (self.rank + 1) * self.b]

    def __iter__(self):
        for rows in self.rank_slices():
            yield from rows

    def __len__(self):
        return (self.num_batches - self.start_batch) * self.rank_batch


class NeighbourSampler(ResumableSampler):
    """The same anchors, each followed in its micro-batch by a row of one of its image's nearest neighbours
    (NegCLIP's alternative images, `hard_negatives.images`): b anchors + their b partners per rank. The partner is
    redrawn every epoch from (seed, epoch, row), so workers, ranks and a resumed run draw the same; an anchor
    whose image has no neighbour (unreadable) gets a random row."""

    def __init__(self, n, batch_size, table, world=1, rank=0, seed=0):
        super().__init__(n, batch_size, world, rank, shuffle=True, seed=seed)
        if len(table.row_image) != n:
            raise ValueError(f"the neighbour table covers {len(table.row_image)} rows, the dataset has {n}")
        self.table, self.image_rows = table, table.image_rows()

    @property
    def rank_batch(self) -> int:
        return 2 * self.b

    def partner(self, row: int, draw: int) -> int:
        near = self.table.neighbours[self.table.row_image[row]]
        if not near:
            return draw % self.n
        rows = self.image_rows[near[draw % len(near)]]
        return rows[(draw // len(near)) % len(rows)]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        draws = torch.randint(0, 2 ** 62, (self.n,), generator=g, device="cpu").tolist()
        for rows in self.rank_slices():
            yield from rows
            yield from (self.partner(r, draws[r]) for r in rows)


@contextmanager
def private_rng(seed: int):
    """Run a block with torch (CPU), numpy and `random` seeded to `seed`, then put the caller's states back."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def sample_seed(seed, epoch, index) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2 ** 31)


def _take_skipped(dataset) -> list[str]:
    take = getattr(dataset, "take_skipped", None)
    return take() if take is not None else []


class SeededSamples(Dataset):
    """Sample i of epoch e, augmented with its own seed in a private RNG scope, with the names of the unreadable
    images skipped to make it and that seed (for a collate's own draws): (sample, [names], seed)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        seed = sample_seed(self.seed, self.epoch, i)
        with private_rng(seed):
            sample = self.dataset[i]
        return sample, _take_skipped(self.dataset), seed


class SeededShards(IterableDataset):
    """The same for a streaming dataset (webdataset shards): sample k of a reader's stream gets seed
    (seed, epoch, reader, k), so a resumed stream repeats its augmentations."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        reader = dist.get_rank() * 1000 + (info.id if info else 0)
        stream = iter(self.dataset)
        for k in itertools.count():
            seed = sample_seed(self.seed, self.epoch * 1009 + reader, k)
            with private_rng(seed):
                sample = next(stream, None)
            if sample is None:
                return
            yield sample, _take_skipped(self.dataset), seed


class _Collate:
    """The task's collate over the samples (given their seeds when it draws: `seeded`); the skipped names ride
    along: (batch, [names])."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or default_collate
        self.seeded = getattr(collate_fn, "seeded", False)

    def __call__(self, items):
        samples, skipped, seeds = zip(*items)
        batch = self.collate_fn(list(samples), list(seeds)) if self.seeded else self.collate_fn(list(samples))
        return batch, [name for names in skipped for name in names]


class EpochData:
    """Micro-batches of one epoch from a map-style dataset (ResumableSampler) or a stream (each rank reads its
    own shards; a rank whose shards run short starts them again, so every rank takes the same steps)."""

    def __init__(self, dataset, cfg, collate_fn, device, neighbours=None, *, batch_size=None, seed=None):
        """batch_size (per rank) and seed: the config's train_batch_size and seed unless given (a second stream's)."""
        self.cfg, self.device, self.collate = cfg, device, _Collate(collate_fn)
        world, rank, b = dist.get_world_size(), dist.get_rank(), batch_size or cfg.train_batch_size
        self.seed = cfg.seed if seed is None else seed
        self.streaming = isinstance(dataset, IterableDataset)
        self.rank_batch = b
        if self.streaming:
            self.data, self.sampler = SeededShards(dataset, self.seed), None
            self.micro_per_epoch = len(dataset) // (b * world)
            if self.micro_per_epoch == 0:
                raise ValueError(f"the shards hold {len(dataset)} samples: fewer than one global batch ({b} x {world})")
        else:
            self.data = SeededSamples(dataset, self.seed)
            if neighbours is None:
                self.sampler = ResumableSampler(len(dataset), b, world, rank, shuffle=True, seed=self.seed)
            else:
                self.sampler = NeighbourSampler(len(dataset), b, neighbours, world, rank, seed=self.seed)
            self.micro_per_epoch, self.rank_batch = self.sampler.num_batches, self.sampler.rank_batch
        self.source = dataset

    def batches(self, epoch, start):
        """Micro-batches from `start` on: (batch on the device, skipped image names)."""
        self.data.epoch = epoch
        if self.streaming:
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)
        else:
            self.sampler.set_epoch(epoch, start)
        loader = DataLoader(self.data, batch_size=self.rank_batch, sampler=self.sampler,
                            num_workers=self.cfg.num_workers, collate_fn=self.collate, drop_last=True,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.seed))  # not the model's stream
        if not self.streaming:
            for batch, skipped in loader:
                yield _to_device(batch, self.device), skipped
            return
        k = 0
        while True:
            empty = True
            for batch, skipped in loader:
                empty = False
                if k >= start:  # a resumed stream reads past the batches already trained
                    yield _to_device(batch, self.device), skipped
                k += 1
            if empty:
                raise RuntimeError("the training shards yield no complete batch on this rank")


def stream_seed(seed: int, name: str) -> int:
    """A second stream's seed: its own orders and augmentations, the same whichever other streams a run has."""
    return seed + 1009 * (zlib.crc32(name.encode()) % 100_003)


class Streams:
    """Several datasets read together ({name: dataset}, insertion order): every micro-step takes one micro-batch of
    each, handed on as {name: batch}. The first stream is the primary: its micro-batches make the epoch. Every other
    stream keeps its own seed (stream_seed), order and batch size (`batch_sizes` {name: per-rank batch}; default the
    config's) and cycles through its own epochs: at the primary's global micro-batch g it is in its epoch g // n at
    micro-batch g % n (n: its micro-batches per epoch), so a resume needs no state beyond the primary's progress.
    NegCLIP's `neighbours` pair the primary's rows."""

    def __init__(self, datasets: dict, cfg, collates: dict | None, device, neighbours=None, *, batch_sizes=None):
        if collates is not None and not isinstance(collates, dict):
            raise TypeError(f"a task whose train_data gives streams {list(datasets)} gives its collates as "
                            f"{{stream: collate}}, not a {type(collates).__name__}")
        self.names, collates, batch_sizes = list(datasets), collates or {}, batch_sizes or {}
        unknown = sorted(set(collates) - set(self.names)) + sorted(set(batch_sizes) - set(self.names))
        if unknown:
            raise ValueError(f"stream(s) {unknown} named in a collate or batch size, but the training data has "
                             f"streams {self.names}")
        self.streams = {}
        for k, (name, data) in enumerate(datasets.items()):
            try:
                self.streams[name] = EpochData(data, cfg, collates.get(name), device, neighbours if k == 0 else None,
                                               batch_size=batch_sizes.get(name),
                                               seed=cfg.seed if k == 0 else stream_seed(cfg.seed, name))
            except ValueError as e:  # too small for one global batch
                raise ValueError(f"training stream {name!r}: {e}") from None
        self.primary = self.streams[self.names[0]]
        self.micro_per_epoch = self.primary.micro_per_epoch

    def position(self, name: str, g: int) -> tuple[int, int]:
        """(epoch, micro-batch) of stream `name` at the primary's global micro-batch g."""
        return divmod(g, self.streams[name].micro_per_epoch)

    def _cycle(self, name, g):
        data = self.streams[name]
        epoch, start = self.position(name, g)
        while True:
            batches = data.batches(epoch, start)
            yield from itertools.islice(batches, data.micro_per_epoch - start)  # a stream of shards never ends
            batches.close()  # its loader's workers stop now
            epoch, start = epoch + 1, 0

    def batches(self, epoch, start):
        """The primary's micro-batches of `epoch` from `start` on, each with every other stream's at that point:
        ({name: batch on the device}, skipped image names of all)."""
        g = epoch * self.micro_per_epoch + start
        others = {name: self._cycle(name, g) for name in self.names[1:]}
        try:
            for batch, skipped in self.primary.batches(epoch, start):
                out, skipped = {self.names[0]: batch}, list(skipped)
                for name, stream in others.items():
                    out[name], more = next(stream)
                    skipped += more
                yield out, skipped
        finally:
            for stream in others.values():
                stream.close()


def _to_device(batch, device):
    if isinstance(batch, (torch.Tensor, Batch)):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
