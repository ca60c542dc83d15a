"""X-FM: each loss against a hand computation, the masks, the stop-gradient (by gradients), learning, round trips."""
import io
import math

import pytest
import torch

from blip.models.xfm import (XFM, XFMConfig, block_mask, hard_negative_weights, itc_loss_xfm, itm_loss, mim_loss,
                             mlm_loss, mlm_mask, wordpiece_word_ids)
from blip.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, get_tokenizer, tokenize

TEXTS = ["an unbelievably tokenized sentence", "a red circle left of a blue square",
         "two yellow crosses", "a big green star"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def tiny(seed=0):
    torch.manual_seed(seed)
    return XFM(XFMConfig.from_preset("tiny"))


def tiny_batch(seed=0):
    """Images, ids, mask, masked ids + labels, patch masks: what a collate would hand the model."""
    g = torch.Generator().manual_seed(seed)
    cfg = XFMConfig.from_preset("tiny")
    images = torch.randn(len(TEXTS), 3, cfg.image_size, cfg.image_size, generator=g)
    ids, mask = tokenize(TEXTS)
    mlm_ids, labels = mlm_mask(ids, wordpiece_word_ids(ids), prob=0.3, generator=g)
    patch_mask = torch.stack([block_mask(cfg.grid, cfg.grid, cfg.num_masked_patches, g).flatten() for _ in TEXTS])
    return dict(images=images, ids=ids, mask=mask, mlm_ids=mlm_ids, mlm_labels=labels, patch_mask=patch_mask)


def total_loss(model, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    pair = model.pair_losses(b["images"], b["ids"], b["mask"], mlm_ids=b["mlm_ids"], mlm_labels=b["mlm_labels"],
                             patch_mask=b["patch_mask"], generator=g)
    text = model.loss_text_mlm(b["mlm_ids"], b["mask"], b["mlm_labels"])
    image = model.loss_mim(b["images"], b["patch_mask"])
    return sum(pair.values()) + text + image


# -- losses against hand computations -------------------------------------------------------------------------------

def test_itc_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    temp = 0.5
    dots = [[1.0 * 0.8, 0.0], [0.6 * 0.8 + 0.8 * 0.6, 0.8]]  # img_i . txt_j
    logits = [[d / temp for d in row] for row in dots]

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    i2t = (ce(logits[0], 0) + ce(logits[1], 1)) / 2
    t2i = (ce([logits[0][0], logits[1][0]], 0) + ce([logits[0][1], logits[1][1]], 1)) / 2
    assert itc_loss_xfm(img, txt, temp).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_itm_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    expected = (-(-1.0 - math.log(math.exp(2.0) + math.exp(-1.0))) + math.log(2.0)
                - (0.0 - math.log(1.0 + math.e))) / 3
    assert itm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_mlm_loss_counts_only_labelled_tokens():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]])
    labels = torch.tensor([[-100, 2, 0]])
    expected = (math.log(3.0) + -(3.0 - math.log(math.exp(3.0) + 2 * math.e))) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_mim_loss_is_mse_over_masked_patches_plus_cls_and_detaches_the_target():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]],
                         [[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [0.0, 1.0], [0.0, 0.0]],
                           [[1.0, 1.0], [0.0, 0.0], [9.0, 9.0], [0.0, 2.0]]], requires_grad=True)
    mask = torch.tensor([[False, True, True], [True, False, True]])
    # masked patches: (1,1)-(0,1): 1 + 0; (2,0)-(0,0): 4 + 0; (3,0)-(0,0): 9 + 0; (0,0)-(0,2): 0 + 4 -> 18 / 8 values
    # CLS: (1,2)-(0,0): 1 + 4; (0,0)-(1,1): 1 + 1 -> 7 / 4 values
    loss = mim_loss(pred, target, mask)
    assert loss.item() == pytest.approx(18 / 8 + 7 / 4, abs=1e-6)
    loss.backward()
    assert target.grad is None and pred.grad.abs().sum() > 0


