"""The inference functions: each takes a model and a collection of images and YIELDS one result dict at a time,
batch by batch, so a notebook can iterate over a whole dataset and the command line can stream them to a file.

    import blip
    from blip import inference
    model = blip.load_model("caption", "model_base_caption_capfilt_large.pth").eval()
    for row in inference.caption(model, "photos/", batch_size=16, workers=4, precision="bf16"):
        print(row["image"], row["caption"])

`images` is anything `collect` reads (a folder, glob, file list, annotation JSON, shard, or a list of them) or a
list of `Item`s. Unreadable images are skipped: appended to `unreadable` as (item, reason) when a list is given,
logged otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import autocast as precision_context
from ..data.tokenizer import first_token_as, pre_caption, pre_question
from .inputs import Item, collect, image_batches

def as_items(images) -> list[Item]:
    if isinstance(images, (list, tuple)) and images and all(isinstance(x, Item) for x in images):
        return list(images)
    return collect(images)


def autocast(model, precision: str = "fp32"):
    """The model's device in `precision` (blip.precision: fp32, bf16, fp16 autocast, tf32)."""
    return precision_context(model.device, precision)


def _batches(model, images, batch_size, workers, unreadable):
    return image_batches(as_items(images), model.cfg.image_size, batch_size=batch_size, workers=workers,
                         device=model.device, unreadable=unreadable)


def caption(model, images, *, batch_size=8, workers=2, precision="fp32", num_beams=3, max_length=20, min_length=5,
            repetition_penalty=None, sample=False, top_p=0.9, top_k=50, prompt=None, num_captions=1, seed=0,
            unreadable=None):
    """{"image": id, "caption": str} per image (with num_captions > 1, nucleus sampling only:
    {"image", "captions": [...]}). Beam search by default (the original's evaluation: 3 beams, 20 tokens with the
    prompt, at least 5); `sample=True` for nucleus sampling (repetition penalty 1.1 unless given, as CapFilt).
    The sampler's generator is seeded by `seed` once per run, so a run's captions are reproducible."""
    if num_captions > 1 and not sample:
        raise ValueError("num_captions > 1 needs sample=True (beam search returns its single best caption)")
    rep = (1.1 if sample else 1.0) if repetition_penalty is None else repetition_penalty
    generator = torch.Generator(model.device).manual_seed(seed) if sample else None
    for items, x in _batches(model, images, batch_size, workers, unreadable):
        with torch.inference_mode(), autocast(model, precision):
            caps = model.generate(x, num_beams=num_beams, max_length=max_length, min_length=min_length,
                                  repetition_penalty=rep, sample=sample, top_p=top_p, top_k=top_k, prompt=prompt,
                                  generator=generator, num_captions=num_captions)
        for i, item in enumerate(items):
            if num_captions == 1:
                yield {"image": item.id, "caption": caps[i]}
            else:
                yield {"image": item.id, "captions": caps[i * num_captions:(i + 1) * num_captions]}


def answer(model, images, question=None, *, batch_size=8, workers=2, precision="fp32", method="generate",
           answer_list=None, k=128, num_beams=3, max_length=10, min_length=1, unreadable=None):
    """{"image", "question", "answer"} per image: `question` for every image, or each item's own `text` (per-image
    questions, `inputs.with_texts`). Questions are cleaned as the original (pre_question)."""
    items = as_items(images)
    if question is None and any(it.text is None for it in items):
        missing = next(it.id for it in items if it.text is None)
        raise ValueError(f"no question for {missing}: give one question for all images or one per image")
    for batch, x in _batches(model, items, batch_size, workers, unreadable):
        qs = [pre_question(question if it.text is None else it.text) for it in batch]
        with torch.inference_mode(), autocast(model, precision):
            out = model.answer(x, qs, method=method, answer_list=answer_list, k=k, num_beams=num_beams,
                               max_length=max_length, min_length=min_length)
        for it, q, a in zip(batch, qs, out):
            yield {"image": it.id, "question": q, "answer": a}


def _text_features(model, texts, precision):
    """(ITM ids, mask, ITC features) of texts, tokenized and encoded once for a whole run."""
    with torch.inference_mode(), autocast(model, precision):
        return model.encode_texts(texts, first_token=model.itm_first_token)


