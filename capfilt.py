"""CapFilt: bootstrap a pretraining set. A captioner writes synthetic captions for every web image, a filter
(ITM) scores each web and synthetic text against its image, and texts scoring >= filter_threshold are kept.

    python capfilt.py --config configs/shapes_capfilt.yaml \\
        --set captioner=output/shapes_caption/model.safetensors filter=output/shapes_retrieval/model.safetensors
    torchrun --nproc_per_node=8 capfilt.py --config configs/capfilt.yaml --set captioner=... filter=...

Input: `train_file` (pretraining JSON lists and/or webdataset .tar shards, globs allowed). Output in output_dir:
capfilt.json (pretraining format, each entry also has source 'web'|'synthetic' and score), capfilt_summary.json,
capfilt_scores.png, and shards/shard-XXXXX.json (finished work units: a rerun skips them and only merges).
"""
from __future__ import annotations

import glob
import json
import logging

from blip import distributed as dist
from blip import load_model
from blip.inference.capfilt import CapFilt, fingerprint, list_pairs, merge, run_shards, shard_path
from blip.models.checkpoint import file_identity
from blip.errors import exit_on_user_error
from blip.training.run import start_run
from data.worlds import ensure_shapes_world

log = logging.getLogger("capfilt")


def load_models(cfg, device):
    """Captioner and filter: each checkpoint's stored description (ours, transformers'), overridden by the model
    keys the config sets (an original .pth takes its sizes from them). The filter is built as the ITM model
    whatever it was trained as (a retrieval or pretraining checkpoint brings momentum encoders and queues that
    scoring does not need)."""
    for key in ("captioner", "filter"):
        if not getattr(cfg.options, key):
            raise SystemExit(f"capfilt: set the {key} checkpoint, e.g. --set {key}=path/to/model.safetensors")
    captioner = load_model("caption", cfg.options.captioner, **cfg.model).to(device)
    filter_model = load_model("itm", cfg.options.filter, **cfg.model).to(device)
    return captioner, filter_model


def settings_of(cfg, pairs) -> dict:
    """Everything a shard's content depends on (the threshold is applied at the merge, so it is not here)."""
    keys = ("filter_task", "num_captions", "top_p", "min_length", "max_length", "repetition_penalty",
            "seed", "max_words", "precision", "shard_size", "test_batch_size")
    opt = cfg.options
    return {"captioner": file_identity(opt.captioner), "filter": file_identity(opt.filter),
            "inputs": [file_identity(f) for src in opt.train_file for f in sorted(glob.glob(src)) or [src]],
            "n_pairs": len(pairs), "model": cfg.model, **{k: getattr(opt if hasattr(opt, k) else cfg, k) for k in keys}}


def main(argv=None, max_shards=None):
    """max_shards: stop after that many shards on each rank, without merging (tests simulate a crash)."""
    args, cfg, device, out = start_run("BLIP CapFilt: caption and filter web image-text pairs", argv,
                                       prepare=ensure_shapes_world, tasks=("capfilt",),
                                       required=("train_file", "captioner", "filter"))
    captioner, filter_model = load_models(cfg, device)
    opt = cfg.options
    capfilt = CapFilt(captioner, filter_model, filter_task=opt.filter_task, num_captions=opt.num_captions,
                      top_p=opt.top_p, min_length=opt.min_length, max_length=opt.max_length,
                      repetition_penalty=opt.repetition_penalty, prompt=captioner.cfg.prompt, max_words=cfg.max_words,
                      precision=cfg.precision)
    pairs = list_pairs(opt.train_file)
    settings = settings_of(cfg, pairs)
    n_shards = (len(pairs) + opt.shard_size - 1) // opt.shard_size
    log.info("%d pairs in %d shards of %d; %d rank(s)", len(pairs), n_shards, opt.shard_size, dist.get_world_size())
    run_shards(capfilt, pairs, out, shard_size=opt.shard_size, seed=cfg.seed, settings=settings,
               batch_size=cfg.test_batch_size, num_workers=cfg.num_workers, max_shards=max_shards)
    dist.barrier()
    summary = None
    if dist.is_main():
        fp = fingerprint(settings)
        left = [i for i in range(n_shards) if not shard_path(out, i).exists()
                or json.loads(shard_path(out, i).read_text())["fingerprint"] != fp]
        if left:
            log.warning("%d of %d shards not finished; run again to finish and merge", len(left), n_shards)
        else:
            noise = json.load(open(opt.noise_file)) if opt.noise_file else None
            extra = {"captioner": opt.captioner, "filter": opt.filter, "filter_task": opt.filter_task,
                     "num_captions": opt.num_captions, "inputs": opt.train_file}
            summary = merge(out, n_shards, opt.filter_threshold, noise=noise, extra=extra)
            brief = {k: summary[k] for k in ("pairs", "web", "synthetic", "total")}
            brief["unreadable"] = summary["unreadable"]["count"]
            if "filter_vs_noise" in summary:
                brief["filter_vs_noise"] = summary["filter_vs_noise"]
            print(json.dumps(brief, indent=1))
    dist.cleanup()
    return summary


if __name__ == "__main__":
    exit_on_user_error(main)
