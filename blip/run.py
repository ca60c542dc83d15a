"""What every entry script does before training: flags → config, distributed init, seeds, output folder,
logging, and (for the offline default) the shapes world generated once."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import add_config_args, config_from_args, save_config


def start_run(description: str, argv=None):
    """-> (args, cfg, device, out_dir)."""
    args = add_config_args(argparse.ArgumentParser(description=description)).parse_args(argv)
    cfg = config_from_args(args)
    _, _, _, device = dist.init_distributed(args.device)
    seed = cfg.seed + dist.get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.shapes:
        ensure_shapes_world(cfg.shapes)
    return args, cfg, device, out


def train_transform_for(cfg, default_scale=(0.5, 1.0)):
    """The original training transform with the config's crop scale, flip and RandAugment switch."""
    from data.transforms import train_transform
    return train_transform(cfg.image_size, scale=tuple(cfg.crop_scale or default_scale), hflip=cfg.hflip,
                           randaugment=cfg.randaugment)


def ensure_shapes_world(spec: dict) -> dict:
    """Generate the shapes world described by `spec` (generate_shapes_world's arguments) unless the same
    one is already on disk; rank 0 writes, the others wait."""
    from data.shapes import VERSION, generate_shapes_world
    out = Path(spec["out_dir"])
    stamp, written = out / "spec.json", dict(spec, version=VERSION)
    if dist.is_main() and not (stamp.exists() and json.loads(stamp.read_text()) == written):
        generate_shapes_world(**spec)
        stamp.write_text(json.dumps(written))
    dist.barrier()
    return json.loads((out / "manifest.json").read_text())


# Annotation file of each dataset's split under cfg.ann_root (the original names; the shapes world's
# Karpathy-style files drop the 'coco_' prefix). Caption ground truth: split 'val_gt' / 'test_gt' under
# cfg.coco_gt_root.
ANN_FILES = {"coco": "coco_karpathy_{}.json", "flickr": "flickr30k_{}.json", "shapes": "karpathy_{}.json",
             "nocaps": "nocaps_{}.json", "vqa": "vqa_{}.json", "nlvr": "nlvr_{}.json"}


def ann_file(cfg, dataset: str, split: str, root: str | None = None) -> str:
    return os.path.join(cfg.ann_root if root is None else root, ANN_FILES[dataset].format(split))


def finetune(args, cfg, out, model, objective, train_set, evaluations, *, best=None, eval_every_epoch=True,
             collate_fn=None, device=None) -> dict:
    """Fine-tune `model` with the engine, evaluating after each epoch (or only after the last), or with
    --evaluate evaluate only. `train_set()` builds the training data (not needed with --evaluate);
    `evaluations` maps a split name to `fn(model) -> metrics`, reported as '<split>_<metric>'; `best(metrics)`
    picks the epoch whose weights are kept as model_best.safetensors. Prints and returns the metrics."""
    from .checkpoint import save_weights
    from .engine import fit
    best_seen = [-math.inf]

    def evaluate(m, epoch):
        if not eval_every_epoch and 0 <= epoch < cfg.max_epoch - 1:
            return {}
        metrics = {f"{split}_{k}": v for split, fn in evaluations.items() for k, v in fn(m).items()}
        if best is not None and epoch >= 0 and best(metrics) > best_seen[0]:
            best_seen[0] = best(metrics)
            if dist.is_main():
                save_weights(m, out / "model_best.safetensors")
        return metrics

    if args.evaluate:
        metrics = evaluate(model, -1)
    else:
        metrics = fit(model, objective, train_set(), cfg, out, evaluate=evaluate, resume=args.resume, device=device,
                      collate_fn=collate_fn)
    if dist.is_main() and metrics:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1))
    dist.cleanup()
    return metrics
