"""transformers' BLIP layout: its config as ModelConfig options (every field honoured, refused or ignored by
name), its weights in and ours out (`blip.from_transformers`, `blip.to_transformers`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import DEC_ID, PAD_ID, SEP_ID, VOCAB_SIZE
from .base import ModelConfig
from .checkpoint import dedup_state_dict, load_into, to_transformers_keys


# transformers' BlipConfig fields, each honoured (mapped to ModelConfig / med_config), refused unless it has the
# one value our model computes, or ignored (no effect on the three classes' outputs or shapes). The README's
# "Loading rules" lists the same.
_HF_VISION = {"hidden_size": "vision_width", "num_hidden_layers": "vision_depth",
              "num_attention_heads": "vision_heads", "intermediate_size": "vision_intermediate_size",
              "image_size": "image_size", "patch_size": "patch_size", "layer_norm_eps": "vision_layer_norm_eps"}
_HF_TEXT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")
_HF_VISION_FIXED = {"hidden_act": ("gelu", "our ViT's MLP uses exact GELU"),
                    "attention_dropout": (0.0, "our ViT has no attention dropout")}
_HF_TEXT_FIXED = {"hidden_act": ("gelu", "our text stack uses exact GELU"),
                  "is_decoder": (True, "every BLIP text layer has cross-attention"),
                  "pad_token_id": (0, "our tokenizer's [PAD] is 0"),
                  "bos_token_id": (30522, "our tokenizer's [DEC] is 30522"),
                  "sep_token_id": (102, "our tokenizer's [SEP] (end of a generated text) is 102")}
# ignored: vision projection_dim, initializer_range; text encoder_hidden_size (BlipConfig sets it to the vision
# width), projection_dim, initializer_range, use_cache, eos_token_id (generate drops it), label_smoothing (the
# training loss; ours is the original's 0.1); top-level projection_dim and logit_scale_init_value (BlipModel
# only), label_smoothing, initializer_factor, initializer_range; PretrainedConfig's generic fields.


def _refuse(field, value, why):
    raise ValueError(f"transformers config: {field}={value!r} cannot be represented by blip ({why}); not loaded")


def config_from_transformers(cfg, task: str | None = None) -> dict:
    """ModelConfig overrides from a transformers BlipConfig (object or config.json dict). Every field that sets a
    shape or a computation is honoured; one our model cannot represent raises ValueError naming it.
    `task` (or the config's `architectures`) adds the checks of that class (VQA: one width for both towers)."""
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    arch = (cfg.get("architectures") or [None])[0]
    from transformers import BlipConfig  # a config.json holds only the non-default values: complete them
    cfg = BlipConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}).to_dict()
    v, t = cfg["vision_config"], cfg["text_config"]
    out = {}
    for field in ("image_size", "patch_size"):
        value = v[field]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                _refuse(f"vision_config.{field}", value, "our ViT is square")
            v[field] = value[0]
    for field, (want, why) in _HF_VISION_FIXED.items():
        if v[field] != want:
            _refuse(f"vision_config.{field}", v[field], why)
    for field, (want, why) in _HF_TEXT_FIXED.items():
        if t[field] != want:
            _refuse(f"text_config.{field}", t[field], why)
    if not cfg.get("tie_word_embeddings", True) and not t.get("tie_word_embeddings", True):
        _refuse("tie_word_embeddings", False, "our LM head is tied to the word embeddings")
    if t["vocab_size"] < VOCAB_SIZE:
        _refuse("text_config.vocab_size", t["vocab_size"], f"our tokenizer's ids go up to {VOCAB_SIZE - 1}")
    from . import TASKS  # the package imports this module: read at call time
    classes = {arch, getattr(TASKS.get(task), "transformers_class", None)}
    if "BlipForQuestionAnswering" in classes and v["hidden_size"] != t["hidden_size"]:
        _refuse("vision_config.hidden_size", v["hidden_size"],
                f"transformers' BlipForQuestionAnswering builds its answer decoder's cross-attention that wide but "
                f"feeds it the text_config.hidden_size={t['hidden_size']} question states")
    for field, ours in _HF_VISION.items():
        out[ours] = v[field]
    if out["vision_intermediate_size"] == 4 * v["hidden_size"]:
        out["vision_intermediate_size"] = None  # the ViT's own rule
    out["med_config"] = {field: t[field] for field in _HF_TEXT}
    out["embed_dim"] = cfg["image_text_hidden_size"]
    out["drop_path_rate"] = 0.0  # transformers' BLIP has no stochastic depth
    return out


