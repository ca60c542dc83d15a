"""The model a command, the demo or a notebook runs: the task a checkpoint is loaded as, --set model options, and
the check that a gallery was embedded by the same model."""
from __future__ import annotations

import json
import sys

# The original's evaluation image sizes, used when neither --set nor the checkpoint gives one.
DEFAULT_IMAGE_SIZE = {"caption": 384, "itm": 384, "retrieval": 384, "pretrain": 384, "vqa": 480}
COMMAND_TASK = {"caption": "caption", "answer": "vqa"}
ITC_TASKS = ("itm", "retrieval", "pretrain")  # what itm/embed/search/classify can load (ITC + ITM heads)


def parse_sets(items) -> dict:
    """['image_size=64', 'med_config.hidden_size=32', ...] -> model options (values parsed as YAML/JSON)."""
    from ..training.config import parse_override
    out: dict = {}
    for item in items or []:
        key, value = parse_override(item)
        if key.startswith("med_config."):
            med = out.setdefault("med_config", {})
            if not isinstance(med, dict):
                raise ValueError(f"--set {item}: med_config is already a path ({med!r}), not a dict")
            med[key.split(".", 1)[1]] = value
        elif key == "med_config" and isinstance(out.get("med_config"), dict) and isinstance(value, dict):
            out["med_config"].update(value)
        else:
            out[key] = value
    return out


def model_task(args) -> str:
    """The task the checkpoint is loaded as: --task if given (a stored task that differs: a warning; the weights
    must still fit), else the task the checkpoint names if the command runs it, else the command's default. A
    checkpoint of a task the command does not run is refused by name: a VQA model is no captioner."""
    from ..models.checkpoint import read_metadata
    allowed = ITC_TASKS if args.command not in COMMAND_TASK else (COMMAND_TASK[args.command],)
    stored = read_metadata(args.checkpoint).get("task") if args.checkpoint is not None else None
    if args.task is not None:
        if stored is not None and stored != args.task:
            print(f"warning: {args.checkpoint} was saved as a {stored!r} model; loading it as --task {args.task}",
                  file=sys.stderr)
        return args.task
    if stored is None:
        return allowed[0]
    if stored not in allowed:
        runs = " or ".join(repr(t) for t in allowed)
        raise ValueError(f"{args.checkpoint} holds a {stored!r} model; `blip {args.command}` runs {runs} models "
                         f"(--task {allowed[0]} loads it as one anyway, if its weights fit)")
    return stored


def load(task: str, args, device):
    """The `task` model (see model_task) of --checkpoint and --set, on `device`, in eval mode."""
    import torch

    from ..models.factory import load_model, stored_description
    options = parse_sets(args.set)
    if args.checkpoint is None:
        print(f"warning: no --checkpoint given: the {task} model has RANDOM weights, its outputs mean nothing",
              file=sys.stderr)
    stored = bool(stored_description(args.checkpoint))  # the checkpoint carries its sizes
    if "image_size" not in options and not stored:
        options["image_size"] = DEFAULT_IMAGE_SIZE[task]
    model = load_model(task, args.checkpoint, **options).to(device).eval()
    # --bf16: the weights themselves in bfloat16 (bfloat16 has float32's range): no per-call weight casts, half the
    # bytes per decoding step. --fp16 stays autocast over float32 weights (float16 residual streams can overflow).
    return model.to(torch.bfloat16) if args.bf16 else model


def model_identity(model, args) -> dict:
    """What a gallery's features come from: `search` embeds its queries with the same model or refuses."""
    from ..models.checkpoint import file_identity
    return {"task": model.task, "model_config": model.cfg.to_dict(), "embed_dim": model.cfg.embed_dim,
            "checkpoint": None if args.checkpoint is None else file_identity(args.checkpoint)}


def check_gallery(gallery: dict, path, model, args):
    """A gallery embedded by another model (or of another width) ranks meaninglessly: refused in one line."""
    width = gallery["image_embeds"].shape[1]
    if width != model.cfg.embed_dim:
        raise ValueError(f"{path}: features {width} wide, this model's are {model.cfg.embed_dim}: embedded by "
                         f"another model; search with the model that embedded it")
    stored = gallery.get("model")
    if stored is None:
        print(f"warning: {path} does not say which model embedded it (an older blip?): the same one is assumed",
              file=sys.stderr)
        return
    from .outputs import differing
    diff = differing(stored, json.loads(json.dumps(model_identity(model, args))))
    if diff:
        made = stored.get("checkpoint") or ["random weights"]
        raise ValueError(f"{path}: embedded by another model ({', '.join(diff)} differ: it was made by "
                         f"{stored.get('task')!r} from {made[0]}); search with that model or embed again")
