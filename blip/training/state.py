"""A training run's state on disk: model, optimizer, scaler, progress and every rank's RNG streams, written
atomically with the one before it kept as checkpoint_previous.pt; read back for an exact resume."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..models.checkpoint import CheckpointMismatchError, atomic_write

log = logging.getLogger(__name__)


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


def save_training_state(path, model, optimizer, scaler, progress, config: dict):
    """Everything needed to continue exactly: called on every rank (RNG states are gathered), rank 0 writes.
    The checkpoint it replaces is kept as checkpoint_previous.pt, a fallback should the latest be damaged later
    (a full disk, a copy cut short). `config`: the whole run config (TrainingConfig.record), as config.yaml holds it."""
    rngs = dist.all_gather_object(_rng_state())
    if dist.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "progress": progress, "rng": rngs, "config": config,
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
