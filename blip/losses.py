"""BLIP's training objectives as plain functions: ITC with momentum distillation, ITM hard negatives.

(The LM loss lives beside the decoder: `blip.med.lm_loss`, `TextDecoder.loss`.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, pos):
    """Image-text contrastive loss with a queue and momentum distillation.

    Online features of one modality are scored against the momentum features + queue of the other;
    targets = alpha·softmax(momentum similarities) + (1−alpha)·pos normalised per row.
    pos: [b, b + queue] 0/1 positives. Returns (loss_ita, sim_i2t, sim_t2i).
    """
    image_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
    text_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
    with torch.no_grad():
        targets = pos / pos.sum(1, keepdim=True)
        i2t_targets = alpha * F.softmax(image_feat_m @ text_all / temp, dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_all / temp, dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@torch.no_grad()
def draw_hard_negatives(weights_t2i, weights_i2t, generator=None):
    """One similarity-weighted draw per row: (image index for each text, text index for each image)."""
    neg_image_for_text = torch.multinomial(weights_t2i.float(), 1, generator=generator)[:, 0]
    neg_text_for_image = torch.multinomial(weights_i2t.float(), 1, generator=generator)[:, 0]
    return neg_image_for_text, neg_text_for_image


def itm_pairs(image_embeds, ids, mask, neg_image_for_text, neg_text_for_image, neg_image_embeds, neg_ids, neg_mask):
    """The 3b ITM rows: b positives, b (text, its negative image), b (negative text, image) -> (image embeds, ids,
    mask, labels). Negatives index into `neg_*`: the local batch, or the all-rank one."""
    b = ids.shape[0]
    images = torch.cat([image_embeds, neg_image_embeds[neg_image_for_text], image_embeds])
    ids_all = torch.cat([ids, ids, neg_ids[neg_text_for_image]])
    mask_all = torch.cat([mask, mask, neg_mask[neg_text_for_image]])
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(ids.device)
    return images, ids_all, mask_all, labels
