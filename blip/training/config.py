"""One flat, typed config for every task, read from YAML.

`Config` holds the union of the original BLIP YAML keys (same names, same meaning) plus ours; the model options
are ModelConfig's own keys, gathered in `Config.model` (only those set), never repeated here.
Defaults are the original values where the original configs agree (or its code's constants);
each configs/*.yaml states its task's values. Unknown keys are errors, never silently ignored.
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


@dataclass
class Config:
    # --- what to run ---------------------------------------------------------------------------
    task: str = ""                      # pretrain | retrieval | caption | nocaps | vqa | nlvr | capfilt (checked)
    seed: int = 42                      # the original's --seed default
    output_dir: str = "output"
    # --- data (original keys) ------------------------------------------------------------------
    image_root: str = ""
    ann_root: str = "annotation"
    dataset: str = ""                   # retrieval: 'coco' | 'flickr'; caption: 'coco' (or a name in ann_files)
    ann_files: dict | None = None       # more datasets in a known format: {name: 'name_{}.json'} ('{}' = the split)
    train_file: list[str] = field(default_factory=list)   # pretraining JSON files
    text_file: list[str] = field(default_factory=list)    # X-FM's text stream: JSON lists of {caption}, or .txt files
    image_file: list[str] = field(default_factory=list)   # X-FM's image stream: JSON lists of {image}
    laion_path: str = ""
    train_num_samples: int | None = None  # shards: samples per epoch (None: counted once), as open_clip's flag
    shard_shuffle_buffer: int = 1000    # shards: samples in the seeded shuffle buffer
    dataset_resampled: bool = False     # shards: draw shards with replacement (every rank the same steps)
    train_files: list[str] = field(default_factory=list)  # VQA: vqa_train, vqa_val, vg_qa
    vqa_root: str = ""
    vg_root: str = ""
    coco_gt_root: str = ""
    max_words: int = 30                 # caption words kept by the datasets' pre_caption
    num_workers: int = 4
    shapes: dict | None = None          # data.shapes.generate_shapes_world(**shapes) arguments
    shapes_ve: dict | None = None       # data.shapes_ve.generate_ve_set(**shapes_ve) arguments (train_ve.py)
    crop_scale: list[float] | None = None  # RandomResizedCrop scale; None: (0.2, 1) pretraining, (0.5, 1) others
    hflip: bool = True                  # off where captions name left/right (the shapes world)
    randaugment: bool = True            # RandAugment(2, 5) in training transforms; off for tiny from-scratch runs
    # --- the model ----------------------------------------------------------------------------
    # Model options are ModelConfig's keys (vit, image_size, med_config, queue_size, ..., and `preset`), written at
    # the top level of a YAML file as the original's. Only those the file or --set gives are kept here: they
    # override a checkpoint's stored description key by key; the rest come from it (or ModelConfig's defaults).
    model: dict = field(default_factory=dict)
    xfm: dict | None = None             # X-FM's sizes: XFMConfig keys over the `preset` (blip.models.xfm)
    pretrained: str = ""                # checkpoint path to initialise from ('' = none)
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
    batch_size_streams: dict | None = None  # per GPU, per stream of a task that reads several (X-FM: {text: 64});
    #                                     a stream not named: batch_size_train
    loss_weights: dict | None = None    # e.g. {loss_lm: 0.1}; None: every loss weighs 1, as the original
    grad_accum_steps: int = 1
    grad_clip: float | None = None      # max grad norm; None: no clipping (as the original)
    precision: str = "fp32"             # 'fp32' | 'bf16' | 'fp16' | 'tf32' (blip.precision)
    compile: bool = False               # torch.compile the training forward + backward (static-shape batches)
    schedule: str | None = None         # 'cosine' | 'step' (warmup + step decay); None: the task's default
    deterministic: bool = False         # bit-identical runs and resumes (see blip.training.determinism), at a cost
    save_every_steps: int = 0           # 0: checkpoint at epoch ends only
    log_every: int = 50                 # the original's print_freq
    # --- contrastive / momentum ------------------------------------------------------------------
    alpha: float = 0.4
    hard_negatives: dict | None = None  # NegCLIP: {captions: 3, images: 3} in retrieval/pretraining (blip.data.negatives)
    # --- evaluation / generation ---------------------------------------------------------------
    k_test: int = 256
    rerank_precision: str = "fp32"      # retrieval evaluation's ITM re-rank: 'fp32' (the original) | 'bf16' | 'tf32'
    max_length: int = 20
    min_length: int = 5
    num_beams: int = 3
    repetition_penalty: float = 1.0     # the NoCaps script uses 1.1
    meteor: bool = True                 # caption evaluation scores METEOR (a Java process, ~10 s a call)
    score_captions: bool = True         # caption evaluation scores its captions (PTB tokenizer: Java); false: the
    #                                     result files only (a machine without Java, e.g. a GPU image)
    inference: str = "rank"             # VQA: 'rank' | 'generate'
    # --- CapFilt (capfilt.py): captioner + filter over web pairs -----------------------------------
    captioner: str = ""                 # caption checkpoint writing the synthetic captions
    filter: str = ""                    # ITM checkpoint scoring every text against its image
    filter_task: str = "retrieval"      # the filter's ITM first token: 'retrieval' [ENC] | 'itm' [CLS]
    num_captions: int = 1               # synthetic captions per image (nucleus sampling)
    top_p: float = 0.9
    filter_threshold: float = 0.5       # keep a text when its ITM match probability >= this
    shard_size: int = 1000              # pairs per resumable work unit
    noise_file: str = ""                # optional per-pair booleans (True = wrong caption): filter P/R

    def __post_init__(self):
        from ..data.negatives import HardNegatives
        HardNegatives.from_config(self.hard_negatives)  # a misspelled option is refused here, with its name
        bad = {k: v for k, v in (self.batch_size_streams or {}).items()
               if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"config key 'batch_size_streams': batch sizes are positive integers, got {bad}")
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
        """Flat, as the YAML files: the model options at the top level."""
        d = dataclasses.asdict(self)
        return {**{k: v for k, v in d.items() if k != "model"}, **d["model"]}


# `task` is checked by the task that runs the config (blip.tasks.Task): a new task needs no edit here.
_CHOICES = {"vit": ("base", "large"), "precision": PRECISIONS, "rerank_precision": PRECISIONS,
            "inference": ("rank", "generate"), "filter_task": ("retrieval", "itm"),
            "schedule": (None, *SCHEDULES), "preset": tuple(PRESETS)}
# counts that divide or size something: 0 would fail far from the config (a ZeroDivisionError in the engine)
_AT_LEAST = {"batch_size": 1, "batch_size_train": 1, "batch_size_test": 1, "grad_accum_steps": 1, "max_epoch": 0,
             "num_workers": 0, "log_every": 1, "save_every_steps": 0, "shard_size": 1, "k_test": 1, "num_beams": 1,
             "num_captions": 1, "max_words": 1}
_yaml = YAML(typ="safe")
_CONFIG_KEYS = {f.name for f in dataclasses.fields(Config)} - {"model"}


def _hints(name: str):
    if name in MODEL_KEYS:
        return str | None if name == "preset" else typing.get_type_hints(ModelConfig)[name]
    return typing.get_type_hints(Config)[name]


def _allowed_types(name: str) -> tuple[type, ...]:
    hint = _hints(name)
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(type(None) if a is type(None) else (typing.get_origin(a) or a) for a in args)


def _check(name: str, value: Any, where: str) -> Any:
    """Light type check; ints are accepted (and converted) where floats are expected."""
    allowed = _allowed_types(name)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = " | ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise TypeError(f"{where}: config key '{name}' expects {names}, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"{where}: config key '{name}' must be one of {_CHOICES[name]}, got {value!r}")
    if name in _AT_LEAST and value is not None and value < _AT_LEAST[name]:
        raise ValueError(f"{where}: config key '{name}' must be at least {_AT_LEAST[name]}, got {value!r}")
    return value


def _unknown(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, sorted(_CONFIG_KEYS | MODEL_KEYS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"{where}: unknown config key '{key}'{hint}")


def _set(values: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `key` (or `field.subkey` inside a dict-valued field such as med_config); model keys go to 'model'."""
    name, _, sub = key.partition(".")
    if name in MODEL_KEYS:
        values = values["model"]
    elif name not in _CONFIG_KEYS:
        raise _unknown(name, where)
    if not sub:
        values[name] = _check(name, value, where)
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
    """Read a YAML config (None: defaults only), then apply `key=value` overrides in order."""
    values = dataclasses.asdict(Config())
    if path is not None:
        data = _yaml.load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of keys to values")
        for key, value in data.items():
            target = values["model"] if key in MODEL_KEYS else values
            if key not in _CONFIG_KEYS and key not in MODEL_KEYS:
                raise _unknown(str(key), str(path))
            target[key] = _check(key, value, str(path))
    for text in overrides:
        _set(values, *parse_override(text), where="--set")
    return Config(**values)


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
