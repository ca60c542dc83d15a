"""BLIP's training objectives as plain functions: ITC with momentum distillation, ITM hard negatives.

(The LM loss lives beside the decoder: `blip.models.med.lm_loss`, `TextDecoder.loss`.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batches import sample_one


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, *, image_queue, text_queue, temp, alpha, pos,
             neg_text_feat=None, neg_text_feat_m=None):
    """Image-text contrastive loss with a queue and momentum distillation.

    Online features of one modality are scored against the momentum features + queue of the other;
    targets = alpha·softmax(momentum similarities) + (1−alpha)·pos normalised per row.
    pos: [b, b + queue] 0/1 positives. Returns (loss_ita, sim_i2t, sim_t2i).

    Hard negative captions (NegCLIP): `neg_text_feat` [m, d] (online, with gradient, so that the text encoder
    learns to tell them apart) and `neg_text_feat_m` (momentum, for the distillation targets) add m columns to
    the image->text logits only; they are negatives of every image (target 0 apart from distillation). The
    returned sim_i2t keeps its [b, b + queue] columns.
    """
    image_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
    text_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
    extra = neg_text_feat is not None and len(neg_text_feat) > 0
    with torch.no_grad():
        targets = pos / pos.sum(1, keepdim=True)
        if extra:
            sim_m = torch.cat([image_feat_m @ text_all, image_feat_m @ neg_text_feat_m.t()], dim=1) / temp
            i2t_targets = alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * F.pad(targets, (0, len(neg_text_feat)))
        else:
            i2t_targets = alpha * F.softmax(image_feat_m @ text_all / temp, dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_all / temp, dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    logits_i2t = torch.cat([sim_i2t, image_feat @ neg_text_feat.t() / temp], dim=1) if extra else sim_i2t
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@torch.no_grad()
def draw_hard_negatives(weights_t2i, weights_i2t, generator=None):
    """One similarity-weighted draw per row: (image index for each text, text index for each image); the draws of
    torch.multinomial(weights, 1), without its host sync (blip.data.batches.sample_one)."""
    return sample_one(weights_t2i, generator), sample_one(weights_i2t, generator)


def itm_pairs(image_embeds, ids, mask, *, neg_image_for_text, neg_text_for_image, neg_image_embeds, neg_ids, neg_mask):
    """The 3b ITM rows: b positives, b (text, its negative image), b (negative text, image) -> (image embeds, ids,
    mask, labels). Negatives index into `neg_*`: the local batch, or the all-rank one."""
    b = ids.shape[0]
    images = torch.cat([image_embeds, neg_image_embeds[neg_image_for_text], image_embeds])
    ids_all = torch.cat([ids, ids, neg_ids[neg_text_for_image]])
    mask_all = torch.cat([mask, mask, neg_mask[neg_text_for_image]])
    labels = (torch.arange(3 * b, device=ids.device) < b).long()  # 1 for the b positives, 0 for the 2b negatives
    return images, ids_all, mask_all, labels
