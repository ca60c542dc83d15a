"""The one training loop every task uses: optimizer steps, with micro-steps inside.

    fit(task, model, dataset, out_dir)
      setup         optimizer (fused AdamW, no decay on biases/norms), DDP wrap, GradScaler (fp16 only), resume
      per epoch, per optimizer step (train_step):
        LR from the task's schedule; task.begin_step (the momentum update: once per optimizer step)
        grad_accum_steps micro-steps of forward + backward (forward_backward; DDP syncs on the last one)
        clipping after unscale, the optimizer step
        every log_every steps: the losses, averaged over micro-steps and ranks (the only host sync)
      end of epoch  checkpoint (atomic, resumable), weights, evaluation, the data report, logs

Every count — warmup, LR, alpha ramps, log_every, save_every_steps, the EMA — is in optimizer steps. Samples are
augmented in a private RNG scope seeded by (seed, epoch, index), so the process-wide generators belong to the
model (dropout, ITM negatives): the same losses with any num_workers, and both streams restored on resume.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from .. import distributed as dist
from ..data.batches import Batch
from ..models.checkpoint import CheckpointMismatchError, atomic_write, save_weights
from ..precision import autocast
from .schedules import SCHEDULES

log = logging.getLogger(__name__)


# -- data: a resumable order, augmentation in its own RNG stream, skipped images carried to the trainer -----------
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

    def __init__(self, dataset, cfg, collate_fn, device, neighbours=None):
        self.cfg, self.device, self.collate = cfg, device, _Collate(collate_fn)
        world, rank, b = dist.get_world_size(), dist.get_rank(), cfg.train_batch_size
        self.streaming = isinstance(dataset, IterableDataset)
        self.rank_batch = b
        if self.streaming:
            self.data, self.sampler = SeededShards(dataset, cfg.seed), None
            self.micro_per_epoch = len(dataset) // (b * world)
            if self.micro_per_epoch == 0:
                raise ValueError(f"the shards hold {len(dataset)} samples: fewer than one global batch ({b} x {world})")
        else:
            self.data = SeededSamples(dataset, cfg.seed)
            if neighbours is None:
                self.sampler = ResumableSampler(len(dataset), b, world, rank, shuffle=True, seed=cfg.seed)
            else:
                self.sampler = NeighbourSampler(len(dataset), b, neighbours, world, rank, seed=cfg.seed)
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
                            generator=torch.Generator().manual_seed(self.cfg.seed))  # not the model's stream
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


def _to_device(batch, device):
    if isinstance(batch, (torch.Tensor, Batch)):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# -- optimisation -----------------------------------------------------------------------------------------------
def build_optimizer(model, cfg):
    """AdamW over the trainable parameters: no decay on biases and norms; with `layer_decay` < 1 the visual
    encoder's layer i of L (stem 0, then its blocks) learns at lr × layer_decay^(L − i), the text stack and heads at
    lr (BEiT's layer-wise decay, timm's layer ids). Each group's `lr_scale` multiplies the schedule's LR."""
    scales = {}
    if getattr(cfg, "layer_decay", 1.0) != 1.0 and hasattr(model, "vision_layers"):
        ids, n = model.vision_layers()
        scales = {k: cfg.layer_decay ** (n - i) for k, i in ids.items() if i < n}
    groups = {(True, 1.0): {"params": [], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              (False, 1.0): {"params": [], "weight_decay": 0.0, "lr_scale": 1.0}}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, scale = not (p.ndim < 2 or name.endswith(".bias")), scales.get(name, 1.0)
            group = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
            groups.setdefault((decay, scale), group)["params"].append(p)
    # one fused kernel over all parameters (CPU too: ~10x faster than the per-tensor loop on small models)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(list(groups.values()), lr=cfg.init_lr, weight_decay=cfg.weight_decay, fused=fused or None)


@dataclass(frozen=True)
class Progress:
    """Where training is, in optimizer steps: what a task's alpha ramp and a schedule read."""
    epoch: int
    step: int              # optimizer step within the epoch
    steps_per_epoch: int

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.step / self.steps_per_epoch


# -- checkpoints --------------------------------------------------------------------------------------------------
def _rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def previous_checkpoint(path) -> Path:
    return Path(path).with_name(Path(path).name.replace("_latest", "_previous"))


