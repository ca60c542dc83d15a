"""Inference at BLIP-base size, ratios measured in one run on the same random weights (interleaved repeats,
medians), outputs compared:

1. captioning, beam 3, max 20, min 5, batch 8 @384: ours (fp32; with --bf16 also bf16 autocast and bf16 weights)
   vs transformers' `BlipForConditionalGeneration.generate` on the same weights (`blip.to_transformers`), fp32 and
   (--bf16) bf16 weights, each of ours against the anchor of its precision; on CUDA also our eager (dynamic) rows
   against the default captured static-shape decoder;
2. `blip.inference.caption` over a folder of JPEGs (decoded in --workers DataLoader workers) vs the model-only time;
3. ITM matrix, 8 images × 16 texts @384: `blip.inference.itm` (ViT once per image, each image's cross-attention
   K/V once) vs the original code's way (ViT once per image, image embeddings repeated per pair, one
   text-encoder call over all pairs).

    python bench/bench_infer.py                      # CPU, all three
    python bench/bench_infer.py --only caption --repeats 3
    python bench/bench_infer.py --only folder --folder-batches 1
    python bench/bench_infer.py --bf16               # + ours under bf16 autocast (fast with AMX or on a GPU)
    python bench/bench_infer.py --device cuda --bf16 # GPU figures (when a device is lent)

Random weights never emit [SEP], so every caption runs to max_length: the decoder's worst case.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._timing import timed  # noqa: E402
import blip  # noqa: E402
from blip import inference  # noqa: E402
from blip.data.tokenizer import DEC_ID, pre_caption  # noqa: E402



def med(xs):
    return statistics.median(xs)


def bench_caption(a, device):
    torch.manual_seed(0)
    ours = blip.load_model("caption", image_size=a.image_size).to(device).eval()
    from transformers import BlipConfig, BlipForConditionalGeneration
    sd = blip.to_transformers(ours)
    hf = BlipForConditionalGeneration(BlipConfig(**blip.transformers_config(ours)))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "position_ids" not in k], missing
    hf = hf.to(device).eval()
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(1)).to(device)
    # transformers' generate drops the last token of input_ids (the processor's [SEP]): give it the prompt with [SEP]
    prompt, _ = ours.tokenize([ours.cfg.prompt] * a.batch, first_token=DEC_ID)
    kw = dict(num_beams=3, max_length=20, min_length=5)
    runs = {"transformers fp32": lambda: hf.generate(pixel_values=x, input_ids=prompt, **kw).tolist(),
            "ours fp32": lambda: ours.generate(x, return_ids=True, **kw)}
    if device.type == "cuda":  # the default there is the captured static-shape decoder; the eager one for contrast
        runs["ours fp32 eager rows"] = lambda: ours.generate(x, return_ids=True, static=False, **kw)
    if a.bf16:
        hf_b = copy.deepcopy(hf).to(torch.bfloat16)  # the fair anchor for bfloat16 weights
        runs["transformers bf16 weights"] = lambda: hf_b.generate(pixel_values=x.to(torch.bfloat16),
                                                                  input_ids=prompt, **kw).tolist()
        def ours_bf16():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return ours.generate(x, return_ids=True, **kw)
        runs["ours bf16 autocast"] = ours_bf16
        ours_b = copy.deepcopy(ours).to(torch.bfloat16)  # what `blip caption --bf16` runs: bfloat16 weights
        runs["ours bf16 weights"] = lambda: ours_b.generate(x.to(torch.bfloat16), return_ids=True, **kw)
    times = {k: [] for k in runs}
    outs = {}
    with torch.inference_mode():
        for r in range(a.repeats):
            for name, fn in runs.items():
                t, outs[name] = timed(fn, device)
                times[name].append(t)
                print(f"  {name}: {t:.2f} s", flush=True)
        with torch.autocast(device.type, enabled=False):
            vit_t = med([timed(lambda: ours.visual_encoder(x), device)[0] for _ in range(max(1, a.repeats - 1))])
    print(f"\ncaptioning, batch {a.batch} @{a.image_size}, beam 3, max 20 ({device.type}; medians of {a.repeats}):")
    for name in runs:
        anchor = "transformers bf16 weights" if "bf16" in name and "transformers bf16 weights" in runs \
            else "transformers fp32"
        t = med(times[name])
        print(f"  {name:26s} {t:7.3f} s {a.batch / t:8.1f} img/s  {med(times[anchor]) / t:5.2f}x {anchor}")
    print(f"  ours fp32: ViT {vit_t:.2f} s, decoder {med(times['ours fp32']) - vit_t:.2f} s")
    theirs = [_upto_sep(s) for s in outs["transformers fp32"]]
    same = sum(_upto_sep(s) == t for s, t in zip(outs["ours fp32"], theirs))
    print(f"  identical captions (ours fp32 vs transformers): {same} of {a.batch}")
    for name in ("ours fp32 eager rows", "ours bf16 autocast", "ours bf16 weights"):
        if name in outs:
            same = sum(s == t for s, t in zip(outs[name], outs["ours fp32"]))
            print(f"  identical captions ({name} vs ours fp32): {same} of {a.batch} (random weights: near-ties)")
    return ours, med(times["ours fp32"])


def _upto_sep(seq):
    seq = list(seq)
    return seq[:seq.index(102, 1) + 1] if 102 in seq[1:] else seq


def bench_folder(a, device, ours, model_only):
    """The whole command's path: JPEG files -> 2 decoding workers -> batches -> captions."""
    from PIL import Image
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.batch * a.folder_batches):
            Image.fromarray((rng.rand(480, 640, 3) * 255).astype("uint8")).save(f"{d}/{i:04d}.jpg", quality=90)
        x = torch.randn(a.batch, 3, a.image_size, a.image_size).to(device)
        kw = dict(num_beams=3, max_length=20, min_length=5)
        e2e, model = [], []
        with torch.inference_mode():
            for _ in range(a.repeats):
                t, rows = timed(lambda: list(inference.caption(ours, d, batch_size=a.batch, workers=a.workers, **kw)),
                                device)
                e2e.append(t)
                model.append(sum(timed(lambda: ours.generate(x, **kw), device)[0] for _ in range(a.folder_batches)))
        assert len(rows) == a.batch * a.folder_batches
    n = a.batch * a.folder_batches
    print(f"\n`blip caption FOLDER` ({n} JPEGs 640x480, {a.workers} workers): {med(e2e):.2f} s = {n / med(e2e):.1f} img/s "
          f"against model-only {med(model):.2f} s = {n / med(model):.1f} img/s ({100 * (med(e2e) / med(model) - 1):+.1f}%)")


