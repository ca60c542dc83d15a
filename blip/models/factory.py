"""Build a task model and load a checkpoint into it: `blip.load_model` (timm's create_model, for BLIP)."""
from __future__ import annotations

import logging
from pathlib import Path

from . import TASKS
from .base import ModelConfig
from .checkpoint import load_into, read_metadata, resolve_checkpoint
from .transformers_layout import config_from_transformers


def load_model(task: str | None = None, checkpoint=None, strict: bool | None = None, **overrides):
    """Build a task model (sizes from `overrides`, see ModelConfig) and load `checkpoint` into it.

    checkpoint: None (random init), a path (original .pth, our .safetensors, a training output folder — its
    model_best.safetensors, else its checkpoint_latest.pt —, a training state checkpoint_latest.pt, a transformers
    directory or file) or a state dict; the layout is detected. Ours carry their task and model description;
    `overrides` (ModelConfig keys, and `preset`: a name in blip.models.PRESETS) change it key by key. task None:
    the task the checkpoint names; another task than it names loads only if the weights fit (a warning says so).
    The model is returned in eval mode.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    stored_task = None if checkpoint is None or isinstance(checkpoint, dict) else _stored_task(checkpoint)
    if task is None:
        if stored_task is None:
            raise ValueError(f"{checkpoint if checkpoint is not None else 'no checkpoint'}: names no task; "
                             f"give one of {sorted(TASKS)}")
        task = stored_task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if stored_task not in (None, task) and not getattr(TASKS.get(stored_task), "starts_every_task", False):
        logging.getLogger(__name__).warning("%s was saved as a %r model; loading it as %r", checkpoint,
                                            stored_task, task)
    description = getattr(TASKS[task], "config_class", ModelConfig)  # X-FM's sizes are its own (XFMConfig)
    model = TASKS[task](description.from_overrides(stored_description(checkpoint, task), **overrides))
    if checkpoint is not None:
        load_into(model, checkpoint, strict=strict)
    elif hasattr(model, "copy_params"):
        model.copy_params()
    return model.eval()


def _existing(checkpoint):
    if not Path(checkpoint).exists():  # before building a model that may take seconds
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return checkpoint


def _stored_task(checkpoint) -> str | None:
    return read_metadata(_existing(checkpoint)).get("task")


def stored_description(checkpoint, task: str | None = None) -> dict:
    """The ModelConfig options a checkpoint carries (our safetensors, a training state, a transformers
    directory); {} if none."""
    if checkpoint is None or isinstance(checkpoint, dict):
        return {}
    meta = read_metadata(_existing(checkpoint))
    if "model_config" in meta:
        return meta["model_config"]
    if "transformers_config" in meta:
        return config_from_transformers(meta["transformers_config"], task)
    return {}

