"""Evaluation loops shared by the entry scripts (they call the models; metrics come from blip.evaluation.metrics).

Every evaluator runs on every rank: each rank takes its share of the queries/images, the results are
gathered, so N ranks give the numbers of one."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .. import distributed as dist
from ..models.checkpoint import atomic_write
from ..models.generation import Decoding
from .metrics import accuracy, caption_scores, retrieval_recall, vqa_accuracy

log = logging.getLogger(__name__)


@torch.no_grad()
def retrieval_features(model, dataset, batch_size=64, num_workers=0, device=None, text_batch=256):
    """Image token embeddings + ITC features of every gallery image, and text ids/masks/features."""
    device = device or model.device
    embeds, feats = [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        e, f = model.image_features(images.to(device))
        embeds.append(e)
        feats.append(f)
    ids, mask, text_feat = model.encode_texts(dataset.text, chunk=text_batch, width=model.text_max_length)
    return torch.cat(embeds), torch.cat(feats), ids, mask, text_feat


@torch.no_grad()
def evaluate_retrieval(model, dataset, *, k_test=256, batch_size=64, num_workers=0, rerank_batch=128,
                       rerank_precision="fp32"):
    """The original protocol (ITC top-k, ITM re-rank, recall@1/5/10). Queries are split across ranks and
    the score rows gathered, so N ranks give the same numbers as one. `rerank_precision`: the ITM passes'
    (blip.precision; the config's `rerank_precision`), named in the log."""
    if rerank_precision != "fp32" and dist.is_main():
        log.info("retrieval evaluation: ITM re-rank in %s", rerank_precision)
    was_training = model.training
    model.eval()
    image_embeds, image_feat, ids, mask, text_feat = retrieval_features(model, dataset, batch_size, num_workers)
    score_i2t, score_t2i = model.retrieval_scores(
        k_test=k_test, image_embeds=image_embeds, image_feat=image_feat, text_ids=ids, text_mask=mask,
        text_feat=text_feat, batch_size=rerank_batch, progress=dist.is_main(), precision=rerank_precision,
        across_ranks=True)
    model.train(was_training)
    metrics = retrieval_recall(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
    metrics.update(feature_spread(image_feat, text_feat))
    return metrics


COLLAPSED = 0.99  # mean cosine between different inputs' features above which a tower is reported collapsed


def mean_cosine(feat: torch.Tensor) -> float:
    """Mean cosine similarity between the unit feature rows of different inputs: ~0 for features that tell inputs
    apart, 1.0 when every input maps to one vector (a collapsed tower, whose rankings are ties broken by order)."""
    n = feat.shape[0]
    if n < 2:
        return 0.0
    total = feat.float().sum(0)
    return float(((total @ total) - n) / (n * (n - 1)))  # sum over i != j of f_i . f_j, rows of norm 1


def feature_spread(image_feat, text_feat) -> dict:
    """The gallery's mean cross-input ITC cosine per tower; a tower at >= COLLAPSED is named in a warning."""
    out = {"image_feat_cosine": mean_cosine(image_feat), "text_feat_cosine": mean_cosine(text_feat)}
    collapsed = [k.split("_")[0] for k, v in out.items() if v >= COLLAPSED]
    if collapsed and dist.is_main():
        log.warning("collapsed %s features: every input maps to nearly one vector (mean cosine %s); recall is then "
                    "decided by ties", " and ".join(collapsed), {k: round(v, 4) for k, v in out.items()})
    return out


# -- per-rank shards: each rank takes a contiguous slice, results are gathered in rank order ------------------
def rank_loader(dataset, batch_size, num_workers=0, collate_fn=None):
    n, world, rank = len(dataset), dist.get_world_size(), dist.get_rank()
    step = -(-n // world)
    part = Subset(dataset, range(min(n, rank * step), min(n, (rank + 1) * step)))
    loader = DataLoader(part, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn)
    if dist.is_main():
        from tqdm import tqdm
        return tqdm(loader, desc=type(dataset).__name__, leave=False, dynamic_ncols=True)
    return loader


def gather(items: list) -> list:
    return [x for part in dist.all_gather_object(items) for x in part]


def _write_json(obj, path):
    if path is not None and dist.is_main():
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_caption(model, dataset, how: Decoding, gt_file=None, result_file=None, *, batch_size=64, num_workers=0,
                     meteor=True):
    """Captions [{image_id, caption}] decoded `how` (written to `result_file`), scored against the COCO-format
    `gt_file` with PTB tokenisation + BLEU, METEOR (`meteor`), ROUGE-L, CIDEr (+SPICE). No gt_file (NoCaps): no
    scores."""
    results = []
    with eval_mode(model):
        for images, image_ids in rank_loader(dataset, batch_size, num_workers):
            captions = model.generate(images.to(model.device), how)
            results += [{"image_id": int(i), "caption": c} for i, c in zip(image_ids, captions)]
    results = gather(results)
    _write_json(results, result_file)
    scores = caption_scores(results, gt_file, meteor=meteor) if gt_file is not None and dist.is_main() else {}
    return dist.all_gather_object(scores)[0]  # rank 0 scored (Java); every rank returns its numbers


@torch.no_grad()
def evaluate_vqa(model, dataset, answer_list=None, result_file=None, *, method="rank", k=128, batch_size=64,
                 num_workers=0):
    """Answers [{question_id, answer}] by `method` ('rank' over `answer_list` with top `k` first tokens, or
    'generate'), written to `result_file`; the official VQA accuracy when every question has answers."""
    results = []
    with eval_mode(model):
        for images, questions, qids in rank_loader(dataset, batch_size, num_workers):
            answers = model.answer(images.to(model.device), questions, method=method, answer_list=answer_list, k=k)
            results += [{"question_id": int(q), "answer": a} for q, a in zip(qids, answers)]
    results = gather(results)
    _write_json(results, result_file)
    gt = {e["question_id"]: e.get("answer") for e in dataset.ann}
    if not all(isinstance(a, list) for a in gt.values()):
        return {}  # test-dev / test-std: the server scores the result file
    return {"acc": vqa_accuracy([r["answer"] for r in results], [gt[r["question_id"]] for r in results])}


@torch.no_grad()
def evaluate_nlvr(model, dataset, batch_size=64, num_workers=0):
    """Accuracy (%) of the True/False predictions."""
    preds, labels = [], []
    with eval_mode(model):
        for image0, image1, sentences, label in rank_loader(dataset, batch_size, num_workers):
            preds += model.predict(image0.to(model.device), image1.to(model.device), sentences).tolist()
            labels += label.tolist()
    return {"acc": accuracy(gather(preds), gather(labels))}
