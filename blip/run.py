"""The shared runner every entry script calls: flags → config → distributed init, seeds, output folder, logging →
the task's model → fine-tune with the engine (or --evaluate only) → evaluations, the best epoch kept, a loss plot.

    def main(argv=None):                      # an entry script, whole
        return run(CaptionTask, argv, prepare=ensure_shapes_world)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import add_config_args, config_from_args, save_config


def start_run(description: str, argv=None, prepare=None):
    """-> (args, cfg, device, out). `prepare(cfg)` makes data the config describes (the offline shapes world)."""
    args = add_config_args(argparse.ArgumentParser(description=description)).parse_args(argv)
    cfg = config_from_args(args)
    _, _, _, device = dist.init_distributed(args.device)
    if cfg.deterministic:
        from .determinism import enable_deterministic
        enable_deterministic(device)
    seed = cfg.seed + dist.get_rank()  # the model's stream (dropout, ITM negatives); augmentations have their own
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if prepare is not None:
        prepare(cfg)
    return args, cfg, device, out


def evaluator(task, out: Path):
    """fn(model, epoch) -> metrics: the task's evaluations ('<split>_<metric>'), keeping the best epoch's weights."""
    from .checkpoint import save_weights
    best_seen = [-math.inf]
    evaluations = {}

    def evaluate(model, epoch):
        if not task.eval_every_epoch and 0 <= epoch < task.cfg.max_epoch - 1:
            return {}
        if not evaluations:  # built once, on first use (an evaluation set may take a while to index)
            evaluations.update(task.evaluations(model, out))
        metrics = {f"{split}_{k}" if split else k: v for split, fn in evaluations.items() for k, v in fn(model).items()}
        score = task.best(metrics) if metrics and epoch >= 0 else None
        if score is not None and score > best_seen[0]:
            best_seen[0] = score
            if dist.is_main():
                save_weights(model, out / "model_best.safetensors")
        return metrics

    return evaluate


def run(task_cls, argv=None, *, prepare=None) -> dict:
    """Train (or with --evaluate, evaluate) `task_cls` as the flags say; prints and returns the last metrics."""
    from .engine import fit
    args, cfg, device, out = start_run((task_cls.__doc__ or task_cls.__name__).strip(), argv, prepare)
    task = task_cls(cfg)
    model = task.build_model().to(device)
    evaluate = evaluator(task, out)
    if args.evaluate:
        metrics = evaluate(model, -1)
    else:
        metrics = fit(task, model, task.train_data(model), out, evaluate=evaluate, resume=args.resume, device=device)
    if dist.is_main():
        if metrics:
            print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
        plot_losses(out / "metrics.jsonl", out / "loss_curve.png")
    dist.cleanup()
    return metrics


def plot_losses(log_file, png):
    """Loss curves from the JSON-lines log (one line per logged optimizer step)."""
    if not Path(log_file).exists():
        return
    rows = [json.loads(line) for line in open(log_file)]
    rows = [r for r in rows if r.get("event") == "train"]
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
