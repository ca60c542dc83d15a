"""Checkpoints: the original BLIP `.pth`, transformers' BLIP layout, and our safetensors.

Loading maps a foreign layout onto our names (which are the original's), resizes the ViT position
embeddings to the model's grid, twins NLVR2's cross-attention from a single-image checkpoint, then loads
and reports what is missing or unexpected. A weight of another shape is refused, naming every such key and
both shapes (the original's loader dropped it and left it random); the two exceptions the original relies on
are logged as warnings: pos_embed resized to the model's grid, and the VQA answer decoder's cross-attention
K/V started fresh when the checkpoint's read another width. Missing weights are an error unless they are the
task's fresh heads (`model.fresh_keys`); unexpected ones (a pretrained checkpoint carries heads this task
lacks) are reported. Missing momentum weights start as copies of the online ones. Pickles are read with
`weights_only=True`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from .vit import resize_pos_embed

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    pass


# transformers' BLIP vision names <-> ours (timm's = the original's). `N` stands for a block index; a name
# without a trailing dot is a whole key.
_HF_VISION = [
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.encoder.layers.N.self_attn.qkv.", "visual_encoder.blocks.N.attn.qkv."),
    ("vision_model.encoder.layers.N.self_attn.projection.", "visual_encoder.blocks.N.attn.proj."),
    ("vision_model.encoder.layers.N.layer_norm1.", "visual_encoder.blocks.N.norm1."),
    ("vision_model.encoder.layers.N.layer_norm2.", "visual_encoder.blocks.N.norm2."),
    ("vision_model.encoder.layers.N.mlp.", "visual_encoder.blocks.N.mlp."),
    ("vision_model.post_layernorm.", "visual_encoder.norm."),
]


def _rules(pairs):
    """(source, target) name pairs -> compiled (pattern, replacement) rules."""
    rules = []
    for src, dst in pairs:
        pat = "^" + re.escape(src).replace("N", r"(\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(pat), dst.replace("N", r"\1")))
    return rules


_FROM_HF = _rules(_HF_VISION)
_TO_HF = _rules([(ours, hf) for hf, ours in _HF_VISION])


def _rename(sd: dict, rules) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if pat.search(k):
                k = pat.sub(rep, k)
                break
        out[k] = v
    return out


def is_transformers_layout(sd: dict) -> bool:
    return any(k.startswith("vision_model.") for k in sd)


def from_transformers_keys(sd: dict) -> dict:
    """transformers' BLIP names -> ours (the text stacks already share BERT's names)."""
    return _rename(sd, _FROM_HF)


def to_transformers_keys(sd: dict) -> dict:
    """Our (original) names -> transformers' BLIP names."""
    return _rename(sd, _TO_HF)


TRAINING_WEIGHTS = ("model_best.safetensors", "checkpoint_latest.pt")  # a training folder's, in order of preference


def resolve_checkpoint(src):
    """A training output folder -> its best epoch's weights (model_best.safetensors), else its latest training
    state (checkpoint_latest.pt); anything else unchanged."""
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        for name in TRAINING_WEIGHTS:
            if (Path(src) / name).exists():
                return Path(src) / name
    return src


def read_state_dict(src) -> tuple[dict, dict]:
    """A checkpoint (path, training folder, transformers directory or dict) -> (state dict in our names,
    metadata). A training state (checkpoint_latest.pt) gives its model's weights."""
    meta = {}
    src = resolve_checkpoint(src)
    if isinstance(src, dict):
        sd = src
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir():  # transformers' save_pretrained directory
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
            if not files:
                raise CheckpointMismatchError(f"{path}: no *.safetensors or pytorch_model*.bin inside")
            sd = {}
            for f in files:
                sd.update(_read_file(f)[0])
            cfg_file = path / "config.json"
            if cfg_file.exists():
                meta["transformers_config"] = json.loads(cfg_file.read_text())
        else:
            sd, meta = _read_file(path)
    if "model" in sd and isinstance(sd["model"], dict):  # the original {'model': state_dict, ...}
        sd = sd["model"]
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if is_transformers_layout(sd):
        sd = from_transformers_keys(sd)
    return sd, meta


def read_metadata(path) -> dict:
    """The model description a checkpoint carries (our safetensors metadata, a training state's task and model
    config, a transformers config.json), without reading its tensors into memory."""
    path = Path(resolve_checkpoint(path))
    if path.suffix == ".pt" and path.is_file():
        return _training_state_metadata(path)
    if path.is_dir() and (path / "config.json").exists():
        return {"transformers_config": json.loads((path / "config.json").read_text())}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return json.loads(meta["blip"]) if "blip" in meta else {}
    return {}


