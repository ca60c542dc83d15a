"""One full BLIP pretraining step (ITC + ITM + LM, forward + backward + AdamW) at BLIP-base size.

    python bench/bench_train.py                                   # CPU fp32, batch 8 @224
    python bench/bench_train.py --device cuda --precision bf16 --batch 64

Prints images/s, peak memory and (CUDA) model FLOPs utilisation, with FLOPs counted by
torch.utils.flop_counter on one step. Random weights; text of 30 tokens (the pretraining length).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blip  # noqa: E402
from blip.config import load_config  # noqa: E402
from blip.engine import autocast, build_optimizer  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vit", default="base")
    p.add_argument("--grad-ckpt", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = blip.load_model("pretrain", vit=a.vit, image_size=a.image_size, queue_size=a.batch * 16,
                            vit_grad_ckpt=a.grad_ckpt, vit_ckpt_layer=12 if a.grad_ckpt else 0).to(device).train()
    cfg = load_config(None, [f"init_lr=1e-4", "task=pretrain"])
    opt = build_optimizer(model, cfg)
    images = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    texts = ["a picture of a dog running on the beach with a red ball in its mouth and the sea behind it"] * a.batch

    def step():
        with autocast(device, a.precision):
            model.momentum_update()
            losses = model.losses(images, texts, alpha=0.4)
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernels)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / a.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        name, peak_tflops = f"CPU ({torch.get_num_threads()} threads)", None
    mfu = f"{100 * flops / dt / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
    print("| device | precision | batch | image | s/step | images/s | peak mem (GiB) | TFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {a.precision} | {a.batch} | {a.image_size} | {dt:.2f} | {a.batch / dt:.1f} | {peak:.1f} | "
          f"{flops / 1e12:.2f} | {mfu} |")


if __name__ == "__main__":
    main()
