"""A training step per visual encoder at base size: BLIP's ViT-B/16 against timm backbones (CLIP ViT, EVA02, SigLIP,
DINOv2, CLIP ResNet-50, ConvNeXt), each in its own process (so its peak memory is its own), random weights.

    python bench/bench_backbones.py                           # CPU: the encoder's step, batch 4 @224, median of 3
    python bench/bench_backbones.py --part pretrain           # the whole BLIP pretraining step (ITC + ITM + LM)
    python bench/bench_backbones.py --device cuda --batch 32 --precision bf16 --part pretrain

`--part encoder` (default): the visual encoder's forward + backward (mean of its tokens) + AdamW over its weights;
what changes with the backbone, without the text stack's cost. `--part pretrain`: BLIP's pretraining step with the
text stack (BERT-base, its cross-attention reading the backbone's width) and the momentum encoders.

Prints a Markdown table: seconds per step (median of --steps after a warm-up), the ratio to BLIP's ViT-B in the same
run, image tokens, token width, parameters, and peak memory (CUDA: max allocated; CPU: the process's peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BACKBONES = {  # label -> ModelConfig keys (image_size is the run's)
    "BLIP ViT-B/16": {},
    "CLIP ViT-B/16": {"vision_backbone": "vit_base_patch16_clip_224"},
    "EVA02-B/14": {"vision_backbone": "eva02_base_patch14_224"},
    "SigLIP-B/16": {"vision_backbone": "vit_base_patch16_siglip_224"},
    "DINOv2-B/14 reg4": {"vision_backbone": "vit_base_patch14_reg4_dinov2"},
    "CLIP RN50 (grid)": {"vision_backbone": "resnet50_clip"},
    "ConvNeXt-B (grid)": {"vision_backbone": "convnext_base"},
}


def one(label, a) -> dict:
    import blip
    from blip.training.config import load_config
    from blip.precision import autocast
    from blip.training.optim import build_optimizer
    device = torch.device(a.device)
    torch.manual_seed(0)
    task = "pretrain" if a.part == "pretrain" else "itm"
    model = blip.load_model(task, image_size=a.image_size, queue_size=a.batch * 16, **BACKBONES[label]).to(device)
    model.train()
    opt = build_optimizer(model.visual_encoder if a.part == "encoder" else model,
                          load_config(None, ["init_lr=1e-4", "task=pretrain"]))
    images = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    texts = ["a picture of a dog running on the beach with a red ball in its mouth and the sea behind it"] * a.batch

    def step():
        with autocast(device, a.precision):
            if a.part == "encoder":
                loss = model.visual_encoder(images).float().mean()
            else:
                model.momentum_update()
                loss = sum(model.losses(images, texts, alpha=0.4).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        tokens = model.visual_encoder(images[:1])
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    vision_params = sum(p.numel() for p in model.visual_encoder.parameters())
    return {"label": label, "s_step": statistics.median(times), "tokens": tokens.shape[1], "width": tokens.shape[2],
            "vision_params_m": vision_params / 1e6, "peak_gib": peak}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--part", default="encoder", choices=["encoder", "pretrain"])
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one backbone in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    rows = []
    for label in a.only or BACKBONES:
        cmd = [sys.executable, __file__, "--one", label, "--device", a.device, "--precision", a.precision,
               "--batch", str(a.batch), "--image-size", str(a.image_size), "--steps", str(a.steps), "--part", a.part]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"# {rows[-1]}", file=sys.stderr)
    ref = next((r for r in rows if r["label"] == "BLIP ViT-B/16"), rows[0])
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{dev}, {a.precision}, {a.part} step, batch {a.batch} @{a.image_size}, median of {a.steps} steps\n")
    print("| visual encoder | image tokens × width | vision params (M) | s/step | × BLIP ViT-B | peak mem (GiB) | × BLIP ViT-B |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['tokens']} × {r['width']} | {r['vision_params_m']:.1f} | {r['s_step']:.2f} | "
              f"{r['s_step'] / ref['s_step']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
