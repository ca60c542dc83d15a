"""Same weights, same numbers as the original BLIP code (salesforce/BLIP 056a169), for all six model classes.

The fixture (tests/fixtures/original_blip_tiny_seed0.json, copied from ../shared/fixtures/original_blip) holds
every tensor of each original checkpoint as a rule, the inputs, and what the original computed.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import blip

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "original_blip_tiny_seed0.json").read_text())
TOL = 1e-4
KIND_TO_TASK = {"decoder": "caption", "itm": "itm", "retrieval": "retrieval", "vqa": "vqa", "nlvr": "nlvr",
                "pretrain": "pretrain"}


def rebuild_state_dict(kind):
    sd = {}
    for key, e in FIXTURE["state_dicts"][kind].items():
        g = torch.Generator().manual_seed(e["seed"])
        dtype = getattr(torch, e["dtype"])
        if e["init"] == "normal":
            t = torch.randn(e["shape"], generator=g) * e["std"] + e["mean"]
        elif e["init"] == "unit_columns":
            t = F.normalize(torch.randn(e["shape"], generator=g), dim=0)
        elif e["init"] == "arange":
            t = torch.arange(e["shape"][-1]).expand(e["shape"])
        elif e["init"] == "const":
            t = torch.full(e["shape"], e["value"], dtype=dtype)
        else:
            raise ValueError(e["init"])
        sd[key] = t.to(dtype)
    return {"model": sd}  # the original .pth layout


def build(kind):
    c = FIXTURE["configs"][kind]
    med = dict(c["med"])
    overrides = dict(image_size=c["image_size"], patch_size=16, vision_width=c["vit"]["embed_dim"],
                     vision_depth=c["vit"]["depth"], vision_heads=c["vit"]["num_heads"], med_config=med,
                     **c["kwargs"])
    torch.manual_seed(0)
    return blip.load_model(KIND_TO_TASK[kind], rebuild_state_dict(kind), strict=True, **overrides)


def images(kind, seed=100, n=4):
    s = FIXTURE["configs"][kind]["image_size"]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"max abs difference {diff}"


TEXTS = FIXTURE["texts"]
EXP = FIXTURE["expected"]


def test_every_checkpoint_key_loads_strictly():
    for kind in FIXTURE["state_dicts"]:
        build(kind)  # strict=True: no missing, no unexpected key


def test_caption_decoder():
    model = build("decoder")
    x = images("decoder")
    assert model.generate(x, num_beams=3, max_length=20, min_length=5) == EXP["decoder"]["beam"]
    with torch.no_grad():
        close(model.losses(x, TEXTS["captions"][:4])["loss_lm"], EXP["decoder"]["loss_lm"])


def test_itm_and_itc():
    model = build("itm")
    x = images("itm")
    caps = TEXTS["captions"][:6]
    n_img, n_txt = len(x), len(caps)
    probs = model.itm_score(x.repeat_interleave(n_txt, 0), caps * n_img).view(n_img, n_txt)
    close(probs, EXP["itm"]["itm_prob"])
    close(probs, EXP["itm"]["itm_prob_vit_once"])
    close(model.itc_similarity(x, caps), EXP["itm"]["itc_sim"])


def test_retrieval_scores_and_losses():
    model = build("retrieval")
    x = images("retrieval")
    caps = TEXTS["captions"][:6]
    close(model.itc_similarity(x, caps), EXP["retrieval"]["itc_sim"])
    i2t, t2i = model.retrieval_scores(x, caps, k_test=3)
    close(i2t, EXP["retrieval"]["i2t"])
    close(t2i, EXP["retrieval"]["t2i"])
    train = EXP["retrieval"]["train"]
    model.momentum_update()
    with torch.no_grad():
        out = model.losses(x, caps[:4], idx=[0, 1, 2, 0], alpha=0.4,
                           hard_negatives=(train["neg_image_for_text"], train["neg_text_for_image"]))
    close(out["loss_ita"], train["loss_ita"])
    close(out["loss_itm"], train["loss_itm"])


def test_pretrain_losses():
    model = build("pretrain")
    x = images("pretrain")
    exp = EXP["pretrain"]
    model.momentum_update()
    with torch.no_grad():
        out = model.losses(x, TEXTS["captions"][:4], alpha=0.4,
                           hard_negatives=(exp["neg_image_for_text"], exp["neg_text_for_image"]))
    for name in ("loss_ita", "loss_itm", "loss_lm"):
        close(out[name], exp[name])


def test_vqa_generate_rank_and_loss():
    model = build("vqa")
    x = images("vqa")
    qs = TEXTS["questions"]
    assert model.answer(x, qs, method="generate", num_beams=3, max_length=10, min_length=1) == EXP["vqa"]["generate"]
    assert model.answer(x, qs, method="rank", answer_list=TEXTS["answers"], k=5) == EXP["vqa"]["rank"]
    with torch.no_grad():
        loss = model.losses(x, qs, answers=["running", "2", "red", "yes", "no"], n=[1, 1, 1, 2],
                            weights=[1, 1, 1, 0.5, 0.5])["loss_vqa"]
    close(loss, EXP["vqa"]["loss"])


def test_nlvr():
    model = build("nlvr")
    x, x1 = images("nlvr"), images("nlvr", seed=101, n=2)
    with torch.no_grad():
        logits = model.logits(x[:2], x1, TEXTS["nlvr_texts"])
    close(logits, EXP["nlvr"]["logits"])
    assert model.predict(x[:2], x1, TEXTS["nlvr_texts"]).tolist() == EXP["nlvr"]["pred"]


def test_momentum_encoders_are_really_used():
    """The fixture's momentum copies are independent random tensors: skipping the momentum path must show."""
    model = build("retrieval")
    x = images("retrieval")
    train = EXP["retrieval"]["train"]
    model.copy_params()  # replace the momentum encoders by the online ones
    with torch.no_grad():
        out = model.losses(x, TEXTS["captions"][:4], idx=[0, 1, 2, 0], alpha=0.4,
                           hard_negatives=(train["neg_image_for_text"], train["neg_text_for_image"]))
    assert abs(out["loss_ita"].item() - train["loss_ita"]) > 1e-3
