"""The optimizer (AdamW groups: decay, layer-wise LR) and the original's learning-rate schedules, by name. Every
count is in optimizer steps.

Each task declares its default (`Task.schedule`); a config may name another (`schedule:`); an unknown name is
refused when the config is read.
"""
from __future__ import annotations

import math

import torch


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
