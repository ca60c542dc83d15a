"""Image-text matching (`itm`), retrieval fine-tuning (`retrieval`) and pretraining (`pretrain`) models.

BlipITM: ViT + text encoder + projections + ITM head (the original blip_itm, also the feature extractor).
BlipRetrieval: + momentum encoders, feature queues, image-index queue (ITC with several positives).
BlipPretrain: + the LM decoder tied to the text encoder; ITC + ITM + LM.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dist
from ..data.batches import PairBatch, sample_one
from .losses import draw_hard_negatives, itc_loss, itm_pairs
from .med import TextDecoder, TextModel, tie_decoder_to_encoder
from ..precision import autocast
from ..data.tokenizer import CLS_ID, DEC_ID, ENC_ID, PAD_ID, first_token_as
from .base import BlipModel, MomentumMixin


class RetrievalProtocol:
    """The retrieval protocol every model with ITC features and an ITM head shares (BLIP's, X-FM's): a gallery's
    texts encoded once, ITC top-k, ITM re-rank, the ITM matrix. A model gives `image_features(pixel_values)` ->
    (tokens, feature), `text_features(texts)` -> (ids, mask, feature), `itm_logits(image_embeds, ids, mask,
    image_index=None)`, `itm_first_token` and `text_max_length`."""

    def encode_texts(self, texts, *, first_token=None, chunk=256, width=None):
        """(ids, mask, float32 ITC features) of many texts, tokenized and encoded `chunk` at a time and padded to one
        width (`width`, else the longest): what a gallery, a query set or a label set is encoded by once.
        `first_token`: the ids' first token for ITM ([CLS] or [ENC]: the model's `itm_first_token`); None keeps
        [CLS], the text encoder's."""
        ids, mask, feats = [], [], []
        for s in range(0, len(texts), chunk):
            i, m, f = self.text_features(texts[s:s + chunk])
            ids.append(i), mask.append(m), feats.append(f.float())
        width = width or max(i.shape[1] for i in ids)
        ids = torch.cat([F.pad(i, (0, width - i.shape[1])) for i in ids])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in mask])
        return (ids if first_token is None else first_token_as(ids, first_token)), mask, torch.cat(feats)

    def itm_matrix(self, image_embeds, ids, mask, pairs_per_call=128):
        """ITM match probability [n_images, n_texts] for every image × every text, the image tokens encoded once
        (the ViT ran once per image) and each image's cross-attention K/V projected once per call."""
        n_img, n_txt = image_embeds.shape[0], ids.shape[0]
        out = torch.empty(n_img, n_txt, device=image_embeds.device)
        per = max(1, pairs_per_call // n_txt)  # whole images per call, so rows stay grouped by image
        if per > 1 or n_txt <= pairs_per_call:
            for s in range(0, n_img, per):
                emb = image_embeds[s:s + per]
                index = torch.arange(len(emb), device=emb.device).repeat_interleave(n_txt)
                logits = self.itm_logits(emb, ids.repeat(len(emb), 1), mask.repeat(len(emb), 1), image_index=index)
                out[s:s + per] = logits.float().softmax(-1)[:, 1].view(len(emb), n_txt)
            return out
        for i in range(n_img):  # many texts: chunks of texts against one image
            for s in range(0, n_txt, pairs_per_call):
                t = slice(s, s + pairs_per_call)
                index = torch.zeros(ids[t].shape[0], dtype=torch.long, device=ids.device)
                logits = self.itm_logits(image_embeds[i:i + 1], ids[t], mask[t], image_index=index)
                out[i, t] = logits.float().softmax(-1)[:, 1]
        return out

    @torch.no_grad()
    def retrieval_scores(self, pixel_values=None, texts=None, k_test=256, *, image_embeds=None, image_feat=None,
                         text_ids=None, text_mask=None, text_feat=None, batch_size=128, progress=False,
                         precision="fp32", across_ranks=False):
        """The original retrieval protocol, the one every caller runs: ITC top-k per query, then ITM logit[:, 1] +
        ITC similarity for those k, −100 elsewhere. Returns (score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]).

        Re-ranking is batched over queries (`batch_size` pairs per ITM call), not one query at a time.
        Precomputed features may be passed instead of pixel_values/texts (the evaluator does). `across_ranks`:
        each torchrun rank re-ranks a contiguous slice of the queries and the rows are gathered, so N ranks give
        one process's scores.
        """
        if image_embeds is None:
            image_embeds, image_feat = self.image_features(pixel_values)
        if text_feat is None:
            text_ids, text_mask, text_feat = self.text_features(texts)
        text_ids = first_token_as(text_ids, self.itm_first_token)
        sims = image_feat @ text_feat.t()
        world, rank = (dist.get_world_size(), dist.get_rank()) if across_ranks else (1, 0)

        def scores(s, queries_are_images):
            step = -(-s.shape[0] // world)
            lo, hi = min(s.shape[0], rank * step), min(s.shape[0], (rank + 1) * step)
            part = self.rerank(s[lo:hi], k_test, image_embeds, text_ids, text_mask,
                               queries_are_images=queries_are_images, batch_size=batch_size, query_offset=lo,
                               progress=progress, precision=precision)
            if world > 1:
                part = torch.cat([p.to(s.device) for p in dist.all_gather_object(part.cpu())])
            return part

        return scores(sims, True), scores(sims.t(), False)

    @torch.no_grad()
    def rerank(self, sims, k, image_embeds, text_ids, text_mask, *, queries_are_images, batch_size=128,
               query_offset=0, progress=False, precision="fp32"):
        """ITM re-rank of each query row's top-k columns. sims [n_query, n_cand] (rows may be a slice
        of the queries starting at `query_offset`). `precision`: the ITM passes' (blip.precision: bf16 or tf32 on a
        GPU; the candidates' order is fp32 ITC either way)."""
        k = min(k, sims.shape[1])
        top_sim, top_idx = sims.topk(k, dim=1)
        q_idx = (torch.arange(sims.shape[0], device=sims.device) + query_offset)[:, None].expand(-1, k).reshape(-1)
        c_idx = top_idx.reshape(-1)
        img_idx, txt_idx = (q_idx, c_idx) if queries_are_images else (c_idx, q_idx)
        # Pairs sorted by image: a chunk then holds few images, whose cross-attention K/V (the bulk of an ITM
        # pass: 577 image tokens against ~35 text tokens at base size) are projected once per chunk.
        order = img_idx.argsort(stable=True)
        scores = torch.empty(len(c_idx), device=sims.device)
        starts = range(0, len(c_idx), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc=f"ITM re-rank ({precision})", leave=False)
        with autocast(image_embeds.device, precision):
            for s in starts:
                rows = order[s:s + batch_size]
                images, index = img_idx[rows].unique(return_inverse=True)
                ids, mask = text_ids[txt_idx[rows]], text_mask[txt_idx[rows]]
                width = int(mask.sum(1).max())  # trim padding shared by the whole chunk
                scores[rows] = self.itm_logits(image_embeds[images], ids[:, :width], mask[:, :width],
                                               image_index=index)[:, 1].float()
        out = torch.full_like(sims, -100.0)
        out.scatter_(1, top_idx, scores.view(-1, k) + top_sim)
        return out


class BlipITM(RetrievalProtocol, BlipModel):
    task = "itm"
    transformers_class = "BlipForImageTextRetrieval"
    itm_first_token = CLS_ID  # the original's standalone ITM model keeps [CLS] first
    text_max_length = 35

    def __init__(self, cfg):
        super().__init__(cfg)
        tcfg = self.text_cfg()
        self.text_encoder = TextModel(tcfg)
        self.vision_proj = nn.Linear(self.vision_cfg.width, cfg.embed_dim)
        self.text_proj = nn.Linear(tcfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(tcfg.hidden_size, 2)

    # -- features -------------------------------------------------------------------------------
    def image_features(self, pixel_values):
        """(image token embeddings [B, N, w], normalised projected [CLS] feature [B, embed_dim])."""
        image_embeds = self.visual_encoder(pixel_values)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, texts, max_length=None):
        """(ids, mask, normalised projected [CLS] feature) of the text-only encoder."""
        ids, mask = self.tokenize(texts, max_length=max_length or self.text_max_length)
        return ids, mask, self.encode_text(ids, mask)

    def encode_text(self, ids, mask):
        """Normalised projected [CLS] feature of tokenized texts ([CLS] first)."""
        return F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0]), dim=-1)

    def itm_logits(self, image_embeds, ids, mask, image_index=None):
        """ITM head over paired rows: ids[i] with image_embeds[i], or with image_embeds[image_index[i]]
        (then each image's cross-attention K/V are projected once, however many texts it is paired with)."""
        if image_index is None:
            return self.itm_head(self.text_encoder(ids, mask, image_embeds)[:, 0])
        kv = self.text_encoder.cross_kv(image_embeds, index=image_index)
        return self.itm_head(self.text_encoder(ids, mask, cross_kv=kv)[:, 0])

    # -- inference API ----------------------------------------------------------------------------
    @torch.no_grad()
    def itm_score(self, pixel_values, texts, image_index=None, first_token=None):
        """Match probability of text i with image i, or with image image_index[i] (the ViT runs once per image
        however many texts it has). `first_token`: [CLS] or [ENC] in place of the model's own (itm_first_token)."""
        image_embeds = self.visual_encoder(pixel_values)
        if image_index is not None:
            image_embeds = image_embeds[torch.as_tensor(image_index, device=image_embeds.device)]
        first = self.itm_first_token if first_token is None else first_token
        ids, mask = self.tokenize(texts, max_length=self.text_max_length, first_token=first)
        return self.itm_logits(image_embeds, ids, mask).float().softmax(-1)[:, 1]

    @torch.no_grad()
    def itc_similarity(self, pixel_values, texts):
        """Cosine similarity of the projected [CLS] features, images × texts (no temperature)."""
        _, image_feat = self.image_features(pixel_values)
        return image_feat @ self.text_features(texts)[2].t()

    @torch.no_grad()
    def extract_features(self, pixel_values=None, texts=None, mode="multimodal"):
        """The original feature extractor: 'image' → ViT tokens, 'text' → text-encoder states,
        'multimodal' → text ([ENC] first) cross-attending to the image (pairs)."""
        if mode == "image":
            return self.visual_encoder(pixel_values)
        if mode == "text":
            ids, mask = self.tokenize(texts)
            return self.text_encoder(ids, mask)
        ids, mask = self.tokenize(texts, first_token=ENC_ID)
        return self.text_encoder(ids, mask, self.visual_encoder(pixel_values))

