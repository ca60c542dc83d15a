"""Pretraining: ITC + ITM + LM on image-text pairs (JSON lists or webdataset shards).

    python pretrain.py --config configs/shapes_pretrain.yaml          # offline default: the shapes world
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain.yaml
"""
from __future__ import annotations

import glob
import json
import os

from blip import distributed as dist
from blip.engine import fit
from blip.evaluation import evaluate_retrieval
from blip.run import start_run, train_transform_for
from blip.tasks import PretrainObjective, build_model
from data.datasets import PretrainDataset, RetrievalEvalDataset, WebDatasetShards
from data.transforms import test_transform


def main(argv=None):
    args, cfg, device, out = start_run("BLIP pretraining", argv)
    transform = train_transform_for(cfg, default_scale=(0.2, 1.0))  # pretraining crops down to 20%
    if any(str(f).endswith(".tar") for f in cfg.train_file):  # webdataset shards (globs allowed)
        dataset = WebDatasetShards(cfg.train_file, transform, max_words=cfg.max_words, shuffle=True, seed=cfg.seed)
    else:
        dataset = PretrainDataset(cfg.train_file, transform, max_words=cfg.max_words)
    model = build_model("pretrain", cfg).to(device)

    evaluate = None
    if cfg.shapes:  # held-out retrieval recall on the shapes world's test split
        root = cfg.shapes["out_dir"]
        gallery = RetrievalEvalDataset(os.path.join(root, "karpathy_test.json"), root, test_transform(cfg.image_size))
        evaluate = lambda m, epoch: evaluate_retrieval(m, gallery, k_test=cfg.k_test, batch_size=cfg.test_batch_size)

    metrics = {}
    if not args.evaluate:
        metrics = fit(model, PretrainObjective(cfg.alpha), dataset, cfg, out, evaluate=evaluate, resume=args.resume,
                      device=device)
    elif evaluate is not None:
        metrics = evaluate(model, -1)
    if dist.is_main():
        if metrics:
            print(json.dumps({k: round(v, 2) for k, v in metrics.items()}, indent=1))
        plot_losses(out / "metrics.jsonl", out / "loss_curve.png")
    dist.cleanup()
    return metrics


def plot_losses(log_file, png):
    """Loss curves from the JSON-lines log (one line per logged step)."""
    if not os.path.exists(log_file):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(log_file)]
    rows = [r for r in rows if r.get("event") == "train"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({k for r in rows for k in r if k.startswith("loss")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
