"""Evaluation loops shared by the entry scripts (they call the models; metrics come from blip.metrics)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from . import distributed as dist
from .metrics.retrieval import retrieval_recall


@torch.no_grad()
def retrieval_features(model, dataset, batch_size=64, num_workers=0, device=None, text_batch=256):
    """Image token embeddings + ITC features of every gallery image, and text ids/masks/features."""
    device = device or model.device
    embeds, feats = [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        e, f = model.image_features(images.to(device))
        embeds.append(e)
        feats.append(f)
    ids, masks, tfeats = [], [], []
    texts = dataset.text
    width = model.text_max_length
    for s in range(0, len(texts), text_batch):
        i, m, f = model.text_features(texts[s:s + text_batch])
        pad = width - i.shape[1]  # one width for the whole gallery
        ids.append(torch.nn.functional.pad(i, (0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
        tfeats.append(f)
    return torch.cat(embeds), torch.cat(feats), torch.cat(ids), torch.cat(masks), torch.cat(tfeats)


@torch.no_grad()
def evaluate_retrieval(model, dataset, k_test=256, batch_size=64, num_workers=0, rerank_batch=128):
    """The original protocol (ITC top-k, ITM re-rank, recall@1/5/10). Queries are split across ranks and
    the score rows gathered, so N ranks give the same numbers as one."""
    was_training = model.training
    model.eval()
    image_embeds, image_feat, ids, mask, text_feat = retrieval_features(model, dataset, batch_size, num_workers)
    ids[:, 0] = 30523  # [ENC]
    sims = image_feat @ text_feat.t()
    world, rank = dist.get_world_size(), dist.get_rank()

    def scores(s, queries_are_images):
        n = s.shape[0]
        step = -(-n // world)
        lo, hi = min(n, rank * step), min(n, (rank + 1) * step)
        part = model.rerank(s[lo:hi], k_test, image_embeds, ids, mask, queries_are_images, batch_size=rerank_batch,
                            query_offset=lo, progress=dist.is_main())
        if world > 1:
            part = torch.cat([p.to(s.device) for p in dist.all_gather_object(part.cpu())])
        return part

    score_i2t, score_t2i = scores(sims, True), scores(sims.t(), False)
    model.train(was_training)
    return retrieval_recall(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