class _Contrastive(MomentumMixin, BlipITM):
    """ITC (momentum encoders + queues) and ITM with hard negatives: shared by retrieval and pretraining.

    `batch_losses(batch: PairBatch, ...)` is the training path (tensors from the task's collate; no host sync);
    `losses(pixel_values, texts, ...)` is the same computation from strings, for notebooks and the parity tests."""
    itm_first_token = ENC_ID
    decodes = False  # pretraining also trains the LM decoder

    def __init__(self, cfg, ptr_name):
        super().__init__(cfg)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self._init_momentum([("visual_encoder", self.visual_encoder), ("vision_proj", self.vision_proj),
                             ("text_encoder", self.text_encoder), ("text_proj", self.text_proj)],
                            cfg.queue_size, cfg.embed_dim, ptr_name)

    def pair_batch(self, pixel_values, texts, idx=None, negative_captions=None) -> PairBatch:
        """The batch a training collate would make of these strings (tokenized here, on the host)."""
        return PairBatch.of(pixel_values, texts, self.text_max_length, idx=idx, negatives=negative_captions,
                            lm=self.decodes).to(self.device)

    @torch.no_grad()
    def momentum_features(self, pixel_values, ids, mask):
        """Normalised projected [CLS] features of the momentum encoders: (image, text)."""
        image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]), dim=-1)
        text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask)[:, 0]), dim=-1)
        return image_feat_m, text_feat_m

    def negative_features(self, batch: PairBatch):
        """NegCLIP's hard captions of the batch: (online features, with gradient so the text encoder learns to tell
        them apart; momentum features, for the distillation targets); None when the batch has none."""
        if batch.neg_ids is None:
            return None
        feat = self.encode_text(batch.neg_ids, batch.neg_mask)
        with torch.no_grad():
            feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(batch.neg_ids, batch.neg_mask)[:, 0]), dim=-1)
        return feat, feat_m

    def itc_keys(self, alpha, positives, batch: PairBatch) -> dict:
        """itc_loss's keywords beyond the four features: the queues, temperature, targets and NegCLIP's negatives."""
        negs = self.negative_features(batch) or (None, None)
        return dict(image_queue=self.image_queue, text_queue=self.text_queue, temp=self.temp, alpha=alpha,
                    pos=positives, neg_text_feat=negs[0], neg_text_feat_m=negs[1])

    def _features(self, batch: PairBatch):
        """What both objectives read: image tokens and features, text features, their momentum twins."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat = self.image_features(batch.images)
        text_feat = self.encode_text(batch.ids, batch.mask)
        image_feat_m, text_feat_m = self.momentum_features(batch.images, batch.ids, batch.mask)
        return image_embeds, image_feat, text_feat, image_feat_m, text_feat_m

    def itm_loss(self, image_embeds, batch: PairBatch, hard_negatives, all_rank, generator=None):
        """ITM cross-entropy over b positives and 2b hard negatives: hard_negatives = (image index for each text,
        text index for each image), into the local batch or, with `all_rank`, the batch of every rank.
        The batch's hard captions (NegCLIP) add one row (one of image i's own hard captions, image i), label 0, for
        each image that has one."""
        ids, mask = first_token_as(batch.ids, self.itm_first_token), batch.mask
        neg_images, neg_ids, neg_mask = image_embeds, ids, mask
        if all_rank:  # gathered ids must share one width across ranks
            pad = self.text_max_length - ids.shape[1]
            ids, mask = F.pad(ids, (0, pad), value=PAD_ID), F.pad(mask, (0, pad))
            neg_images = dist.all_gather_with_grad(image_embeds)
            neg_ids, neg_mask = dist.all_gather_no_grad(ids), dist.all_gather_no_grad(mask)
        image_for_text, text_for_image = (torch.as_tensor(h, device=ids.device) for h in hard_negatives)
        images, ids, mask, labels = itm_pairs(image_embeds, ids, mask, neg_image_for_text=image_for_text,
                                              neg_text_for_image=text_for_image, neg_image_embeds=neg_images,
                                              neg_ids=neg_ids, neg_mask=neg_mask)
        if batch.neg_ids is not None:
            with torch.no_grad():
                picked = sample_one(batch.neg_weights, generator)  # one of each row's own, uniformly
            n_ids, n_mask = first_token_as(batch.neg_ids[picked], self.itm_first_token), batch.neg_mask[picked]
            width = max(ids.shape[1], n_ids.shape[1])
            ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=PAD_ID),
                             F.pad(n_ids, (0, width - n_ids.shape[1]), value=PAD_ID)])
            mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])), F.pad(n_mask, (0, width - n_mask.shape[1]))])
            images = torch.cat([images, image_embeds[batch.neg_rows]])
            labels = torch.cat([labels, labels.new_zeros(len(batch.neg_rows))])
        return F.cross_entropy(self.itm_logits(images, ids, mask).float(), labels)


class BlipRetrieval(_Contrastive):
    task = "retrieval"
    transformers_class = "BlipForImageTextRetrieval"
    fresh_keys = ("idx_queue", "ptr_queue", "image_queue", "text_queue", "temp", "_m.")

    def __init__(self, cfg):
        super().__init__(cfg, "ptr_queue")
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))

    def losses(self, pixel_values, texts, idx, *, alpha=0.4, hard_negatives=None, update_queue=True,
               return_negatives=False, generator=None, negative_captions=None):
        """loss_ita (all captions of one image index are positives) + loss_itm (hard negatives).

        Call `momentum_update()` first in training, as the original did at the start of its forward.
        `negative_captions` (one list of strings per caption, blip.data.negatives): NegCLIP's hard negative captions,
        extra image->text ITC negatives and one more ITM negative row per image (off when None: the original).
        """
        return self.batch_losses(self.pair_batch(pixel_values, texts, idx, negative_captions), alpha, hard_negatives,
                                 update_queue, return_negatives, generator)

    def batch_losses(self, batch: PairBatch, alpha=0.4, hard_negatives=None, update_queue=True,
                     return_negatives=False, generator=None):
        idx = batch.idx.view(-1, 1)
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._features(batch)
        positives = torch.eq(idx, torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)).float()
        loss_ita, _, _ = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                  **self.itc_keys(alpha, positives, batch))
        if update_queue:
            self.enqueue(image_feat_m, text_feat_m, idx.view(-1))

        # hard negatives: drawn by similarity of the ONLINE features; every caption of the same image is masked
        all_rank = self.cfg.negative_all_rank and dist.get_world_size() > 1
        if hard_negatives is None:
            with torch.no_grad():
                img_all, txt_all, idx_all = image_feat, text_feat, idx
                if all_rank:
                    img_all, txt_all, idx_all = (dist.all_gather_no_grad(t) for t in (image_feat, text_feat, idx))
                same = torch.eq(idx, idx_all.t())
                w_i2t = F.softmax(image_feat @ txt_all.t() / self.temp, 1).masked_fill(same, 0)
                w_t2i = F.softmax(text_feat @ img_all.t() / self.temp, 1).masked_fill(same, 0)
                hard_negatives = draw_hard_negatives(w_t2i, w_i2t, generator=generator)
        out = {"loss_ita": loss_ita, "loss_itm": self.itm_loss(image_embeds, batch, hard_negatives, all_rank, generator)}
        if return_negatives:
            out["negatives"] = tuple(torch.as_tensor(h) for h in hard_negatives)
        return out


class BlipPretrain(_Contrastive):
    task = "pretrain"
    transformers_class = None  # its ITC / ITM / LM heads together: no one transformers class
    starts_every_task = True
    text_max_length = 30
    decodes = True
    fresh_keys = ("image_queue", "text_queue", "queue_ptr", "temp", "_m.", "itm_head", "vision_proj", "text_proj",
                  "text_decoder.")

    def __init__(self, cfg):
        super().__init__(cfg, "queue_ptr")
        self.text_decoder = TextDecoder(self.text_cfg())
        tie_decoder_to_encoder(self.text_decoder, self.text_encoder)

    def losses(self, pixel_values, texts, *, alpha=0.4, hard_negatives=None, update_queue=True,
               return_negatives=False, generator=None, negative_captions=None):
        """loss_ita + loss_itm + loss_lm, as the original pretraining forward (momentum_update() first).
        `negative_captions`: as BlipRetrieval.losses (off when None)."""
        return self.batch_losses(self.pair_batch(pixel_values, texts, negative_captions=negative_captions), alpha,
                                 hard_negatives, update_queue, return_negatives, generator)

    def batch_losses(self, batch: PairBatch, alpha=0.4, hard_negatives=None, update_queue=True,
                     return_negatives=False, generator=None):
        b = batch.images.shape[0]
        image_embeds, image_feat, text_feat, image_feat_m, text_feat_m = self._features(batch)
        positives = torch.eye(b, b + self.image_queue.shape[1], device=image_feat.device)
        loss_ita, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                              **self.itc_keys(alpha, positives, batch))
        if update_queue:
            self.enqueue(image_feat_m, text_feat_m)

        # hard negatives: softmax of the ITC logits (online × momentum) + 1e-4, each pair's own positive zeroed
        all_rank = self.cfg.negative_all_rank and dist.get_world_size() > 1
        if hard_negatives is None:
            with torch.no_grad():
                rows = torch.arange(b, device=image_feat.device)
                if all_rank:  # option: the same logits over the whole global batch
                    image_m, text_m = dist.all_gather_no_grad(image_feat_m), dist.all_gather_no_grad(text_feat_m)
                    sim_t2i, sim_i2t = text_feat @ image_m.t() / self.temp, image_feat @ text_m.t() / self.temp
                    own = rows + dist.get_rank() * b
                else:  # the original: the local batch's columns of the logits already computed
                    sim_t2i, sim_i2t = sim_t2i[:, :b], sim_i2t[:, :b]
                    own = rows
                w_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4
                w_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
                w_t2i[rows, own] = 0
                w_i2t[rows, own] = 0
                hard_negatives = draw_hard_negatives(w_t2i, w_i2t, generator=generator)
        loss_itm = self.itm_loss(image_embeds, batch, hard_negatives, all_rank, generator)

        dec_ids = first_token_as(batch.ids, DEC_ID)
        targets = dec_ids.masked_fill(dec_ids == PAD_ID, -100)
        loss_lm = self.text_decoder.loss(dec_ids, targets, batch.mask, image_embeds, positions=batch.lm_positions)
        out = {"loss_ita": loss_ita, "loss_itm": loss_itm, "loss_lm": loss_lm}
        if return_negatives:
            out["negatives"] = tuple(torch.as_tensor(h) for h in hard_negatives)
        return out
