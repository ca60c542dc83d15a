"""Issue 28's measurement on the shapes world: X-FM pretrained on pairs only (arm A) or on pairs + captions of other
scenes + uncaptioned images (arm B), the same pairs and steps, over seeds; then, for each run:

- retrieval: held-out ITC recall (r_mean) after the last epoch (the task's own evaluation);
- retrieval fine-tuned: train_xfm_retrieval.py from the run's weights (ITC + ITM, configs/shapes_xfm_retrieval.yaml),
  test r_mean (ITC top-k + ITM re-rank) at the epoch of best validation r_mean;
- VQA fine-tuned: train_xfm_vqa.py from the run's weights (the answer classifier, configs/shapes_xfm_vqa.yaml), test
  VQA accuracy after the last epoch;
(both fine-tunes also from random weights, the untrained rows: what pretraining adds);
- vision probe: a linear probe on the frozen vision encoder's [CLS] state, reading the shape's kind and colour;
- text probe: a linear probe on the frozen language encoder's [CLS] state, reading the caption's colour word;
- text classifier: a head fine-tuned with the language encoder on the probe captions (TEXT_CLASSIFIER) for the colour
  word.

The probes' images and captions are scenes of their own (rendered here from a separate seed, never trained on).

    python scripts/xfm_shapes.py --seeds 0 1 2 --out output/xfm_shapes      # ~4 min a run, one thread
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import blip  # noqa: E402
from blip.data.batches import texts  # noqa: E402
from blip.data.transforms import test_transform  # noqa: E402
from blip.evaluation.probes import fine_tuned_classifier, linear_probe  # noqa: E402
from data.shapes import COLORS, KINDS, captions, render, sample_scene  # noqa: E402

ARMS = {"A": ["text_file=[]", "image_file=[]"], "B": []}
PROBE_IMAGE_SIZE = 32  # configs/shapes_xfm.yaml's world
# The text classifier's budget. A first one (200 captions, lr 1e-4, head 1e-3) stayed at chance even on the untrained
# model, whose frozen features the linear probe reads at 99%: it measured the optimiser, not the encoder.
TEXT_CLASSIFIER = dict(n=800, epochs=5, lr=3e-4, head_lr=3e-3, batch_size=16)


def pretrain(arm: str, seed: int, out: Path, sets=()) -> Path:
    run = out / f"arm{arm}_seed{seed}"
    if not (run / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "pretrain_xfm.py"), "--config", str(ROOT / "configs" / "shapes_xfm.yaml"),
                        "--output-dir", str(run), "--overwrite", "--set", f"seed={seed}", *sets, *ARMS[arm]],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run


def fine_tune(task: str, run: Path, seed: int, pretrained: bool = True) -> list[dict]:
    """train_xfm_<task>.py on configs/shapes_xfm_<task>.yaml into run/<task>, from the run's weights (else from random
    weights at the config's preset); its evaluation rows."""
    ft = run / task
    if not (ft / "model.safetensors").exists():
        init = [f"pretrained={run / 'model.safetensors'}"] if pretrained else []
        subprocess.run([sys.executable, str(ROOT / f"train_xfm_{task}.py"), "--config",
                        str(ROOT / "configs" / f"shapes_xfm_{task}.yaml"), "--output-dir", str(ft), "--overwrite",
                        "--set", f"seed={seed}", *init], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    evals = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    return [r for r in evals if r["event"] == "eval"]


def fine_tuned(run: Path, seed: int, pretrained: bool = True) -> dict:
    """Retrieval: test r_mean at the epoch of best validation r_mean; VQA: test accuracy after the last epoch."""
    retrieval = max(fine_tune("retrieval", run, seed, pretrained), key=lambda r: r["val_r_mean"])
    return {"r_mean_fine_tuned": retrieval["test_r_mean"],
            "vqa_fine_tuned": fine_tune("vqa", run, seed, pretrained)[-1]["test_acc"]}


def text_classifier(model, probes, seed: int) -> dict:
    """A head fine-tuned with the language encoder (TEXT_CLASSIFIER) on the probe captions' colour word."""
    (_, _, tr_col, tr_cap), (_, _, te_col, te_cap) = probes
    n = TEXT_CLASSIFIER["n"]

    def encode(strings):
        ids, mask = texts(list(strings), model.text_max_length)
        return model.encode_text(ids, mask)[:, 0]

    model.train()
    try:
        return fine_tuned_classifier(encode, model.text_encoder.parameters(), tr_cap[:n], tr_col[:n], te_cap, te_col,
                                     seed=seed, **{k: v for k, v in TEXT_CLASSIFIER.items() if k != "n"})
    finally:
        model.eval()


def probe_scenes(n: int, seed: int, image_size: int):
    """n scenes of their own: (images, kind ids, colour ids, a caption naming the colour, its colour id)."""
    rng = np.random.default_rng([seed, 28])
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(s, image_size, rng) for s in scenes]
    named = [[c for c in captions(s) if s["color"] in c.split()] for s in scenes]
    caps = [options[int(rng.integers(len(options)))] for options in named]
    colours = list(COLORS)
    return (images, [KINDS.index(s["kind"]) for s in scenes], [colours.index(s["color"]) for s in scenes], caps)


