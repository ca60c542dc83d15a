"""The original's learning-rate schedules, by name. Every count is in optimizer steps.

Each task declares its default (`Task.schedule`); a config may name another (`schedule:`); an unknown name is
refused when the config is read.
"""
from __future__ import annotations

import math


def cosine(cfg, epoch: int, step: int) -> float:
    """Fine-tuning: cosine over epochs, constant within one (the original steps it per epoch)."""
    return (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.max_epoch)) + cfg.min_lr


def step(cfg, epoch: int, step: int) -> float:
    """Pretraining: linear warmup from warmup_lr over the first warmup_steps of epoch 0, then init_lr decayed by
    lr_decay_rate per epoch, floored at min_lr."""
    if epoch == 0 and cfg.warmup_steps > 0:
        return min(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * step / cfg.warmup_steps)
    return max(cfg.min_lr, cfg.init_lr * cfg.lr_decay_rate ** epoch)


SCHEDULES = {"cosine": cosine, "step": step}