def itm(model, images, texts=None, *, batch_size=8, workers=2, precision="fp32", unreadable=None):
    """{"image", "text", "itm", "itc"}: every image × every text of `texts` (the ViT runs once per image and
    each text is tokenized and ITC-encoded once), or, without `texts`, each item with its own text (the captions
    of a JSON annotation file). itm = match probability, itc = cosine similarity of the projected features."""
    items = as_items(images)
    if texts is not None:
        texts = [pre_caption(t) for t in texts]
        ids, mask, text_feat = _text_features(model, texts, precision)
    elif any(it.text is None for it in items):
        missing = next(it.id for it in items if it.text is None)
        raise ValueError(f"no text for {missing}: give texts (every image × every text) or pairs (a JSON "
                         f"annotation file with captions)")
    for batch, x in _batches(model, items, batch_size, workers, unreadable):
        with torch.inference_mode(), autocast(model, precision):
            image_embeds, image_feat = model.image_features(x)
            if texts is not None:
                prob = model.itm_matrix(image_embeds, ids, mask)
                sim = image_feat.float() @ text_feat.t()
                for i, it in enumerate(batch):
                    for j, t in enumerate(texts):
                        yield {"image": it.id, "text": t, "itm": prob[i, j].item(), "itc": sim[i, j].item()}
                continue
            own = [pre_caption(it.text) for it in batch]
            pid, pmask, pfeat = model.text_features(own)
            pid = first_token_as(pid, model.itm_first_token)
            prob = model.itm_logits(image_embeds, pid, pmask).float().softmax(-1)[:, 1]
            sim = (image_feat.float() * pfeat.float()).sum(-1)
        for it, t, p, s in zip(batch, own, prob.tolist(), sim.tolist()):
            yield {"image": it.id, "text": t, "itm": p, "itc": s}


def embed_images(model, images, *, batch_size=8, workers=2, precision="fp32", unreadable=None):
    """{"image": id, "embedding": float32 [embed_dim]} per image: the normalised projected ITC feature."""
    for batch, x in _batches(model, images, batch_size, workers, unreadable):
        with torch.inference_mode(), autocast(model, precision):
            _, feat = model.image_features(x)
        feat = feat.float().cpu()
        for it, f in zip(batch, feat):
            yield {"image": it.id, "embedding": f}


def embed_texts(model, texts, *, batch_size=256, precision="fp32"):
    """{"text": cleaned text, "embedding": float32 [embed_dim]} per text (pre_caption cleaning, as training)."""
    texts = [pre_caption(t) for t in texts]
    for s in range(0, len(texts), batch_size):
        with torch.inference_mode(), autocast(model, precision):
            feat = model.text_features(texts[s:s + batch_size])[2].float().cpu()
        for t, f in zip(texts[s:s + batch_size], feat):
            yield {"text": t, "embedding": f}


def _faiss():
    try:
        import faiss
        return faiss
    except ImportError:
        return None


def top_k(gallery: torch.Tensor, queries: torch.Tensor, k: int, use_faiss: bool | None = None, chunk=65536):
    """(scores, indices) [n_query, k] of the k largest inner products: FAISS's exact flat index when `use_faiss`
    (None: when faiss is installed and the gallery has over 100,000 rows), else a chunked matrix product (memory
    O(n_query × chunk))."""
    k = min(k, gallery.shape[0])
    faiss = _faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ImportError("use_faiss=True, but faiss is not installed: pip install faiss-cpu (or `blip[faiss]`)")
    if faiss is not None and (use_faiss or gallery.shape[0] > 100_000):
        index = faiss.IndexFlatIP(gallery.shape[1])  # faiss-cpu: host arrays, whatever device the features are on
        index.add(gallery.float().cpu().contiguous().numpy())
        scores, idx = index.search(queries.float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()
    best_s, best_i = None, None
    for s in range(0, gallery.shape[0], chunk):
        sims = queries.float() @ gallery[s:s + chunk].float().t()
        cs, ci = sims.topk(min(k, sims.shape[1]), dim=1)
        ci = ci + s
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            both_s, both_i = torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1)
            best_s, order = both_s.topk(k, dim=1)
            best_i = both_i.gather(1, order)
    return best_s, best_i


