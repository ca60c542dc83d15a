"""Checkpoints: the original BLIP `.pth`, transformers' BLIP layout, and our safetensors.

Loading maps a foreign layout onto our names (which are the original's), resizes the ViT position
embeddings to the model's grid, twins NLVR2's cross-attention from a single-image checkpoint, then loads
and reports what is missing or unexpected. Missing weights are an error unless they are the task's fresh
heads (`model.fresh_keys`); unexpected ones (a pretrained checkpoint carries heads this task lacks) are
reported. Pickles are read with `weights_only=True`.
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


def read_state_dict(src) -> tuple[dict, dict]:
    """A checkpoint (path, directory or dict) -> (state dict in our names, metadata)."""
    meta = {}
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
    """The model description a checkpoint carries (our safetensors metadata, a transformers config.json),
    without reading its tensors."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return {"transformers_config": json.loads((path / "config.json").read_text())}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return json.loads(meta["blip"]) if "blip" in meta else {}
    return {}


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
        raise CheckpointMismatchError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj, {}


def adapt_state_dict(model, sd: dict, dropped: list | None = None) -> dict:
    """Fit a state dict (our names) to `model`: drop position_ids buffers, resize pos_embed, twin NLVR2
    cross-attention, tie shared keys, drop keys whose shapes still differ (logged, and appended to `dropped`)."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            sd[key] = resize_pos_embed(sd[key], own[key].shape[1] - 1)
            log.info("resized %s to %s", key, tuple(sd[key].shape))
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
    for k in list(sd):
        if k in own and sd[k].shape != own[k].shape:
            log.warning("dropping %s: checkpoint shape %s, model shape %s", k, tuple(sd[k].shape),
                        tuple(own[k].shape))
            del sd[k]
            if dropped is not None:
                dropped.append(k)
    return sd


def load_into(model, src, strict: bool | None = None) -> dict:
    """Load a checkpoint into `model`. strict=True: nothing missing or unexpected; None (default): missing
    keys allowed only among the task's fresh heads and the weights dropped for another shape, unexpected keys
    reported; False: report only. Returns {'missing': [...], 'unexpected': [...], 'meta': {...}}."""
    sd, meta = read_state_dict(src)
    dropped = []
    sd = adapt_state_dict(model, sd, dropped)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    name = src if isinstance(src, (str, Path)) else "state dict"
    if strict is not False:
        # as the original's loader, a weight stored with another shape starts fresh (e.g. the VQA answer
        # decoder's text-wide cross-attention K/V from a ViT-L pretraining decoder's image-wide ones)
        bad_missing = missing if strict else [k for k in missing if k not in dropped
                                              and not any(f in k for f in model.fresh_keys)]
        bad_unexpected = unexpected if strict else []
        loaded = set(sd) & set(own)
        if bad_missing or bad_unexpected or not loaded or len(dropped) > len(loaded):
            raise CheckpointMismatchError(
                f"{name} does not fit the {model.task!r} model: {len(bad_missing)} missing key(s) "
                f"{_head(bad_missing)}, {len(unexpected)} unexpected key(s) {_head(unexpected)}"
                + (f", {len(dropped)} key(s) of another shape {_head(dropped)} (another model size?)"
                   if dropped else ""))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing:
        log.info("%s: %d weights not in the checkpoint (fresh): %s", name, len(missing), _head(missing))
        if hasattr(model, "copy_params") and any("_m." in k for k in missing):
            model.copy_params()  # momentum encoders start as copies of the loaded online ones
    if unexpected:
        log.info("%s: %d checkpoint weights unused by %r: %s", name, len(unexpected), model.task, _head(unexpected))
    return {"missing": missing, "unexpected": unexpected, "meta": meta}


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


def save_weights(model, path):
    """Our format: safetensors with the task and model config in its metadata."""
    from safetensors.torch import save_file
    sd, aliases = dedup_state_dict(model)
    meta = {"blip": json.dumps({"task": model.task, "model_config": model.cfg.to_dict(), "aliases": aliases})}
    sd = {k: v.cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