def save_training_state(path, model, optimizer, scaler, progress, cfg):
    """Everything needed to continue exactly: called on every rank (RNG states are gathered), rank 0 writes.
    The checkpoint it replaces is kept as checkpoint_previous.pt, a fallback should the latest be damaged later
    (a full disk, a copy cut short)."""
    rngs = dist.all_gather_object(_rng_state())
    if dist.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "progress": progress, "rng": rngs, "config": cfg.to_dict(),
                 # what the weights are, as save_weights' metadata: `blip` and load_model read them from here too
                 "task": model.task, "model_config": model.cfg.to_dict()}
        atomic_write(path, lambda tmp: (torch.save(state, tmp), _keep_previous(path)))
    dist.barrier()


def _keep_previous(path):
    """checkpoint_latest.pt -> checkpoint_previous.pt, leaving the latest in place until the new one replaces it
    (a hard link: no copy, and no moment without a latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    prev, tmp = previous_checkpoint(path), path.with_name(path.name + ".prev.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
    except OSError:  # no hard links on this file system: a copy
        import shutil
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def load_training_state(path, model, optimizer, scaler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no checkpoint at {path}") from None
    except Exception as e:  # a truncated or corrupt file: say which, and what to resume from instead
        fallback = previous_checkpoint(path)
        hint = f"; resume from the one before it: --resume {fallback}" if fallback.exists() else ""
        raise CheckpointMismatchError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}){hint}") from e
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) != dist.get_world_size():
        log.warning("resuming on %d ranks from %d: RNG streams are not restored", dist.get_world_size(), len(rngs))
    else:
        _set_rng_state(rngs[dist.get_rank()])
    return state["progress"]


class MetricsLog:
    """JSON lines, one object per event, written by rank 0."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, **record):
        if dist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


# -- the loop -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the loop carries: the task, the bare model and the one to call for gradients (DDP-wrapped on several
    ranks), the optimizer, the data and where training is."""
    task: object
    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    data: EpochData
    device: torch.device
    out_dir: Path
    progress: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "global_step": 0, "skipped": []})
    finite: torch.Tensor | None = None   # all losses finite since the last check (checked without a sync)

    @property
    def cfg(self):
        return self.task.cfg

    @property
    def accum(self):
        return max(1, self.cfg.grad_accum_steps)

    @property
    def steps_per_epoch(self):
        return math.ceil(self.data.micro_per_epoch / self.accum)

    def micro_steps(self, step):  # the epoch's last optimizer step may take fewer micro-batches
        return min(self.accum, self.data.micro_per_epoch - step * self.accum)

    @property
    def checkpoint(self):
        return self.out_dir / "checkpoint_latest.pt"


def setup(task, model, dataset, out_dir, resume=None, device=None) -> Run:
    cfg = task.cfg
    device = device or next(model.parameters()).device
    model.to(device)
    forward = model
    if dist.get_world_size() > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    resume_dir = None if not resume else (out_dir if resume == "latest" else Path(resume).parent)
    neighbours = task.image_neighbours(model, dataset, out_dir, resume_dir)  # before the resumed weights load
    data = EpochData(dataset, cfg, task.collate(model), device, neighbours)
    if cfg.compile:  # the training forward (the losses, momentum encoders included) and its backward
        forward = torch.compile(forward)
    run = Run(task, model, forward, optimizer, scaler, data, device, Path(out_dir),
              finite=torch.ones((), dtype=torch.bool, device=device))
    if resume:
        path = run.checkpoint if resume == "latest" else Path(resume)
        run.progress = load_training_state(path, model, optimizer, scaler)
        log.info("resumed from %s at %s", path, {k: v for k, v in run.progress.items() if k != "skipped"})
    return run


def forward_backward(run: Run, batch, progress: Progress, n_micro: int, last: bool) -> dict:
    """One micro-batch: the task's losses, their weighted sum backpropagated (scaled by 1/n_micro)."""
    weights = run.cfg.loss_weights or {}
    sync = nullcontext() if (dist.get_world_size() == 1 or last) else run.forward.no_sync()
    with sync:
        with autocast(run.device, run.cfg.precision):
            losses = {k: v for k, v in run.task.losses(run.forward, batch, progress).items() if k.startswith("loss")}
        loss = sum(weights.get(k, 1.0) * v for k, v in losses.items())
        run.finite &= torch.isfinite(loss.detach())
        (run.scaler.scale(loss / n_micro) if run.scaler else loss / n_micro).backward()
    return {k: v.detach().float() for k, v in losses.items()}