def test_hard_negative_weights_zero_the_positive():
    sim = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5], [0.0, 3.0, 1.0]])
    w = hard_negative_weights(sim)
    for r in range(3):
        z = sum(math.exp(v) for v in sim[r].tolist())
        for c in range(3):
            expected = 0.0 if r == c else math.exp(sim[r, c].item()) / z + 1e-5
            assert w[r, c].item() == pytest.approx(expected, abs=1e-7)


# -- masks ----------------------------------------------------------------------------------------------------------

def _masked_neighbours(mask):
    m = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    n = m[:-2, 1:-1] + m[2:, 1:-1] + m[1:-1, :-2] + m[1:-1, 2:]
    return float((n * mask).sum() / mask.sum())


def test_block_mask_exact_count_deterministic_and_blocky():
    masks = [block_mask(14, 14, 75, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(m.shape == (14, 14) and m.dtype == torch.bool and int(m.sum()) == 75 for m in masks)
    again = block_mask(14, 14, 75, torch.Generator().manual_seed(3))
    assert torch.equal(again, masks[3])
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 8
    # blocks, not scattered patches: a masked patch has ~3.3 masked neighbours (a uniform draw of 75: ~1.5)
    assert min(_masked_neighbours(m) for m in masks) > 2.5
    assert int(block_mask(4, 4, XFMConfig.from_preset("tiny").num_masked_patches).sum()) == 6
    assert XFMConfig.from_preset("base").num_masked_patches == 75


def test_wordpiece_word_ids():
    ids, _ = tokenize(["an unbelievably tokenized sentence"])
    tokens = get_tokenizer().convert_ids_to_tokens(ids[0].tolist())
    assert tokens == ["[CLS]", "an", "un", "##bel", "##ie", "##va", "##bly", "token", "##ized", "sentence", "[SEP]"]
    assert wordpiece_word_ids(ids)[0].tolist() == [-1, 0, 1, 1, 1, 1, 1, 2, 2, 3, -1]


def test_whole_word_masking_never_splits_a_word():
    ids, _ = tokenize(TEXTS * 8)
    words = wordpiece_word_ids(ids)
    special = (ids == PAD_ID) | (ids == CLS_ID) | (ids == SEP_ID)
    for seed in range(25):
        masked, labels = mlm_mask(ids, words, prob=0.3, generator=torch.Generator().manual_seed(seed))
        taken = labels != -100
        assert not (taken & special).any()
        assert torch.equal(labels[taken], ids[taken])
        assert torch.equal(masked[~taken], ids[~taken])
        for r in range(len(ids)):
            assert taken[r].any()
            for w in words[r].unique().tolist():
                if w >= 0:
                    in_word = taken[r][words[r] == w]
                    assert in_word.all() or not in_word.any(), (seed, r, w)
            budget = max(1, round(0.3 * int((words[r] >= 0).sum())))
            assert int(taken[r].sum()) <= budget or int(words[r][taken[r]].unique().numel()) == 1


def test_masked_tokens_are_80_mask_10_random_10_kept():
    ids = torch.randint(1000, 30000, (200, 100), generator=torch.Generator().manual_seed(0))
    words = torch.arange(100).expand(200, -1)  # one token per word
    masked, labels = mlm_mask(ids, words, prob=0.15, generator=torch.Generator().manual_seed(1))
    taken = labels != -100
    assert int(taken.sum()) == 200 * 15
    n = taken.sum().item()
    as_mask = ((masked == MASK_ID) & taken).sum().item() / n
    kept = ((masked == ids) & taken).sum().item() / n
    assert as_mask == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.03)
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.03)


# -- the model ------------------------------------------------------------------------------------------------------

def test_temperature_is_clamped():
    model, b = tiny(), tiny_batch()
    image, text = model.encode_image(b["images"]), model.encode_text(b["ids"], b["mask"])
    with torch.no_grad():
        model.temp.fill_(1.0)
    loss_hi = model.loss_itc(image, text)
    assert model.temp.item() == pytest.approx(0.5)
    assert loss_hi.item() == pytest.approx(itc_loss_xfm(*model.features(image, text), 0.5).item(), abs=1e-6)
    with torch.no_grad():
        model.temp.fill_(1e-5)
    model.loss_itc(image, text)
    assert model.temp.item() == pytest.approx(0.001)
    assert XFM(XFMConfig.from_preset("tiny")).temp.item() == pytest.approx(0.07)


