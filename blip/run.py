"""What every entry script does before training: flags → config, distributed init, seeds, output folder,
logging, and (for the offline default) the shapes world generated once."""
from __future__ import annotations

import argparse
import json
import logging
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


def ensure_shapes_world(spec: dict) -> dict:
    """Generate the shapes world described by `spec` (generate_shapes_world's arguments) unless the same
    one is already on disk; rank 0 writes, the others wait."""
    from data.shapes import generate_shapes_world
    out = Path(spec["out_dir"])
    stamp = out / "spec.json"
    if dist.is_main() and not (stamp.exists() and json.loads(stamp.read_text()) == spec):
        generate_shapes_world(**spec)
        stamp.write_text(json.dumps(spec))
    dist.barrier()
    return json.loads((out / "manifest.json").read_text())