_HF_TASKS = {"BlipForConditionalGeneration": "caption", "BlipForImageTextRetrieval": "itm",
             "BlipForQuestionAnswering": "vqa"}


def from_transformers(hf_model, task: str | None = None):
    """Our model with the weights of a transformers BLIP model (caption, itm/retrieval or vqa)."""
    name = type(hf_model).__name__
    task = task or _HF_TASKS.get(name)
    if task is None:
        raise ValueError(f"no blip task for {name}; expected one of {sorted(_HF_TASKS)}")
    from . import TASKS  # the package imports this module: read at call time
    model = TASKS[task](ModelConfig.from_overrides(**config_from_transformers(hf_model.config, task)))
    load_into(model, hf_model.state_dict(), strict=None)
    return model.eval()


def to_transformers(model, out_dir=None):
    """Our weights in transformers' BLIP layout: a state dict, or (out_dir given) a directory with config.json +
    model.safetensors that transformers' `from_pretrained` reads."""
    # transformers' BLIP has no momentum encoders, feature queues or temperature
    extra = ("temp", "image_queue", "text_queue", "ptr_queue", "queue_ptr", "idx_queue")
    sd = to_transformers_keys({k: v for k, v in model.state_dict().items() if "_m." not in k and k not in extra})
    if out_dir is None:
        return sd
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = set(to_transformers_keys(dedup_state_dict(model)[0]))
    save_file({k: v.contiguous() for k, v in sd.items() if k in keep}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(transformers_config(model), indent=2))
    return sd


def transformers_config(model) -> dict:
    """transformers' BlipConfig (as config.json) of our model: every field that sets a shape or a computation."""
    v, t = model.vision_cfg, model.text_cfg()
    arch = model.transformers_class
    if arch is None:
        raise ValueError(f"transformers has no BLIP class for task {model.task!r}")
    if arch == "BlipForQuestionAnswering" and v.width != t.hidden_size:
        raise ValueError(f"transformers' BlipForQuestionAnswering needs one width for both towers (its answer "
                         f"decoder's cross-attention is built vision-wide): vision {v.width}, text {t.hidden_size}")
    return {"architectures": [arch], "model_type": "blip", "image_text_hidden_size": model.cfg.embed_dim,
            "projection_dim": model.cfg.embed_dim, "tie_word_embeddings": True, "label_smoothing": 0.1,
            "vision_config": {"hidden_size": v.width, "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
                              "intermediate_size": v.intermediate_size or 4 * v.width, "image_size": v.image_size,
                              "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
                              "hidden_act": "gelu", "attention_dropout": 0.0, "initializer_range": 0.02},
            "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                            "encoder_hidden_size": v.width, "num_hidden_layers": t.num_hidden_layers,
                            "num_attention_heads": t.num_attention_heads, "intermediate_size": t.intermediate_size,
                            "max_position_embeddings": t.max_position_embeddings, "layer_norm_eps": t.layer_norm_eps,
                            "hidden_dropout_prob": t.hidden_dropout_prob,
                            "attention_probs_dropout_prob": t.attention_probs_dropout_prob,
                            "hidden_act": "gelu", "is_decoder": True, "tie_word_embeddings": True,
                            "label_smoothing": 0.1,  # our LM loss: the original's smoothing
                            "pad_token_id": PAD_ID, "bos_token_id": DEC_ID, "eos_token_id": 2, "sep_token_id": SEP_ID}}