def test_masked_image_encoding():
    model, b = tiny().eval(), tiny_batch()
    none = torch.zeros_like(b["patch_mask"])
    assert torch.allclose(model.encode_image(b["images"], none), model.encode_image(b["images"]), atol=1e-6)
    assert not torch.allclose(model.encode_image(b["images"], b["patch_mask"]), model.encode_image(b["images"]))


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _none_or_zero(grads, prefixes):
    return [n for n, g in grads.items() if n.startswith(prefixes) and g is not None and g.any()]


def _missing(grads, prefixes):
    """Weights (≥ 2-D) under `prefixes` without a nonzero gradient."""
    return [n for n, g in grads.items() if n.startswith(prefixes) and g is not None and g.dim() >= 2 and not g.any()] \
        + [n for n, g in grads.items() if n.startswith(prefixes) and g is None]


LANGUAGE = ("text_encoder.", "text_proj.", "mlm_head.")


def test_stop_gradient_itm_and_fused_mlm_leave_the_language_encoder_alone():
    model, b = tiny(), tiny_batch()
    g = torch.Generator().manual_seed(0)
    for loss_of, head in [
        (lambda m: m.loss_itm(m.encode_image(b["images"]), m.encode_text(b["ids"], b["mask"]), b["mask"],
                              generator=g), "itm_head."),
        (lambda m: m.loss_fused_mlm(b["mlm_ids"], b["mask"], b["mlm_labels"], m.encode_image(b["images"])),
         "fusion_mlm_head."),
    ]:
        grads = _grads(model, loss_of(model))
        assert _none_or_zero(grads, LANGUAGE) == []
        assert _missing(grads, ("fusion_encoder.", "visual_encoder.", head)) == []


def test_text_mlm_and_itc_train_the_language_encoder():
    model, b = tiny(), tiny_batch()
    grads = _grads(model, model.loss_text_mlm(b["mlm_ids"], b["mask"], b["mlm_labels"]))
    assert _missing(grads, ("text_encoder.", "mlm_head.")) == []
    assert _none_or_zero(grads, ("fusion_encoder.", "visual_encoder.", "fusion_mlm_head.")) == []
    grads = _grads(model, model.loss_itc(model.encode_image(b["images"]), model.encode_text(b["ids"], b["mask"])))
    assert _missing(grads, ("text_encoder.", "text_proj.", "visual_encoder.", "vision_proj.", "temp")) == []


def test_mim_trains_the_vision_encoder_and_mask_token_only():
    model, b = tiny(), tiny_batch()
    grads = _grads(model, model.loss_mim(b["images"], b["patch_mask"]))
    assert _missing(grads, ("visual_encoder.", "mask_token")) == []
    assert _none_or_zero(grads, LANGUAGE + ("fusion_encoder.",)) == []


def test_a_few_steps_lower_the_loss():
    model, b = tiny(), tiny_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        before = total_loss(model, b).item()
    for step in range(25):
        opt.zero_grad(set_to_none=True)
        total_loss(model, b, seed=step).backward()
        opt.step()
    with torch.no_grad():
        after = total_loss(model, b).item()
    assert math.isfinite(after) and after < 0.85 * before, (before, after)


def test_state_dict_round_trip_gives_identical_outputs():
    model, b = tiny(seed=0).eval(), tiny_batch()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = tiny(seed=1).eval()
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert other.mlm_head.decoder.weight is other.text_encoder.embeddings.word_embeddings.weight
    with torch.no_grad():
        for m in (model, other):
            m.out = (m.encode_text(b["ids"], b["mask"]), m.encode_image(b["images"], b["patch_mask"]),
                     total_loss(m, b))
        text = model.out[0]
        assert torch.equal(model.fuse(text, b["mask"], model.out[1]), other.fuse(text, b["mask"], other.out[1]))
    assert all(torch.equal(x, y) for x, y in zip(model.out, other.out))