@torch.no_grad()
def frozen_features(model, images, caps, batch=64):
    tf = test_transform(model.cfg.image_size)
    vision, language = [], []
    for k in range(0, len(images), batch):
        x = torch.stack([tf(im) for im in images[k:k + batch]])
        vision.append(model.encode_image(x)[:, 0])
        ids, mask = texts(caps[k:k + batch], model.text_max_length)
        language.append(model.encode_text(ids, mask)[:, 0])
    return torch.cat(vision), torch.cat(language)


def measure(run: Path, probes, seed: int = 0, pretrained: bool = True) -> dict:
    """The run's retrieval, fine-tunes and probes; pretrained False: an untrained model of the config's size (the
    floor), its fine-tunes written under `run`."""
    if not pretrained:
        torch.manual_seed(seed)
        model, last = blip.load_model("xfm", preset="tiny", image_size=PROBE_IMAGE_SIZE).eval(), {"r_mean": None}
    else:
        model = blip.load_model(None, run / "model.safetensors").eval()
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in evals if r["event"] == "eval"][-1]
    tuned = fine_tuned(run, seed, pretrained)
    (tr_img, tr_kind, tr_col, tr_cap), (te_img, te_kind, te_col, te_cap) = probes
    tr_v, tr_t = frozen_features(model, tr_img, tr_cap)
    te_v, te_t = frozen_features(model, te_img, te_cap)
    return {"r_mean": last["r_mean"], **tuned,
            "vision_kind": linear_probe(tr_v, tr_kind, te_v, te_kind),
            "vision_colour": linear_probe(tr_v, tr_col, te_v, te_col),
            "text_colour": linear_probe(tr_t, tr_col, te_t, te_col),
            "text_classifier": text_classifier(model, probes, seed)}


def summary(values):
    return f"{statistics.mean(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="output/xfm_shapes")
    p.add_argument("--probe-train", type=int, default=800)
    p.add_argument("--probe-test", type=int, default=400)
    p.add_argument("--set", nargs="*", default=[], help="overrides for both arms' pretraining (e.g. max_epoch=10)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    results = {}
    probes = [probe_scenes(a.probe_train, 1000, PROBE_IMAGE_SIZE), probe_scenes(a.probe_test, 2000, PROBE_IMAGE_SIZE)]
    for seed in a.seeds:  # untrained: what the probes read from random features of these sizes
        results[f"untrained/{seed}"] = measure(out / f"untrained_seed{seed}", probes, seed, pretrained=False)
    for arm in ARMS:
        for seed in a.seeds:
            results[f"{arm}/{seed}"] = measure(pretrain(arm, seed, out, a.set), probes, seed)
            print(arm, seed, json.dumps(results[f"{arm}/{seed}"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\narm | retrieval r_mean (ITC) | fine-tuned retrieval r_mean | fine-tuned VQA acc | vision kind | "
          "vision colour | text colour | text classifier (mean, min–max over seeds "
          f"{a.seeds}; probes: % of {a.probe_test} held-out scenes)")
    for arm in ("untrained", *ARMS):
        rows = [results[f"{arm}/{s}"] for s in a.seeds]
        recall = [summary([r[k] for r in rows]) if rows[0][k] is not None else "-"
                  for k in ("r_mean", "r_mean_fine_tuned", "vqa_fine_tuned")]
        print(f"{arm} | " + " | ".join(recall) + " | "
              + " | ".join(summary([r[k]["acc"] for r in rows])
                           for k in ("vision_kind", "vision_colour", "text_colour", "text_classifier")))
    first = results[f"A/{a.seeds[0]}"]
    print("majority class:", {k: round(first[k]["majority"], 1) for k in ("vision_kind", "vision_colour", "text_colour")})


if __name__ == "__main__":
    main()
