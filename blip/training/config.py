"""The typed config of a run, read from YAML: the shared keys, the model's, and the task's own section.

A YAML file is flat, as the original BLIP's (same key names, same meaning). Each key has one owner: `Config` holds
the keys every task shares (data roots, optimisation, batch sizes, precision, checkpointing); the model options are
ModelConfig's own keys, gathered in `Config.model` (only those set); a task's own keys (retrieval's `k_test`,
captioning's `num_beams`, ...) are fields of that task's options dataclass (`Task.Options`, registered under the
task's names in `OPTIONS`), read into `Config.options`, typed and validated like the rest. A new task brings its
keys in its own file: nothing here changes. Defaults are the original values where the original configs agree (or
its code's constants); each configs/*.yaml states its task's values. Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ..models.base import MODEL_KEYS, ModelConfig, PRESETS
from ..precision import PRECISIONS
from .optim import SCHEDULES


@dataclass(frozen=True)
class TrainingConfig:
    """All the engine reads (blip.training.engine, optim, state; blip.data.samplers): the optimizer, the schedule,
    precision, accumulation, checkpointing and the loader's batch, workers and seed. `Config.training()` makes it;
    no task key reaches the loop."""
    seed: int
    num_workers: int
    train_batch_size: int
    max_epoch: int
    schedule: str                       # a SCHEDULES name: the config's, else the task's
    init_lr: float
    min_lr: float
    warmup_lr: float
    lr_decay_rate: float
    warmup_steps: int
    weight_decay: float
    layer_decay: float
    grad_accum_steps: int
    grad_clip: float | None
    loss_weights: dict | None
    precision: str
    compile: bool
    save_every_steps: int
    log_every: int
    record: dict = field(default_factory=dict, compare=False)  # the whole run config, as checkpoints keep it


# task name -> the dataclass of that task's own config keys; a task registers its own (blip.tasks.base.Task, and
# CapFilt in blip.inference.capfilt), importing `blip` registers the library's.
OPTIONS: dict[str, type] = {}


def register_options(names, options_cls: type) -> None:
    """`options_cls` (a dataclass of `option` fields) holds the own keys of the tasks called `names`. Another class
    of the same name replaces it (a module read again); one of another name is refused."""
    for name in names:
        known = OPTIONS.get(name)
        if known is not None and known.__qualname__ != options_cls.__qualname__:
            raise ValueError(f"task {name!r}: options registered twice ({known.__qualname__}, "
                             f"{options_cls.__qualname__})")
        OPTIONS[name] = options_cls


def option(default, *, choices: tuple | None = None, at_least: int | None = None, path: str | None = None, **kw):
    """A config field (a task option's, or Config's own): its default, the values it admits (checked when a config
    is read) and, for a path, what it names ('folder' | 'file': the runner checks it exists before anything is
    written)."""
    metadata = {k: v for k, v in (("choices", choices), ("at_least", at_least), ("path", path)) if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class Config:
    # --- what to run ---------------------------------------------------------------------------
    task: str = ""                      # a registered task name (OPTIONS): pretrain, retrieval, caption, vqa, ...
    seed: int = 42                      # the original's --seed default
    output_dir: str = "output"
    # --- data (original keys) ------------------------------------------------------------------
    image_root: str = option("", path="folder")
    ann_root: str = option("annotation", path="folder")
    dataset: str = ""                   # retrieval: 'coco' | 'flickr'; caption: 'coco' (or a name in ann_files)
    ann_files: dict | None = None       # more datasets in a known format: {name: 'name_{}.json'} ('{}' = the split)
    max_words: int = 30                 # caption words kept by the datasets' pre_caption
    num_workers: int = 4
    shapes: dict | None = None          # data.shapes.generate_shapes_world(**shapes) arguments
    crop_scale: list[float] | None = None  # RandomResizedCrop scale; None: (0.2, 1) pretraining, (0.5, 1) others
    hflip: bool = True                  # off where captions name left/right (the shapes world)
    randaugment: bool = True            # RandAugment(2, 5) in training transforms; off for tiny from-scratch runs
    # --- the model ----------------------------------------------------------------------------
    # Model options are ModelConfig's keys (vit, image_size, med_config, queue_size, ..., and `preset`), written at
    # the top level of a YAML file as the original's. Only those the file or --set gives are kept here: they
    # override a checkpoint's stored description key by key; the rest come from it (or ModelConfig's defaults).
    model: dict = field(default_factory=dict)
    pretrained: str = option("", path="file")  # checkpoint path to initialise from ('' = none)
    init: dict | None = None            # unimodal start (blip.models.pretrained): {vision: FILE|DIR, text: BERT DIR}
    # --- optimisation ----------------------------------------------------------------------------
    init_lr: float = 1e-5
    min_lr: float = 0.0
    warmup_lr: float = 1e-6
    lr_decay_rate: float = 0.9
    warmup_steps: int = 3000
    weight_decay: float = 0.05
    layer_decay: float = 1.0            # visual encoder layer-wise LR decay (BEiT's); 1: off (see optim.build_optimizer)
    max_epoch: int = 5
    batch_size: int = 32                # per GPU, when the task has one batch size
    batch_size_train: int | None = None  # per GPU; None: batch_size
    batch_size_test: int | None = None
    loss_weights: dict | None = None    # e.g. {loss_lm: 0.1}; None: every loss weighs 1, as the original
    grad_accum_steps: int = 1
    grad_clip: float | None = None      # max grad norm; None: no clipping (as the original)
    precision: str = "fp32"             # 'fp32' | 'bf16' | 'fp16' | 'tf32' (blip.precision)
    compile: bool = False               # torch.compile the training forward + backward (static-shape batches)
    schedule: str | None = None         # 'cosine' | 'step' (warmup + step decay); None: the task's default
    deterministic: bool = False         # bit-identical runs and resumes (see blip.training.determinism), at a cost
    save_every_steps: int = 0           # 0: checkpoint at epoch ends only
    log_every: int = 50                 # the original's print_freq
    # --- the task's own keys ------------------------------------------------------------------
    options: Any = None                 # an OPTIONS[task] instance (None: a config without a task)

    def __post_init__(self):
        unknown = sorted(set(self.init or {}) - {"vision", "text"})
        if unknown:
            raise ValueError(f"config key 'init': unknown key(s) {unknown}; known: ['vision', 'text']")
        if self.init and self.pretrained:
            raise ValueError("config keys 'init' and 'pretrained' both set: 'pretrained' is a whole BLIP checkpoint, "
                             "'init' the unimodal start of pretraining from scratch; give one")

    @property
    def train_batch_size(self) -> int:
        return self.batch_size if self.batch_size_train is None else self.batch_size_train

    @property
    def test_batch_size(self) -> int:
        return self.batch_size if self.batch_size_test is None else self.batch_size_test

    def training(self, schedule: str) -> TrainingConfig:
        """The engine's part of this config; `schedule`: the SCHEDULES name the run uses (Task.schedule_name)."""
        own = {f.name for f in dataclasses.fields(TrainingConfig)} - {"train_batch_size", "schedule", "record"}
        return TrainingConfig(**{k: getattr(self, k) for k in own}, train_batch_size=self.train_batch_size,
                              schedule=schedule, record=self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Flat, as the YAML files: the model options and the task's at the top level."""
        d = dataclasses.asdict(self)
        return {**{k: v for k, v in d.items() if k not in ("model", "options")}, **(d["options"] or {}), **d["model"]}

    def options_for(self, options_cls: type):
        """This config's section for a task whose keys are `options_cls`: its own (a config read for that task),
        else the defaults (a config without a task: tests, benchmarks); a config read for another task is refused."""
        if self.options is None:
            return options_cls()
        if not isinstance(self.options, options_cls):
            raise ValueError(f"the config was read for task {self.task!r} ({type(self.options).__qualname__}), "
                             f"not for one with {options_cls.__qualname__}")
        return self.options


# `task` is checked by the task that runs the config (blip.tasks.Task): a new task needs no edit here.
_CHOICES = {"vit": ("base", "large"), "precision": PRECISIONS, "schedule": (None, *SCHEDULES),
            "preset": tuple(PRESETS)}
# counts that divide or size something: 0 would fail far from the config (a ZeroDivisionError in the engine)
_AT_LEAST = {"batch_size": 1, "batch_size_train": 1, "batch_size_test": 1, "grad_accum_steps": 1, "max_epoch": 0,
             "num_workers": 0, "log_every": 1, "save_every_steps": 0, "max_words": 1}
_yaml = YAML(typ="safe")
_CONFIG_KEYS = {f.name for f in dataclasses.fields(Config)} - {"model", "options"}


@dataclasses.dataclass(frozen=True)
class _Schema:
    """Where each key of a config for one task goes: Config, the model's dict, or the task's section."""
    task: str
    options: type | None

    @property
    def option_keys(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.options)} if self.options else {}

    def owner(self, key: str, where: str) -> str:
        if key in _CONFIG_KEYS:
            return "config"
        if key in MODEL_KEYS:
            return "model"
        if key in self.option_keys:
            return "options"
        raise self.unknown(key, where)

    def unknown(self, key: str, where: str) -> ValueError:
        close = difflib.get_close_matches(key, sorted(_CONFIG_KEYS | MODEL_KEYS | set(self.option_keys)), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        owners = sorted(t for t, cls in OPTIONS.items() if key in {f.name for f in dataclasses.fields(cls)})
        if owners and not self.task:
            hint = f": a key of task {', '.join(owners)}; the config names no `task:`"
        elif owners:
            hint = f": task {self.task!r} has no such key (task {', '.join(owners)} has)"
        elif self.task and self.options is None:
            hint += f"; task {self.task!r} is not a known task ({', '.join(sorted(OPTIONS))})"
        return ValueError(f"{where}: unknown config key '{key}'{hint}")

    def hint(self, name: str):
        if name in MODEL_KEYS:
            return str | None if name == "preset" else typing.get_type_hints(ModelConfig)[name]
        if name in _CONFIG_KEYS:
            return typing.get_type_hints(Config)[name]
        return typing.get_type_hints(self.options)[name]

    def rules(self, name: str) -> tuple[tuple | None, int | None]:
        meta = self.option_keys[name].metadata if name in self.option_keys else {}
        return meta.get("choices", _CHOICES.get(name)), meta.get("at_least", _AT_LEAST.get(name))

    def check(self, name: str, value: Any, where: str) -> Any:
        """Light type check; ints are accepted (and converted) where floats are expected."""
        hint = self.hint(name)
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed = tuple(type(None) if a is type(None) else (typing.get_origin(a) or a) for a in args)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = " | ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise TypeError(f"{where}: config key '{name}' expects {names}, got {value!r}")
        choices, at_least = self.rules(name)
        if choices is not None and value not in choices:
            raise ValueError(f"{where}: config key '{name}' must be one of {choices}, got {value!r}")
        if at_least is not None and value is not None and value < at_least:
            raise ValueError(f"{where}: config key '{name}' must be at least {at_least}, got {value!r}")
        return value


def _set(values: dict[str, Any], key: str, value: Any, where: str, schema: _Schema) -> None:
    """Set `key` (or `field.subkey` inside a dict-valued field such as med_config) in its owner's dict."""
    name, _, sub = key.partition(".")
    values = values[schema.owner(name, where)]
    if not sub:
        values[name] = schema.check(name, value, where)
        return
    node = values.get(name)
    if node is None:
        node = values[name] = {}
    if not isinstance(node, dict):
        raise TypeError(f"{where}: '{key}': config key '{name}' holds {node!r}, not a mapping")
    *parents, leaf = sub.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as YAML ('1e-4' float, 'true' bool, '[a, b]').

    Quote strings whose edges matter: prompt='a photo of ' (YAML drops a plain trailing space).
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set: expected KEY=VALUE, got {text!r}")
    return key.strip(), _yaml.load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (None: defaults only), then apply `key=value` overrides in order. The task (the file's
    `task:`, or a `--set task=...`) says whose own keys the config may hold: they go to `Config.options`."""
    data = {}
    if path is not None:
        data = _yaml.load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of keys to values")
    sets = [parse_override(text) for text in overrides]
    task = next((v for k, v in reversed(sets) if k == "task"), data.get("task", ""))
    schema = _Schema(str(task or ""), OPTIONS.get(task) if isinstance(task, str) else None)
    defaults = Config()
    config = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(Config)}
    values = {"config": config, "model": config["model"], "options": {}}
    for key, value in data.items():
        owner = schema.owner(str(key), str(path))
        values[owner][key] = schema.check(key, value, str(path))
    for key, value in sets:
        _set(values, key, value, "--set", schema)
    options = schema.options(**values["options"]) if schema.options else None
    return Config(**{**config, "options": options})


def config_to_yaml(cfg: Config) -> str:
    y = YAML(typ="safe")
    y.default_flow_style = False
    buf = io.StringIO()
    y.dump(cfg.to_dict(), buf)
    return buf.getvalue()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_to_yaml(cfg))


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every entry script shares."""
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/caption_coco.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[],
                        metavar="KEY=VALUE", help="override config keys, e.g. --set init_lr=1e-4")
    parser.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    parser.add_argument("--resume", default=None, help="checkpoint to resume, or 'latest'")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output folder that holds a run: the old one is moved aside "
                             "(DIR.old-TIME), never deleted")
    parser.add_argument("--debug", action="store_true", help="a bad input raises with its traceback")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (= --set compile=true)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """load_config from the parsed flags of add_config_args (with --output-dir applied)."""
    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if getattr(args, "compile", False):
        cfg.compile = True
    return cfg
