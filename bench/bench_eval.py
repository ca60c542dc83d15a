"""Evaluation speed at BLIP-base size (random weights, synthetic gallery).

Retrieval (ITC top-k + ITM re-rank of both directions): ours (`retrieval_scores`: query/candidate pairs sorted by
image and batched, each image's cross-attention K/V projected once per chunk, padding trimmed) against the original's loop, re-implemented below (one query at a time: top-k by ITC,
the image embeddings repeated k times, one text-encoder call over k texts padded to 35 tokens, itm_head). Both
start from the same features; the rankings must agree. Then caption-eval throughput (beam 3, max 20, min 5).

    python bench/bench_eval.py                                            # CPU: 20 images x 100 texts, k 16
    python bench/bench_eval.py --device cuda --images 1000 --texts 5000 --k 256 --precisions bf16,tf32
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench._timing import timed  # noqa: E402
import blip  # noqa: E402
from blip.evaluation.loops import retrieval_features  # noqa: E402
from blip.evaluation.metrics import retrieval_recall  # noqa: E402
from blip.data.tokenizer import ENC_ID  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large sitting running on the in of with near beach street "
         "table bike car tree field water snow two three people wearing holding next to").split()


class Gallery(Dataset):
    """Random images; text t describes image t % n_images (so each image has texts // images captions)."""

    def __init__(self, n_images, n_texts, size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n_images, 3, size, size, generator=g)
        rng = random.Random(seed)
        self.text = [" ".join(rng.choices(WORDS, k=rng.randint(6, 16))) for _ in range(n_texts)]
        self.txt2img = {t: t % n_images for t in range(n_texts)}
        self.img2txt = {i: list(range(i, n_texts, n_images)) for i in range(n_images)}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


@torch.no_grad()
def original_loop(model, image_embeds, image_feat, ids, mask, text_feat, k):
    """The original evaluation's re-rank: one query per text-encoder call, k rows, full 35-token padding."""
    ids = ids.clone()
    ids[:, 0] = ENC_ID
    sims = image_feat @ text_feat.t()
    i2t = torch.full_like(sims, -100.0)
    for i, row in enumerate(sims):
        top_sim, top = row.topk(k)
        out = model.text_encoder(ids[top], mask[top], image_embeds[i].repeat(k, 1, 1))
        i2t[i, top] = model.itm_head(out[:, 0])[:, 1].float() + top_sim
    t2i = torch.full_like(sims.t(), -100.0)
    for t, row in enumerate(sims.t()):
        top_sim, top = row.topk(k)
        out = model.text_encoder(ids[t].repeat(k, 1), mask[t].repeat(k, 1), image_embeds[top])
        t2i[t, top] = model.itm_head(out[:, 0])[:, 1].float() + top_sim
    return i2t, t2i


def same_ranking(a, b, k):
    """Rows whose top-k candidates come in the same order."""
    return (a.topk(k, dim=1).indices == b.topk(k, dim=1).indices).all(1).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--texts", type=int, default=100)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rerank-batch", type=int, default=128, help="pairs per ITM call (ours)")
    p.add_argument("--caption-images", type=int, default=8)
    p.add_argument("--caption-batch", type=int, default=8)
    p.add_argument("--precisions", default="bf16", help="re-rank also in these precisions (comma-separated: bf16, "
                                                        "tf32; '' for none), compared with ours in fp32")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = blip.load_model("retrieval", vit="base", image_size=a.image_size, queue_size=64).to(device)
    gallery = Gallery(a.images, a.texts, a.image_size)
    t_feat, (embeds, feat, ids, mask, tfeat) = timed(lambda: retrieval_features(model, gallery, batch_size=32), device)
    k = min(a.k, a.images, a.texts)
    t_orig, (o_i2t, o_t2i) = timed(lambda: original_loop(model, embeds, feat, ids, mask, tfeat, k), device)
    t_ours, (i2t, t2i) = timed(lambda: model.retrieval_scores(
        image_embeds=embeds, image_feat=feat, text_ids=ids, text_mask=mask, text_feat=tfeat, k_test=k,
        batch_size=a.rerank_batch), device)
    same = min(same_ranking(i2t, o_i2t, k), same_ranking(t2i, o_t2i, k))
    recall = retrieval_recall(i2t, t2i, gallery.txt2img, gallery.img2txt)
    recall_equal = recall == retrieval_recall(o_i2t, o_t2i, gallery.txt2img, gallery.img2txt)
    diff = max((i2t - o_i2t).abs().max().item(), (t2i - o_t2i).abs().max().item())
    lower = {}  # the re-rank in a lower precision (rerank_precision), against ours in fp32
    for precision in a.precisions.split(",") if a.precisions else []:
        t, (l_i2t, l_t2i) = timed(lambda: model.retrieval_scores(
            image_embeds=embeds, image_feat=feat, text_ids=ids, text_mask=mask, text_feat=tfeat, k_test=k,
            batch_size=a.rerank_batch, precision=precision), device)
        r = retrieval_recall(l_i2t, l_t2i, gallery.txt2img, gallery.img2txt)
        lower[precision] = (t, min(same_ranking(l_i2t, i2t, k), same_ranking(l_t2i, t2i, k)),
                            max(abs(r[m] - recall[m]) for m in recall))
    del model

    cap = blip.load_model("caption", vit="base", image_size=a.image_size).to(device)
    images = torch.randn(a.caption_images, 3, a.image_size, a.image_size, device=device)
    cap.generate(images[:1], num_beams=3, max_length=20, min_length=5)  # warm-up

    def captions():
        for s in range(0, len(images), a.caption_batch):
            cap.generate(images[s:s + a.caption_batch], num_beams=3, max_length=20, min_length=5)
    t_cap, _ = timed(captions, device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    pairs = k * (a.images + a.texts)
    print(f"device: {name}; BLIP-base random weights, image {a.image_size}, fp32; gallery {a.images} images x "
          f"{a.texts} texts, k={k} ({pairs} ITM pairs); features {t_feat:.1f} s\n")
    print("| retrieval re-rank | s | pairs/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| original loop (one query per call) | {t_orig:.2f} | {pairs / t_orig:.0f} | 1.00x |")
    print(f"| ours ({a.rerank_batch} pairs per call, K/V once per image, trimmed padding) | {t_ours:.2f} | {pairs / t_ours:.0f} | "
          f"{t_orig / t_ours:.2f}x |")
    for precision, (t, agree, drift) in lower.items():
        print(f"| ours, ITM in {precision} (same top-{k} order as ours fp32: {100 * agree:.1f}% of rows; recall within "
              f"{drift:.2f}) | {t:.2f} | {pairs / t:.0f} | {t_orig / t:.2f}x |")
    print(f"\nsame top-{k} rankings: {100 * same:.1f}% of rows; recall identical: {recall_equal}; "
          f"max |score difference| {diff:.2e}\n")
    print("| caption eval (beam 3, max 20, min 5) | images | batch | s | images/s |")
    print("|---|---|---|---|---|")
    print(f"| ours | {a.caption_images} | {a.caption_batch} | {t_cap:.2f} | {a.caption_images / t_cap:.2f} |")
    return {"same_ranking": same, "recall_equal": recall_equal, "speedup": t_orig / t_ours}


if __name__ == "__main__":
    main()