def _training_state_metadata(path: Path) -> dict:
    """{task, model_config} of a training state (blip.training.engine's checkpoint_latest.pt; one written before they were
    stored: from its config's task and model keys); {} for any other .pt."""
    try:  # mapped, not read: the optimizer's state may be twice the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}  # not ours (an original .pth saved as .pt, ...): read_state_dict says what is wrong with it
    if not isinstance(state, dict) or "progress" not in state or "model" not in state:
        return {}
    if "task" in state:
        return {"task": state["task"], "model_config": state["model_config"]}
    from .base import MODEL_KEYS
    from . import PRESETS, TASKS
    config = state.get("config") or {}
    keys = {k: v for k, v in config.items() if k in MODEL_KEYS and k != "preset"}
    meta = {"model_config": {**PRESETS.get(config.get("preset"), {}), **keys}}
    if config.get("task") in TASKS:
        meta["task"] = config["task"]
    return meta


def _read_file(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if "blip" in meta:
            meta = json.loads(meta["blip"])
            for k, src in meta.get("aliases", {}).items():  # tied weights were stored once
                sd[k] = sd[src]
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: not a readable checkpoint ({_load_failure(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj, {}


def _load_failure(e: Exception) -> str:
    """torch.load's reason in one line: its weights_only refusal is a page of advice around the one fact that
    matters (which class the pickle holds); any other reason: its first line, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found.group(1)}, not only tensors: save a state dict instead"
    return f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


# Cross-attention that reads text states, not the image (a model class's `text_context_cross_attention`): the VQA
# answer decoder attends to the question
# encoder, so it stays text-wide beside any ViT. A checkpoint whose decoder read an image of another width
# (a ViT-L pretraining checkpoint) has image-wide K/V there: those start fresh (the original's loader relies
# on this). Every other cross-attention reads the image, so a K/V of another width means another vision width.
_CROSS_KV = re.compile(r"encoder\.layer\.\d+\.crossattention\.self\.(key|value)\.weight$")


def _fresh_cross_kv(model, key: str, have: torch.Size, want: torch.Size) -> bool:
    """True when `key` is a text-reading cross-attention K/V weight of the model's width (out features) whose
    checkpoint tensor reads states of another width: it is dropped and starts fresh."""
    prefixes = getattr(model, "text_context_cross_attention", ())
    return (any(key.startswith(p) and _CROSS_KV.fullmatch(key[len(p):]) for p in prefixes)
            and len(have) == len(want) == 2 and have[0] == want[0])


def _shape(t) -> list:
    return list(t.shape)


def adapt_state_dict(model, sd: dict, dropped: list | None = None, mismatched: list | None = None) -> dict:
    """Fit a state dict (our names) to `model`: drop position_ids buffers, resize pos_embed, twin NLVR2
    cross-attention, tie shared keys, then check shapes.

    A weight whose shape differs from the model's is refused (CheckpointMismatchError naming every such key
    and both shapes), except (1) `visual_encoder(_m).pos_embed` of another grid, resized (warning), and (2) the
    VQA answer decoder's cross-attention K/V weights stored for another context width, dropped to start fresh
    (warning; appended to `dropped`). With a `mismatched` list, refused weights are not raised but dropped
    (never loaded) and appended to it as (key, checkpoint shape, model shape).
    """
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
    original_shapes = {}
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            old, new = sd[key].shape, own[key].shape
            grid = int(round((old[1] - 1) ** 0.5))
            if len(old) == 3 and old[0] == 1 and old[2] == new[2] and grid * grid == old[1] - 1:
                sd[key] = resize_pos_embed(sd[key], new[1] - 1)
                log.warning("resized %s from %s to the model's grid: %s", key, tuple(old), tuple(sd[key].shape))
            original_shapes[key] = old  # a width or layout that no resize fits: refused below
    if any(".crossattention.self0." in k for k in own) and not any(".crossattention.self0." in k for k in sd):
        for k in list(sd):  # a single-image checkpoint into NLVR2: both branches start from it
            if ".crossattention.self." in k:
                for i in "01":
                    sd.setdefault(k.replace(".crossattention.self.", f".crossattention.self{i}."), sd[k])
            if ".crossattention.output.dense." in k:
                for i in "01":
                    sd.setdefault(k.replace(".crossattention.output.dense.", f".crossattention.output.dense{i}."),
                                  sd[k])
    # tied weights (LM head = word embeddings; pretraining's decoder = encoder) may be stored once
    for group in _alias_groups(own):
        present = [k for k in group if k in sd]
        for k in group:
            if present and k not in sd:
                sd[k] = sd[present[0]]
    fresh, refused = [], []
    for k in list(sd):
        if k in own and sd[k].shape != own[k].shape:
            if _fresh_cross_kv(model, k, sd[k].shape, own[k].shape):
                fresh.append((k, _shape(sd[k]), _shape(own[k])))
            else:
                refused.append((k, list(original_shapes.get(k, sd[k].shape)), _shape(own[k])))
            del sd[k]
    if fresh:
        log.warning("%d cross-attention K/V weight(s) of the %r model read states of another width than the "
                    "checkpoint's and start fresh: %s", len(fresh), getattr(model, "task", ""),
                    _shape_list(fresh))
        if dropped is not None:
            dropped += [k for k, _, _ in fresh]
    if refused:
        if mismatched is None:
            raise CheckpointMismatchError(_shape_message("the checkpoint", model, refused))
        mismatched += refused
    return sd


def _shape_message(name, model, refused) -> str:
    return (f"{name} does not fit the {getattr(model, 'task', '')!r} model: {len(refused)} weight(s) of another "
            f"shape (another model size?): " + _shape_list(refused))


def _shape_list(items) -> str:
    return "; ".join(f"{k} (checkpoint {a}, model {b})" for k, a, b in items)


def load_into(model, src, strict: bool | None = None) -> dict:
    """Load a checkpoint into `model`.

    Shapes (every mode): a tensor of another shape is never loaded. strict=True or None refuse it
    (CheckpointMismatchError naming each key and both shapes), except the resized pos_embed and the VQA answer
    decoder's fresh cross-attention K/V (see `adapt_state_dict`); strict=False leaves it as initialised and
    reports it under 'mismatched'.
    Keys: strict=True: nothing missing or unexpected; None (default): missing keys allowed only among the task's
    fresh heads and the fresh K/V, unexpected keys reported; False: report only.
    Momentum weights absent from the checkpoint start as copies of their (loaded) online counterparts; those
    present keep their checkpoint values.
    Returns {'missing': [...], 'unexpected': [...], 'mismatched': [(key, ckpt shape, model shape)], 'meta': {}}.
    """
    sd, meta = read_state_dict(src)
    name = src if isinstance(src, (str, Path)) else "state dict"
    dropped, mismatched = [], []
    sd = adapt_state_dict(model, sd, dropped, mismatched)
    if mismatched:
        if strict is not False:
            raise CheckpointMismatchError(_shape_message(name, model, mismatched))
        log.warning("%s: %d weight(s) of another shape NOT loaded (left as initialised): %s", name, len(mismatched),
                    _shape_list(mismatched))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict is not False:
        bad_missing = missing if strict else [k for k in missing if k not in dropped
                                              and not any(f in k for f in model.fresh_keys)]
        bad_unexpected = unexpected if strict else []
        if bad_missing or bad_unexpected or not set(sd) & set(own):
            raise CheckpointMismatchError(
                f"{name} does not fit the {model.task!r} model: {len(bad_missing)} missing key(s) "
                f"{_head(bad_missing)}, {len(unexpected)} unexpected key(s) {_head(unexpected)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing:
        log.info("%s: %d weights not in the checkpoint (fresh): %s", name, len(missing), _head(missing))
        copied = _copy_missing_momentum(model, missing)
        if copied:
            log.info("%s: %d momentum weight(s) start as copies of the online ones", name, len(copied))
    if unexpected:
        log.info("%s: %d checkpoint weights unused by %r: %s", name, len(unexpected), model.task, _head(unexpected))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "meta": meta}


@torch.no_grad()
def _copy_missing_momentum(model, missing) -> list:
    """Each missing momentum weight (`<name>_m.…` of a momentum encoder) := its online `<name>.…`; weights
    the checkpoint had are left alone."""
    names = set(getattr(model, "_momentum_names", ()))
    own = model.state_dict()
    copied = []
    for k in missing:
        head, _, rest = k.partition(".")
        if head.endswith("_m") and head[:-2] in names:
            online = f"{head[:-2]}.{rest}" if rest else head[:-2]
            if online in own and own[online].shape == own[k].shape:
                own[k].copy_(own[online])
                copied.append(k)
    return copied


def _head(keys, n=8):
    return keys[:n] + (["..."] if len(keys) > n else [])


def _alias_groups(sd: dict) -> list[list[str]]:
    groups = {}
    for k, v in sd.items():
        groups.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def dedup_state_dict(model) -> tuple[dict, dict]:
    """(state dict with each shared tensor once, {dropped key: the key holding its tensor}): safetensors
    refuses aliases, and the alias map lets a model that lacks the kept key still find its weights."""
    kept, out, aliases = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in kept:
            aliases[k] = kept[key]
            continue
        kept[key] = k
        out[k] = v.detach().contiguous()
    return out, aliases


def atomic_write(path, write_fn):
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_identity(path) -> list:
    """[absolute path, size, mtime_ns]: which file, as it is now (a file rewritten in place is another one)."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def move_aside(path) -> Path:
    """Rename a file or folder to `NAME.old-YYYYmmdd-HHMMSS` (a file keeps its extension last: caps.old-….jsonl;
    a counter is added if the name is taken). Refusing or moving, never deleting: nothing earlier is lost."""
    import time
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem, ext = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    aside, n = path.with_name(f"{stem}.old-{stamp}{ext}"), 1
    while aside.exists():
        aside, n = path.with_name(f"{stem}.old-{stamp}-{n}{ext}"), n + 1
    path.rename(aside)
    return aside


def save_weights(model, path):
    """Our format: safetensors with the task and model config in its metadata."""
    from safetensors.torch import save_file
    sd, aliases = dedup_state_dict(model)
    meta = {"blip": json.dumps({"task": model.task, "model_config": model.cfg.to_dict(), "aliases": aliases})}
    sd = {k: v.cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
