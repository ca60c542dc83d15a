"""One BLIP pretraining step (ITC + ITM + LM with the momentum encoders, forward + backward + fused AdamW) at
BLIP-base size, exactly as the engine runs it (`blip.training.engine.train_step`: LR, EMA, autocast, clipping, the optimizer)
on a typed batch prepared once (in training the DataLoader workers prepare it while the GPU runs the step before).

    python bench/bench_train.py                                   # CPU fp32, batch 8 @224
    python bench/bench_train.py --device cuda --precision bf16 --batch 128 [--compile]
    python bench/bench_train.py --device cuda --precision bf16 --vit large --ceiling     # the largest batch that fits

Prints one Markdown row: seconds per step (median of --steps after warm-up), images/s, peak memory, FLOPs per step
(torch.utils.flop_counter, one eager step), MFU against the GPU's dense bf16 peak, and on CUDA the share of the
step's wall time the GPU sat idle (torch.profiler: kernel intervals merged over 3 steps). Random weights; captions
of 30 tokens (the pretraining length). `--sync-debug` runs the timed steps under
torch.cuda.set_sync_debug_mode("error"): any host sync in the step raises.
"""
from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blip  # noqa: E402
from blip.training import engine  # noqa: E402
from blip.training.config import load_config  # noqa: E402
from blip.tasks import PretrainTask  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
CAPTION = "a picture of a dog running on the beach with a red ball in its mouth and the sea behind it"


def build(a, batch):
    """(run, prepared device batch) for a pretraining run of `batch` images."""
    cfg = load_config(None, ["task=pretrain", "init_lr=1e-4", f"precision={a.precision}", f"batch_size={batch}",
                             f"compile={a.compile}", "num_workers=0", "grad_clip=null"])
    torch.manual_seed(0)
    model = blip.load_model("pretrain", vit=a.vit, image_size=a.image_size, queue_size=batch * 16,
                            vit_grad_ckpt=a.grad_ckpt, vit_ckpt_layer=24 if a.grad_ckpt else 0,
                            text_grad_ckpt=a.grad_ckpt).train()
    if a.grad_ckpt:
        model.set_text_grad_ckpt(True)
    task = PretrainTask(cfg)
    samples = [(torch.randn(3, a.image_size, a.image_size), CAPTION) for _ in range(batch)]
    run = engine.setup(task, model, samples, tempfile.mkdtemp(), device=torch.device(a.device))
    prepared = task.collate(model)(samples, list(range(batch))).to(run.device)
    return run, prepared


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(run, prepared):
    batches = itertools.repeat((prepared, []))
    progress = engine.Progress(epoch=1, step=0, steps_per_epoch=100)
    return lambda: engine.train_step(run, batches, progress)


def gpu_idle_share(step, device, steps=3) -> float:
    """1 - (GPU kernel time, overlapping kernels merged) / wall time, over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -1.0
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return max(0.0, 1 - busy / wall_us)


def fits(a, batch) -> bool:
    try:
        run, prepared = build(a, batch)
        step = step_fn(run, prepared)
        step()
        step()
        sync(run.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        run = prepared = step = None
        torch.cuda.empty_cache()


def ceiling(a) -> int:
    """The largest batch (a multiple of 8) whose step fits: doubling from --batch, then bisection."""
    lo, hi = 0, a.batch
    while fits(a, hi):
        lo, hi = hi, hi * 2
        print(f"  batch {lo} fits", flush=True)
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if fits(a, mid) else (lo, mid)
        print(f"  bisect: {lo}..{hi}", flush=True)
    return lo


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vit", default="base")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the ViT and the text stack")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward + backward")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: raise on any host sync inside the timed steps")
    p.add_argument("--ceiling", action="store_true", help="CUDA: find the largest batch that fits, then time it")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.ceiling:
        a.batch = ceiling(a)
        print(f"ceiling: batch {a.batch} ({a.vit} @{a.image_size}, {a.precision}, grad ckpt {a.grad_ckpt})")
    run, prepared = build(a, a.batch)
    step = step_fn(run, prepared)
    step()  # warm-up (allocations, kernels; compilation)
    step()
    with FlopCounterMode(display=False) as fc:
        with torch._dynamo.config.patch(disable=True):  # counted on the eager step (the same arithmetic)
            step()
    flops = fc.get_total_flops()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if a.sync_debug:
            torch.cuda.set_sync_debug_mode("error")
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        idle = f"{100 * gpu_idle_share(step, device):.1f}%"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        name, peak_tflops, idle = f"CPU ({torch.get_num_threads()} threads)", None, "n/a"
    mfu = f"{100 * flops / dt / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
    mode = a.precision + (" compiled" if a.compile else "") + (" ckpt" if a.grad_ckpt else "")
    print("| device | step | ViT | batch | image | s/step | images/s | peak mem (GiB) | TFLOP/step | MFU | GPU idle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {mode} | {a.vit} | {a.batch} | {a.image_size} | {dt:.3f} | {a.batch / dt:.1f} | {peak:.1f} | "
          f"{flops / 1e12:.2f} | {mfu} | {idle} |")


if __name__ == "__main__":
    main()
