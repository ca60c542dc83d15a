"""One X-FM training step (all three streams: pairs, text only, images only) at a preset's size: forward (ITC, ITM,
image-conditioned MLM, MIM on pairs; MLM on text; MIM on images), backward and the AdamW step, as the engine runs it.

    python bench/bench_xfm.py --preset base --batch 2 --steps 3            # CPU (issue 28's figure)
    python bench/bench_xfm.py --preset base --batch 32 --device cuda --precision bf16

Prints the parameters, seconds per optimizer step (median of --steps after one warm-up step) and samples per second.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blip  # noqa: E402
from bench._timing import timed  # noqa: E402
from blip.precision import autocast  # noqa: E402
from blip.tasks.xfm import XFMCollate  # noqa: E402
from blip.training.optim import build_optimizer  # noqa: E402

CAPTIONS = ["two red circles on the left of a striped background", "a small blue square at the top",
            "three green triangles in the center", "one large yellow cross on the right"]


def batches(model, n, generator):
    """{stream: batch} of n samples each, masks drawn by the task's own collates."""
    size = model.cfg.image_size
    images = [torch.randn(3, size, size, generator=generator) for _ in range(n)]
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    seeds = list(range(n))
    return {"pairs": XFMCollate("pairs", model)(list(zip(images, texts)), seeds),
            "text": XFMCollate("text", model)(texts, seeds),
            "images": XFMCollate("images", model)(images, seeds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=2, help="samples per stream")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = blip.load_model("xfm", preset=a.preset).to(device).train()
    cfg = argparse.Namespace(init_lr=1e-4, weight_decay=0.05, layer_decay=1.0)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch = {k: v.to(device) for k, v in batches(model, a.batch, generator).items()}

    def step():
        with autocast(device, a.precision):
            losses = model(**batch, generator=torch.Generator(device=device).manual_seed(1))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in losses.items()}

    step()  # warm-up: allocations, the first kernels
    times = [timed(step, device)[0] for _ in range(a.steps)]
    per_step = statistics.median(times)
    print(json.dumps({"preset": a.preset, "device": str(device), "precision": a.precision,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "batch_per_stream": a.batch, "seconds_per_step": round(per_step, 2),
                      "samples_per_second": round(3 * a.batch / per_step, 2),
                      "steps": [round(t, 2) for t in times]}, indent=1))


if __name__ == "__main__":
    main()