def bench_itm(a, device):
    torch.manual_seed(0)
    model = blip.load_model("itm", image_size=a.image_size).to(device).eval()
    x = torch.randn(8, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(2)).to(device)
    words = "a dog runs on the beach near two red boats while people watch the sunset".split()
    texts = [" ".join(words[i % 5:i % 5 + 4 + i % 7]) for i in range(16)]
    clean = [pre_caption(t) for t in texts]

    def original():  # blip_itm over pairs: ViT once, image embeddings repeated per text, one encoder call
        emb = model.visual_encoder(x)
        ids, mask = model.tokenize(clean * 8, max_length=35, first_token=model.itm_first_token)
        image_of_pair = torch.arange(8, device=emb.device).repeat_interleave(16)
        out = model.text_encoder(ids, mask, emb[image_of_pair])
        return model.itm_head(out[:, 0]).float().softmax(-1)[:, 1].view(8, 16)

    def ours_way(m, pixels, precision):  # what blip.inference.itm runs per batch
        emb, _ = m.image_features(pixels)
        ids, mask, _ = inference.predict._text_features(m, clean, precision)
        return m.itm_matrix(emb, ids, mask)

    ours = lambda: ours_way(model, x, "fp32")  # noqa: E731
    model_b = copy.deepcopy(model).to(torch.bfloat16) if a.bf16 else None  # `blip itm --bf16`: bfloat16 weights
    ours_bf16 = lambda: ours_way(model_b, x.to(torch.bfloat16), "bf16")  # noqa: E731

    t_orig, t_ours, t_b = [], [], []
    with torch.inference_mode():
        for _ in range(a.repeats):
            t, want = timed(original, device)
            t_orig.append(t)
            t, got = timed(ours, device)
            t_ours.append(t)
            if model_b is not None:
                t, got_b = timed(ours_bf16, device)
                t_b.append(t)
    print(f"\nITM matrix 8 images x 16 texts @{a.image_size}: original way {med(t_orig):.2f} s, ours {med(t_ours):.2f} s "
          f"({med(t_orig) / med(t_ours):.2f}x); max |difference| {(want - got).abs().max().item():.1e}")
    if t_b:
        print(f"  ours bf16 weights {med(t_b):.2f} s ({med(t_orig) / med(t_b):.2f}x the original way in fp32); "
              f"max |difference| from fp32 {(want - got_b.float()).abs().max().item():.1e}")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="also time ours under bf16 autocast (needs AMX/AVX-512-BF16 "
                                                       "or a GPU to be fast)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--folder-batches", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="the folder benchmark's decoding workers")
    p.add_argument("--only", choices=["caption", "itm", "folder"], help="one benchmark only")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    if a.only in (None, "itm"):
        bench_itm(a, device)
    if a.only in (None, "caption"):
        ours, model_only = bench_caption(a, device)
    if a.only in (None, "folder"):
        if a.only == "folder":
            torch.manual_seed(0)
            ours, model_only = blip.load_model("caption", image_size=a.image_size).to(device).eval(), None
        bench_folder(a, device, ours, model_only)


if __name__ == "__main__":
    main()