def train_step(run: Run, batches, progress: Progress) -> tuple[float, dict]:
    """One optimizer step over its micro-batches; returns (lr, this rank's losses averaged over micro-steps)."""
    lr = SCHEDULES[run.task.schedule_name](run.cfg, progress.epoch, progress.step)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    run.task.begin_step(run.model, progress)
    n = run.micro_steps(progress.step)
    totals = {}
    for j in range(n):
        batch, skipped = next(batches)
        run.progress["skipped"] += skipped
        for k, v in forward_backward(run, batch, progress, n, last=j == n - 1).items():
            totals[k] = totals.get(k, 0.0) + v / n
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, totals


def check_finite(run: Run, where: str):
    """Raise on a non-finite loss since the last check (one host sync: done only at log and save points)."""
    if not bool(dist.all_reduce_mean(run.finite.float()) == 1.0):
        raise FloatingPointError(f"non-finite loss {where}; last good checkpoint: {run.checkpoint}")


def log_step(run: Run, metrics_log, bar, lr, losses, progress: Progress):
    """The step's losses, mean over ranks, read once (`.item()` only here)."""
    keys = sorted(losses)
    values = dist.all_reduce_mean(torch.stack([losses[k] for k in keys])).tolist() if keys else []
    values = dict(zip(keys, values))
    if dist.is_main():
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
    metrics_log.write(event="train", epoch=progress.epoch, step=run.progress["global_step"],
                      step_in_epoch=progress.step, lr=lr, **values)
    check_finite(run, f"in epoch {progress.epoch} by step {progress.step}")


def end_of_epoch(run: Run, epoch: int, evaluate, metrics_log) -> dict:
    check_finite(run, f"in epoch {epoch}")
    skipped = [n for names in dist.all_gather_object(run.progress["skipped"]) for n in names]
    run.progress = {"epoch": epoch + 1, "step": 0, "global_step": run.progress["global_step"], "skipped": []}
    save_training_state(run.checkpoint, run.model, run.optimizer, run.scaler, dict(run.progress), run.cfg)
    if dist.is_main():
        save_weights(run.model, run.out_dir / "model.safetensors")
    if skipped:
        metrics_log.write(event="data", epoch=epoch, bad_images=len(skipped), bad_image_names=sorted(set(skipped)))
        log.warning("epoch %d: %d samples skipped for an unreadable image: %s", epoch, len(skipped),
                    sorted(set(skipped))[:20])
    metrics = {}
    if evaluate is not None:
        metrics = evaluate(run.model, epoch) or {}
        metrics_log.write(event="eval", epoch=epoch, **metrics)
        run.model.train()
    return metrics


def fit(task, model, dataset, out_dir, *, evaluate=None, resume=None, device=None, max_steps=None) -> dict:
    """Train `model` on `dataset` for task.cfg.max_epoch epochs. `evaluate(model, epoch) -> dict` runs after each
    epoch (all ranks). `resume`: a checkpoint path or 'latest'. `max_steps` stops after that many optimizer steps
    (tests, smoke runs). Returns the last epoch's metrics."""
    run = setup(task, model, dataset, out_dir, resume, device)
    cfg, metrics_log, metrics = run.cfg, MetricsLog(run.out_dir / "metrics.jsonl"), {}
    if resume and run.progress["epoch"] >= cfg.max_epoch:
        log.warning("the resumed run is already complete (%d of %d epochs trained): nothing to train; raise "
                    "max_epoch to train on", run.progress["epoch"], cfg.max_epoch)
    for epoch in range(run.progress["epoch"], cfg.max_epoch):
        model.train()
        first = run.progress["step"]
        batches = run.data.batches(epoch, first * run.accum)
        bar = range(first, run.steps_per_epoch)
        if dist.is_main():
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch}", dynamic_ncols=True)
        for step in bar:
            progress = Progress(epoch, step, run.steps_per_epoch)
            lr, losses = train_step(run, batches, progress)
            run.progress.update(step=step + 1, global_step=run.progress["global_step"] + 1)
            if step % cfg.log_every == 0 or step + 1 == run.steps_per_epoch:
                log_step(run, metrics_log, bar, lr, losses, progress)
            if cfg.save_every_steps and run.progress["global_step"] % cfg.save_every_steps == 0:
                check_finite(run, f"in epoch {epoch} by step {step}")
                save_training_state(run.checkpoint, model, run.optimizer, run.scaler, dict(run.progress), cfg)
            if max_steps is not None and run.progress["global_step"] >= max_steps:
                return metrics
        metrics = end_of_epoch(run, epoch, evaluate, metrics_log)
    return metrics
