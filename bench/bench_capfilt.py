"""The CapFilt pass at BLIP-base size: nucleus-sampled captions (captioner) + ITM scores of the web text and
the synthetic captions (filter), per batch of images, as capfilt.py runs it.

    python bench/bench_capfilt.py                                      # CPU fp32, batch 4 @224, 2 batches
    python bench/bench_capfilt.py --precision bf16                     # CPU bf16 autocast
    python bench/bench_capfilt.py --device cuda --precision bf16 --batch 64 --batches 5

Random weights: the sampler rarely meets [SEP], so captions run to max_length (30 tokens with the prompt, the
configs/capfilt.yaml value) — the worst case. Prints images/s and the captioner / filter split.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blip  # noqa: E402
from blip.inference.capfilt import CapFilt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--num-captions", type=int, default=1)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--min-length", type=int, default=10)
    p.add_argument("--vit", default="base")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    captioner = blip.load_model("caption", vit=a.vit, image_size=a.image_size).to(device)
    filter_model = blip.load_model("itm", vit=a.vit, image_size=a.image_size).to(device)
    cf = CapFilt(captioner, filter_model, num_captions=a.num_captions, max_length=a.max_length,
                 min_length=a.min_length, repetition_penalty=1.1, precision=a.precision)
    images = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    web = ["a picture of a dog running on the beach with a red ball in its mouth"] * a.batch
    gen = torch.Generator(device=device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batch():
        t0 = time.perf_counter()
        caps = cf.captions(images, gen)
        sync()
        t1 = time.perf_counter()
        cf.itm_scores(images, [[w] + c for w, c in zip(web, caps)])
        sync()
        return t1 - t0, time.perf_counter() - t1, caps

    for _ in range(a.warmup if a.warmup is not None else int(device.type == "cuda")):
        batch()
    cap_t = filt_t = 0.0
    for _ in range(a.batches):
        c, f, caps = batch()
        cap_t, filt_t = cap_t + c, filt_t + f
    n = a.batch * a.batches
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens = sum(len(c.split()) for cs in caps for c in cs) / max(1, sum(len(cs) for cs in caps))
    print("| device | precision | batch | image | captions/img | s/batch caption | s/batch filter | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {a.precision} | {a.batch} | {a.image_size} | {a.num_captions} | {cap_t / a.batches:.2f} | "
          f"{filt_t / a.batches:.2f} | {n / (cap_t + filt_t):.2f} |")
    print(f"(last batch: {tokens:.1f} words per synthetic caption)")


if __name__ == "__main__":
    main()
