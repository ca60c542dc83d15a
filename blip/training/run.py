"""The shared runner every entry script calls: flags → config → distributed init, seeds, output folder, logging →
the task's model → fine-tune with the engine (or --evaluate only) → evaluations, the best epoch kept, a loss plot.

    def main(argv=None):                      # an entry script, whole
        return run(CaptionTask, argv, prepare=ensure_shapes_world)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..models.checkpoint import move_aside
from .config import add_config_args, config_from_args, save_config
from ..errors import OutputExistsError


RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint_latest.pt")  # any of them: the folder holds a run


def start_run(description: str, argv=None, prepare=None, *, tasks=(), required=(), fresh_output=False,
              reads_roots=False, write_output=True):
    """-> (args, cfg, device, out). `tasks`: the `task:` values the script runs (the config must name one);
    `required`: keys that must not be empty. `prepare(cfg)` makes data the config describes (the offline shapes world).
    Nothing is written to the output folder before the inputs are known good (roots, checkpoints). fresh_output:
    a folder that holds a run is refused unless --resume or --overwrite (which moves the old run aside).
    write_output=False: the caller calls open_output once it has read its checkpoints."""
    args = add_config_args(argparse.ArgumentParser(description=description)).parse_args(argv)
    cfg = config_from_args(args)
    check_config(cfg, args.config, tasks, required)
    _, _, _, device = dist.init_distributed(args.device)
    if cfg.deterministic:
        from .determinism import enable_deterministic
        enable_deterministic(device)
    seed = cfg.seed + dist.get_rank()  # the model's stream (dropout, ITM negatives); augmentations have their own
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if prepare is not None:
        prepare(cfg)
    check_inputs(cfg, args.resume, reads_roots)
    out = Path(cfg.output_dir)
    if fresh_output:
        check_output_dir(out, args.resume, args.overwrite)
    if write_output:
        open_output(out, cfg, args, fresh_output)
    return args, cfg, device, out


def open_output(out: Path, cfg, args, fresh_output=False):
    """Make the output folder and write config.yaml (--overwrite: the run there moved aside first)."""
    dist.barrier()  # every rank has checked the folder before rank 0 moves or writes anything
    if dist.is_main():
        if fresh_output and args.overwrite and holds_run(out):
            print(f"--overwrite: the run in {out} moved aside to {move_aside(out)}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist.barrier()


def check_config(cfg, path, tasks=(), required=()):
    """A config says which task it is for and gives what that task cannot run without (an empty file once ran as a
    BLIP-base model on `ann_root: annotation` until a dataset of 0 samples stopped it)."""
    if tasks and not cfg.task:
        empty = Path(path).is_file() and not Path(path).read_text().strip(" \n\t-{}")
        raise ValueError(f"{path}: {'the file is empty' if empty else 'no `task:` key'}: this script runs "
                         f"`task: {tasks[0]}`" + (f" (or {', '.join(tasks[1:])})" if tasks[1:] else "")
                         + "; start from one of configs/*.yaml")
    for key in required:
        if not cfg_value(cfg, key):
            raise ValueError(f"{path}: config key '{key}' is empty: task {cfg.task or tasks[0]!r} needs it")


def check_inputs(cfg, resume=None, reads_roots=False):
    """The files and folders the config names exist (each named once, by its key), before anything is written.
    reads_roots: the task reads annotation files under ann_root and images under the roots (pretraining's JSON
    lists name their images themselves)."""
    # the path keys, the config's and its task's, say what they name (blip.training.config.option's `path`)
    for owner in (cfg, cfg.options) if cfg.options is not None else (cfg,):
        for f in dataclasses.fields(owner):
            kind, value = f.metadata.get("path"), getattr(owner, f.name)
            if kind == "folder" and reads_roots and value and not Path(value).is_dir():
                raise FileNotFoundError(f"config key '{f.name}': no folder {value}")
            if kind == "file" and value and not Path(value).exists():
                raise FileNotFoundError(f"config key '{f.name}': no file {value}")
    if resume and resume != "latest" and not Path(resume).exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    if resume == "latest" and not (Path(cfg.output_dir) / "checkpoint_latest.pt").exists():
        raise FileNotFoundError(f"--resume latest: no checkpoint_latest.pt in {cfg.output_dir}")


def cfg_value(cfg, key: str):
    """A key's value, the config's own or its task's (None where neither has it)."""
    return getattr(cfg, key) if hasattr(cfg, key) else getattr(cfg.options, key, None)


def holds_run(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in RUN_FILES)


def check_output_dir(out: Path, resume=None, overwrite=False):
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or move it aside")
    if holds_run(out) and not (resume or overwrite):
        raise OutputExistsError(f"{out} holds a run ({', '.join(n for n in RUN_FILES if (out / n).exists())}): "
                                f"--resume latest to continue it, --overwrite to move it aside and start afresh, "
                                f"or another --output-dir")


def describe(task_cls) -> str:
    """`--help`'s description: the first paragraph of the task's docstring (or its module's)."""
    doc = task_cls.__doc__ or sys.modules[task_cls.__module__].__doc__ or task_cls.__name__
    return " ".join(doc.strip().split("\n\n")[0].split())


class Evaluator:
    """evaluate(model, epoch) -> metrics: the task's evaluations ('<split>_<metric>'), keeping the best epoch's weights
    (model_best.safetensors). The best score so far is read back from the run's log, so a resumed run keeps a
    better earlier epoch's weights instead of overwriting them with its first evaluation."""

    def __init__(self, task, out: Path):
        self.task, self.out, self.evaluations = task, Path(out), {}
        self.best = max((self._score(row) for row in _eval_rows(self.out / "metrics.jsonl")), default=-math.inf)

    def _score(self, metrics: dict) -> float:
        score = self.task.best(metrics) if metrics else None
        return -math.inf if score is None else score

    def __call__(self, model, epoch):
        if not self.task.eval_every_epoch and 0 <= epoch < self.task.cfg.max_epoch - 1:
            return {}
        if not self.evaluations:  # built once, on first use (an evaluation set may take a while to index)
            self.evaluations.update(self.task.evaluations(model, self.out))
        metrics = {f"{split}_{k}" if split else k: v
                   for split, fn in self.evaluations.items() for k, v in fn(model).items()}
        score = self._score(metrics) if epoch >= 0 else -math.inf
        if score > self.best:
            self.best = score
            if dist.is_main():
                from ..models.checkpoint import save_weights
                save_weights(model, self.out / "model_best.safetensors")
        return metrics


def _eval_rows(log_file: Path) -> list[dict]:
    if not log_file.exists():
        return []
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("time", "event", "epoch")} for r in rows if r["event"] == "eval"]


def run(task_cls, argv=None, *, prepare=None) -> dict:
    """Train (or with --evaluate, evaluate) `task_cls` as the flags say; prints and returns the last metrics."""
    from .engine import fit
    args, cfg, device, out = start_run(describe(task_cls), argv, prepare, tasks=task_cls.names,
                                       required=task_cls.required_keys, fresh_output=True,
                                       reads_roots=bool(task_cls.ann_files), write_output=False)
    task = task_cls(cfg)
    model = task.build_model().to(device)  # the checkpoint read before anything is written
    open_output(out, cfg, args, fresh_output=True)
    evaluate = Evaluator(task, out)
    if args.evaluate:
        metrics = evaluate(model, -1)
    else:
        metrics = fit(task, model, task.train_data(model), out, evaluate=evaluate, resume=args.resume, device=device)
    if dist.is_main():
        if metrics:
            print(f"results ({out}):")
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
