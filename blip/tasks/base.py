"""What a task is: one unit that the shared runner (`blip.training.run`) and engine (`blip.training.engine.fit`) drive.

A task says how its model is built from the config, its training data and collate, its losses for a batch at a
given point of training, what happens once per optimizer step (the momentum update), its evaluations, its
default learning-rate schedule and the metric that picks the best epoch; its own config keys are its `Options`
dataclass (read from the YAML into `cfg.options`, typed and validated; the task reads them as `self.options`).
Nothing else in the library knows a task's name: adding one is a task file, a config and a three-line entry script.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..models.factory import load_model
from ..training import neighbours
from ..models import pretrained
from ..data.negatives import HardNegatives
from ..data.transforms import test_transform, train_transform
from ..training.config import register_options


class Task:
    @dataclass
    class Options:
        """The task's own config keys (none here); a task with keys subclasses this, fields made with
        blip.training.config.option. Registered under the task's `names` when the class is defined."""

    names: tuple[str, ...] = ()   # the config `task` values this task runs (a config without one runs any)
    model_task = ""               # blip.load_model's task
    schedule = "cosine"           # blip.training.optim SCHEDULES name; a config's `schedule:` overrides it
    collate_fn = None             # a fixed DataLoader collate for a task without `collate` (None: torch's default)
    eval_every_epoch = True       # False: evaluate after the last epoch only
    crop_scale = (0.5, 1.0)       # RandomResizedCrop scale unless the config sets crop_scale
    ann_files: dict[str, str] = {}  # dataset name -> annotation file pattern under ann_root ('{}' = the split)
    required_keys: tuple[str, ...] = ()  # config keys the task cannot run without (named when empty)
    find_unused_parameters = False  # some parameters get no gradient in a step: DDP must look for them (a cost)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        register_options(cls.names, cls.Options)

    def __init__(self, cfg):
        if cfg.task and cfg.task not in self.names:
            raise ValueError(f"the config's task is {cfg.task!r}, but {type(self).__name__} runs {self.names}: "
                             f"use the entry script of that task or fix `task:`")
        self.cfg = cfg
        self.options = cfg.options_for(self.Options)

    @property
    def schedule_name(self) -> str:
        return self.cfg.schedule or self.schedule

    # -- model and data -------------------------------------------------------------------------------------------
    def build_model(self):
        """The task model: the checkpoint's stored description (if any), overridden by the config's model keys."""
        options = dict(self.cfg.model)
        init = pretrained.check_init(self.cfg.init)
        if "text" in init and not isinstance(options.get("med_config"), str):
            # the text stack's sizes are the BERT folder's, unless the config gives its own
            options["med_config"] = {**pretrained.text_config(init["text"]), **(options.get("med_config") or {})}
        model = load_model(self.model_task, self.cfg.pretrained or None, **options)
        if init:
            model.init_report = pretrained.init_from_files(model, **init)
        if model.cfg.text_grad_ckpt:
            model.set_text_grad_ckpt(True)
        return model

    def train_transform(self, model):
        cfg = self.cfg
        return train_transform(model.cfg.image_size, scale=tuple(cfg.crop_scale or self.crop_scale), hflip=cfg.hflip,
                               randaugment=cfg.randaugment)

    def test_transform(self, model):
        return test_transform(model.cfg.image_size)

    def ann_file(self, dataset: str, split: str, root: str | None = None) -> str:
        """The annotation file of `dataset`'s `split` under ann_root: the task's known names, and any the config's
        `ann_files` adds (a dataset in a known format needs no code: `ann_files: {mine: 'mine_{}.json'}`)."""
        files = {**self.ann_files, **(self.cfg.ann_files or {})}
        if dataset not in files:
            raise ValueError(f"config key 'dataset': {dataset!r} is not a dataset {type(self).__name__} knows "
                             f"({', '.join(sorted(files))}); name its annotation files with "
                             f"`ann_files: {{{dataset or 'NAME'}: '{dataset or 'NAME'}_{{}}.json'}}`")
        pattern = files[dataset]
        if not isinstance(pattern, str) or "{}" not in pattern:
            raise ValueError(f"config key 'ann_files.{dataset}': {pattern!r} must be a file name with '{{}}' where "
                             f"the split goes (train, val, test)")
        return os.path.join(self.cfg.ann_root if root is None else root, pattern.format(split))

    def train_data(self, model):
        """The training set, or several read together ({stream: dataset}: each micro-step then hands `losses`
        {stream: batch}; the first stream's length makes the epoch; see blip.data.samplers.Streams)."""
        raise NotImplementedError

    def collate(self, model):
        """The DataLoader's collate: samples -> the batch `losses` takes, made in the data workers (the library's
        tasks: a typed batch of tensors, blip.data.batches; `static` when compiled: every text padded to its maximum).
        Several streams: {stream: collate}."""
        return self.collate_fn

    def stream_batch_sizes(self) -> dict | None:
        """Per-rank batch sizes of the streams of a task with several ({stream: batch}; a stream not named: the
        config's batch_size_train)."""
        return None

    @property
    def static(self) -> bool:
        """Batches of fixed shapes (texts padded to the model's maximum length): for `compile`."""
        return bool(self.cfg.compile)

    def image_neighbours(self, model, dataset, out_dir, resume_dir=None):
        """NegCLIP's nearest-neighbour images of the training set (`hard_negatives.images`), or None when off."""
        k = HardNegatives.from_config(getattr(self.options, "hard_negatives", None)).images
        if not k:
            return None
        return neighbours.load_or_build(model, dataset, k, self.test_transform(model), out_dir, resume_dir=resume_dir,
                                        batch_size=self.cfg.test_batch_size, num_workers=self.cfg.num_workers)

    # -- training ---------------------------------------------------------------------------------------------------
    def begin_step(self, model, progress) -> None:
        """Once per optimizer step, before its micro-batches (on the bare model)."""

    def losses(self, forward, batch, progress) -> dict:
        """Named losses of one micro-batch. `forward` is the model to call for gradients (DDP-wrapped on several
        ranks; calling it runs the model's `losses`); `progress` (blip.training.engine.Progress) says where training is."""
        raise NotImplementedError

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluations(self, model, out_dir) -> dict:
        """{split: fn(model) -> metrics}; reported as '<split>_<metric>' ('' reports the metrics as they are)."""
        return {}

    def best(self, metrics: dict) -> float | None:
        """The number that picks the epoch kept as model_best.safetensors (None: keep none)."""
        return None