def search(model, gallery_ids, gallery_feats, queries, *, k=5, rerank=0, use_faiss=None, precision="fp32",
           workers=2, unreadable=None):
    """{"query", "rank", "image", "score", "itc"} for the top `k` gallery images of each text query, by ITC
    cosine similarity (`gallery_feats` [n, embed_dim] from `embed_images`). `rerank` > 0: the top `rerank` (≥ k)
    are re-ordered by ITM match probability (their images are read again; score = itm probability)."""
    texts = [pre_caption(q) for q in queries]
    ids, mask, qfeat = _text_features(model, texts, precision)
    deep = max(k, rerank)
    scores, index = top_k(gallery_feats, qfeat, deep, use_faiss)
    from .inputs import resolve
    for qi, q in enumerate(texts):
        cand = [(gallery_ids[j], s) for j, s in zip(index[qi].tolist(), scores[qi].tolist())]
        if rerank:
            items = [resolve(c) for c, _ in cand]
            itc = dict(cand)
            probs = {}
            for batch, x in _batches(model, items, 16, workers, unreadable):
                with torch.inference_mode(), autocast(model, precision):
                    emb, _ = model.image_features(x)
                    p = model.itm_logits(emb, ids[qi:qi + 1].expand(len(batch), -1),
                                         mask[qi:qi + 1].expand(len(batch), -1)).float().softmax(-1)[:, 1]
                probs.update({it.id: v for it, v in zip(batch, p.tolist())})
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
            rows = [(img, p, itc[img]) for img, p in ranked]
        else:
            rows = [(img, s, s) for img, s in cand[:k]]
        for r, (img, score, sim) in enumerate(rows, 1):
            yield {"query": q, "rank": r, "image": img, "score": score, "itc": sim}


DEFAULT_TEMPLATES = ("a picture of a {}.", "a photo of a {}.")


def label_features(model, labels, templates=DEFAULT_TEMPLATES, precision="fp32"):
    """Zero-shot class weights [n_labels, embed_dim]: each label through every template, the ITC text features
    averaged over templates and normalised again (CLIP's prompt ensembling)."""
    texts = [t.format(label) for label in labels for t in templates]
    _, _, feats = _text_features(model, [pre_caption(t) for t in texts], precision)
    return F.normalize(feats.view(len(labels), len(templates), -1).mean(1), dim=-1)


def classify(model, images, labels, *, templates=DEFAULT_TEMPLATES, k=5, rerank=0, batch_size=8, workers=2,
             precision="fp32", unreadable=None):
    """{"image", "labels": top-k names, "scores": their scores, "label": the truth when the item has one}.
    Scores are ITC cosine similarities to the label's template-averaged text feature; `rerank` > 0 re-orders an
    image's top `rerank` labels by ITM match probability averaged over the templates (then scores are those)."""
    labels = list(labels)
    if not labels:
        raise ValueError("classify needs label names")
    weights = label_features(model, labels, templates, precision)
    if rerank:
        texts = [pre_caption(t.format(label)) for label in labels for t in templates]
        ids, mask, _ = _text_features(model, texts, precision)
    k = min(k, len(labels))
    for batch, x in _batches(model, images, batch_size, workers, unreadable):
        with torch.inference_mode(), autocast(model, precision):
            emb, feat = model.image_features(x)
            sims = feat.float() @ weights.t()
            if rerank:
                r = min(max(rerank, k), len(labels))
                top_sim, top = sims.topk(r, dim=1)
                nt = len(templates)
                rows = (top[:, :, None] * nt + torch.arange(nt, device=top.device)).reshape(-1)  # [b*r*nt]
                index = torch.arange(len(batch), device=emb.device).repeat_interleave(r * nt)
                p = model.itm_logits(emb, ids[rows], mask[rows], image_index=index).float().softmax(-1)[:, 1]
                p = p.view(len(batch), r, nt).mean(-1)
                ps, order = p.topk(k, dim=1)
                best_s, best = ps, top.gather(1, order)
            else:
                best_s, best = sims.topk(k, dim=1)
        for it, s, i in zip(batch, best_s.tolist(), best.tolist()):
            row = {"image": it.id, "labels": [labels[j] for j in i], "scores": s}
            if it.label is not None:
                row["label"] = it.label
            yield row


def accuracy(rows, k=None) -> dict:
    """Top-1 and top-k accuracy (%) over the rows of `classify` that carry a true `label`."""
    rows = [r for r in rows if r.get("label") not in (None, "")]  # CSV rows without a label read back as ""
    if not rows:
        return {}
    k = k or max(len(r["labels"]) for r in rows)
    top1 = sum(r["labels"][0] == r["label"] for r in rows)
    topk = sum(r["label"] in r["labels"][:k] for r in rows)
    return {"n": len(rows), "top1": 100.0 * top1 / len(rows), f"top{k}": 100.0 * topk / len(rows)}
