"""Training objectives (one per task) and the glue from a `Config` to a model.

An objective turns a collated batch into named losses; the engine does everything else. Alpha ramps are the
original's: pretraining over its first two epochs, retrieval over its first epoch.
"""
from __future__ import annotations

from dataclasses import fields

from . import load_model
from .models import ModelConfig

MODEL_KEYS = {f.name for f in fields(ModelConfig)}


def model_options(cfg) -> dict:
    """The ModelConfig fields a Config sets (sizes, checkpointing, queue, prompt...)."""
    return {k: getattr(cfg, k) for k in MODEL_KEYS if hasattr(cfg, k)}


def build_model(task, cfg, checkpoint=None):
    """The task model at the config's sizes, initialised from `checkpoint` or cfg.pretrained if set."""
    model = load_model(task, checkpoint or cfg.pretrained or None, **model_options(cfg))
    if cfg.text_grad_ckpt:
        model.set_text_grad_ckpt(True)
    return model


class PretrainObjective:
    def __init__(self, alpha):
        self.alpha = alpha

    def __call__(self, forward, model, batch, epoch, i, n):
        images, captions = batch
        alpha = self.alpha * min(1.0, (epoch * n + i) / (2 * n))
        model.momentum_update()
        return forward(images, captions, alpha=alpha)


class RetrievalObjective:
    def __init__(self, alpha):
        self.alpha = alpha

    def __call__(self, forward, model, batch, epoch, i, n):
        images, captions, idx = batch
        alpha = self.alpha * min(1.0, i / n) if epoch == 0 else self.alpha
        model.momentum_update()
        return forward(images, captions, idx=idx, alpha=alpha)


class CaptionObjective:
    def __call__(self, forward, model, batch, epoch, i, n):
        images, captions = batch[0], batch[1]
        return forward(images, captions)


class VQAObjective:
    def __call__(self, forward, model, batch, epoch, i, n):
        images, questions, answers, weights, counts = batch
        return forward(images, questions, answers=answers, n=counts, weights=weights)


class NLVRObjective:
    def __call__(self, forward, model, batch, epoch, i, n):
        image0, image1, sentences, labels = batch
        return forward(image0, image1, sentences, labels)
