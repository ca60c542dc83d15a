"""The one training loop every task uses: optimizer steps, with micro-steps inside (what an epoch reads:
blip.data.samplers; the state on disk: blip.training.state; AdamW and the schedules: blip.training.optim).

    fit(task, model, dataset, out_dir)   dataset: one, or {stream: dataset} (a micro-batch of each per micro-step)
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

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as dist
from ..data.samplers import EpochData, Streams
from ..models.checkpoint import save_weights
from ..precision import autocast
from .config import TrainingConfig
from .optim import SCHEDULES, build_optimizer
from .state import load_training_state, save_training_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where training is, in optimizer steps: what a task's alpha ramp and a schedule read."""
    epoch: int
    step: int              # optimizer step within the epoch
    steps_per_epoch: int

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.step / self.steps_per_epoch


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
    cfg: TrainingConfig  # the engine's keys only (Config.training)
    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    data: EpochData | Streams
    device: torch.device
    out_dir: Path
    progress: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "global_step": 0, "skipped": []})
    finite: torch.Tensor | None = None   # all losses finite since the last check (checked without a sync)

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
    cfg = task.cfg.training(task.schedule_name)
    device = device or next(model.parameters()).device
    model.to(device)
    forward = model
    if dist.get_world_size() > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=task.find_unused_parameters)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    resume_dir = None if not resume else (out_dir if resume == "latest" else Path(resume).parent)
    primary = next(iter(dataset.values())) if isinstance(dataset, dict) else dataset
    neighbours = task.image_neighbours(model, primary, out_dir, resume_dir)  # before the resumed weights load
    if isinstance(dataset, dict):  # several streams, one micro-batch of each per micro-step
        data = Streams(dataset, cfg, task.collate(model), device, neighbours, batch_sizes=task.stream_batch_sizes())
    else:
        data = EpochData(dataset, cfg, task.collate(model), device, neighbours)
    if cfg.compile:  # the training forward (the losses, momentum encoders included) and its backward
        forward = torch.compile(forward)
    run = Run(task, cfg, model, forward, optimizer, scaler, data, device, Path(out_dir),
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
    lr = SCHEDULES[run.cfg.schedule](run.cfg, progress.epoch, progress.step)
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
    save_training_state(run.checkpoint, run.model, run.optimizer, run.scaler, dict(run.progress), run.cfg.record)
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
    """Train `model` on `dataset` for task.cfg.max_epoch epochs; a dict {stream: dataset} is read as Streams (the
    first stream's length makes the epoch; the task's losses get {stream: batch}). `evaluate(model, epoch) -> dict`
    runs after each epoch (all ranks). `resume`: a checkpoint path or 'latest'. `max_steps` stops after that many
    optimizer steps (tests, smoke runs). Returns the last epoch's metrics."""
    run = setup(task, model, dataset, out_dir, resume, device)
    cfg, metrics_log, metrics = run.cfg, MetricsLog(run.out_dir / "metrics.jsonl"), {}
    if resume and run.progress["epoch"] >= cfg.max_epoch:
        log.warning("the resumed run is already complete (%d of %d epochs trained): nothing to train; raise "
                    "max_epoch to train on", run.progress["epoch"], cfg.max_epoch)
        return metrics  # its log untouched
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
                save_training_state(run.checkpoint, model, run.optimizer, run.scaler, dict(run.progress), cfg.record)
            if max_steps is not None and run.progress["global_step"] >= max_steps:
                return metrics
        metrics = end_of_epoch(run, epoch, evaluate, metrics_log)
    # the run is complete (a folder whose log lacks this was cut short: `--resume latest` finishes it)
    metrics_log.write(event="end", epochs=cfg.max_epoch, global_step=run.progress["global_step"])
    return metrics
