"""ITC / ITM / LM losses and momentum/queue mechanics against hand computations on tiny tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.models.losses import draw_hard_negatives, itc_loss
from blip.models.med import lm_loss

TINY = dict(image_size=32, patch_size=16, vision_width=24, vision_depth=1, vision_heads=2, embed_dim=8,
            med_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))


def test_itc_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)
    img, txt, img_m, txt_m = unit(2, 3), unit(2, 3), unit(2, 3), unit(2, 3)
    iq, tq = unit(3, 3).t(), unit(3, 3).t()  # queues are [dim, size]
    temp, alpha = 0.5, 0.4
    pos = torch.eye(2, 5)
    loss, _, _ = itc_loss(img, txt, img_m, txt_m, image_queue=iq, text_queue=tq, temp=temp, alpha=alpha, pos=pos)

    def direction(q, q_m, keys_m):  # plain loops over rows and columns
        total = 0.0
        for r in range(2):
            sims = [float(q[r] @ k) / temp for k in keys_m]
            sims_m = [float(q_m[r] @ k) / temp for k in keys_m]
            z, z_m = sum(math.exp(s) for s in sims), sum(math.exp(s) for s in sims_m)
            for c in range(5):
                target = alpha * math.exp(sims_m[c]) / z_m + (1 - alpha) * (1.0 if c == r else 0.0)
                total -= target * (sims[c] - math.log(z))
        return total / 2

    keys_t = list(txt_m) + list(tq.t())
    keys_i = list(img_m) + list(iq.t())
    expected = (direction(img, img_m, keys_t) + direction(txt, txt_m, keys_i)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_lm_loss_label_smoothing_and_sequence_sums():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[5, 1, 2, -100], [5, 3, -100, -100]])
    eps, V = 0.1, 7
    per_seq = []
    for b in range(2):
        s = 0.0
        for t in range(3):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            logp = F.log_softmax(logits[b, t], -1)
            s += -(1 - eps) * logp[y].item() - eps / V * logp.sum().item()
        per_seq.append(s)
    assert lm_loss(logits, labels, reduction="none").tolist() == pytest.approx(per_seq, abs=1e-5)
    assert lm_loss(logits, labels).item() == pytest.approx(sum(per_seq) / 3, abs=1e-5)  # mean over 3 tokens


def test_decoder_loss_computes_logits_only_at_targets_with_the_same_numbers():
    """The decoder's loss runs the LM head only where a target exists; it must equal the loss of the full logits,
    gradients included."""
    torch.manual_seed(0)
    model = blip.load_model("caption", **TINY).eval()
    dec = model.text_decoder
    ids = torch.tensor([[30522, 1037, 3861, 1997, 2417, 102, 0], [30522, 1037, 3861, 1997, 102, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(ids == 0, -100)
    labels[:, :4] = -100  # the prompt
    image = model.visual_encoder(torch.randn(2, 3, 32, 32))
    for reduction in ("mean", "none"):
        full = lm_loss(dec(ids, mask, image), labels, reduction=reduction)
        picked = dec.loss(ids, labels, mask, image, reduction=reduction)
        assert picked.shape == full.shape and torch.allclose(picked, full, atol=1e-6)
    g_full = torch.autograd.grad(lm_loss(dec(ids, mask, image), labels), dec.cls.predictions.bias)[0]
    g_picked = torch.autograd.grad(dec.loss(ids, labels, mask, image), dec.cls.predictions.bias)[0]
    assert torch.allclose(g_full, g_picked, atol=1e-7) and g_full.abs().sum() > 0


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    idx = torch.tensor([0, 1, 0, 2, 1, 3])  # captions of the same image share an index
    same = idx[:, None] == idx[None, :]
    w = torch.rand(6, 6).masked_fill(same, 0)
    for _ in range(200):
        neg_img, neg_txt = draw_hard_negatives(w, w.t().contiguous())
        assert not same[torch.arange(6), neg_img].any()
        assert not same[torch.arange(6), neg_txt].any()


def test_retrieval_losses_draw_valid_negatives():
    model = blip.load_model("retrieval", queue_size=8, **TINY)
    x = torch.randn(4, 3, 32, 32)
    idx = [0, 1, 0, 2]
    for seed in range(20):
        out = model.losses(x, ["a", "b", "c", "d"], idx=idx, return_negatives=True,
                           generator=torch.Generator().manual_seed(seed))
        neg_img, neg_txt = out["negatives"]
        for b in range(4):
            assert idx[neg_img[b]] != idx[b] and idx[neg_txt[b]] != idx[b]


def test_momentum_update_and_enqueue_are_exact():
    model = blip.load_model("pretrain", queue_size=8, **TINY)
    online = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.visual_encoder_m.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.visual_encoder_m.state_dict().items()}
    model.momentum_update()
    for k, v in model.visual_encoder_m.state_dict().items():
        assert torch.allclose(v, 0.995 * before[k] + 0.005 * online[k], atol=1e-6)
    q0 = model.image_queue.clone()
    f_img, f_txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    model.enqueue(f_img, f_txt)
    assert torch.equal(model.image_queue[:, :4], f_img.t()) and torch.equal(model.text_queue[:, :4], f_txt.t())
    assert torch.equal(model.image_queue[:, 4:], q0[:, 4:])
    assert int(model.queue_ptr) == 4
    model.enqueue(f_img, f_txt)
    assert int(model.queue_ptr) == 0  # wrapped
    with pytest.raises(ValueError, match="not divisible"):
        model.enqueue(f_img[:3], f_txt[:3])