def test_config_presets():
    base = XFMConfig.from_preset("base")
    assert (base.text_layers, base.fusion_layers, base.vision_layers, base.text_width, base.image_size) == \
        (12, 12, 12, 768, 224)
    assert base.fusion().add_cross_attention and not base.text().add_cross_attention
    with pytest.raises(TypeError, match="unknown X-FM option"):
        XFMConfig.from_preset("tiny", text_widht=8)
    with pytest.raises(ValueError, match="unknown X-FM preset"):
        XFMConfig.from_preset("huge")


def test_forward_takes_the_streams_it_is_given_and_load_model_reads_the_saved_weights(tmp_path):
    import blip
    from blip.data.batches import MaskedImageBatch, MaskedPairBatch, MaskedTextBatch
    model, b = tiny().eval(), tiny_batch()
    pairs = MaskedPairBatch(b["images"], b["ids"], b["mask"], b["mlm_ids"], b["mlm_labels"], b["patch_mask"])
    text = MaskedTextBatch(b["ids"], b["mask"], b["mlm_ids"], b["mlm_labels"])
    images = MaskedImageBatch(b["images"], b["patch_mask"])
    with torch.no_grad():
        assert set(model(pairs=pairs, text=text, images=images)) == {"loss_itc", "loss_itm", "loss_mlm", "loss_mim",
                                                                     "loss_text_mlm", "loss_image_mim"}
        assert model(text=text) == {"loss_text_mlm": model.loss_text_mlm(b["mlm_ids"], b["mask"], b["mlm_labels"])}
        assert model(images=images) == {"loss_image_mim": model.loss_mim(b["images"], b["patch_mask"])}
        blip.save_weights(model, tmp_path / "xfm.safetensors")  # the task and XFMConfig ride in the metadata
        loaded = blip.load_model(None, tmp_path / "xfm.safetensors")
        assert type(loaded) is XFM and loaded.cfg == model.cfg
        assert loaded.mlm_head.decoder.weight is loaded.text_encoder.embeddings.word_embeddings.weight
        assert torch.equal(loaded(images=images)["loss_image_mim"], model(images=images)["loss_image_mim"])
    assert blip.load_model("xfm", preset="tiny", text_layers=1).cfg.text_layers == 1


def test_a_step_over_the_collates_batches_reads_nothing_back_and_equals_the_host_found_positions():
    # the collate lists the MLM positions on the host: the step indexes with them (a boolean index would sync)
    from blip.tasks.xfm import XFMCollate
    from tests._device_trap import HostSyncTrap
    torch.manual_seed(0)
    model = XFM(XFMConfig.from_preset("tiny")).train()
    size = model.cfg.image_size
    images = [torch.randn(3, size, size) for _ in range(3)]
    caps = ["two red circles on the left", "a small blue square", "three green crosses at the top"]
    batches = {"pairs": XFMCollate("pairs", model)(list(zip(images, caps)), [0, 1, 2]),
               "text": XFMCollate("text", model)(caps, [3, 4, 5]), "images": XFMCollate("images", model)(images, [6, 7, 8])}
    with HostSyncTrap():
        losses = model(**batches, generator=torch.Generator().manual_seed(1))
    assert batches["pairs"].mlm_positions is not None and batches["text"].mlm_positions is not None
    p, t = batches["pairs"], batches["text"]
    assert torch.equal(losses["loss_text_mlm"], model.loss_text_mlm(t.mlm_ids, t.mask, t.mlm_labels))
    image_embeds = model.encode_image(p.images)
    assert torch.equal(model.loss_fused_mlm(p.mlm_ids, p.mask, p.mlm_labels, image_embeds, p.mlm_positions),
                       model.loss_fused_mlm(p.mlm_ids, p.mask, p.mlm_labels, image_embeds))
    static = XFMCollate("text", model, static=True)(caps, [3, 4, 5])  # every position listed: the same loss
    assert torch.allclose(model.loss_text_mlm(static.mlm_ids, static.mask, static.mlm_labels, static.mlm_positions),
                          model.loss_text_mlm(static.mlm_ids, static.mask, static.mlm_labels), atol=1e-6)
