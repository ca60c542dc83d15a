"""X-FM fine-tuned: retrieval's losses against hand computations and by gradients, the shared retrieval protocol
against a hand loop, and the task trained through its entry script."""
import json
import math

import pytest
import torch

from blip.data.tokenizer import tokenize
from blip.models.xfm import hard_negative_weights, itc_loss_xfm
from tests.test_xfm import LANGUAGE, TEXTS, _grads, _missing, tiny, tiny_batch


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_itc_with_image_index_spreads_the_target_over_one_images_captions():
    """Rows 0 and 1 are captions of one image: each is a positive of the other's image, the target split evenly."""
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    idx, temp = torch.tensor([5, 5, 9]), 0.5
    logits = [[sum(a * b for a, b in zip(i, t)) / temp for t in txt.tolist()] for i in img.tolist()]

    def soft_ce(row, targets):
        z = math.log(sum(math.exp(v) for v in row))
        return -sum(p * (v - z) for v, p in zip(row, targets))

    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    i2t = sum(soft_ce(logits[r], targets[r]) for r in range(3)) / 3
    t2i = sum(soft_ce([logits[i][c] for i in range(3)], targets[c]) for c in range(3)) / 3
    assert itc_loss_xfm(img, txt, temp, idx).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # without the index, the plain diagonal InfoNCE (pretraining's)
    assert itc_loss_xfm(img, txt, temp, torch.arange(3)).item() == pytest.approx(itc_loss_xfm(img, txt, temp).item())


def test_hard_negatives_never_pair_captions_of_the_same_image():
    sim = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5], [0.0, 3.0, 1.0]])
    w = hard_negative_weights(sim, torch.tensor([1, 1, 2]))
    assert w[0, 1] == 0 and w[1, 0] == 0 and w[2, 2] == 0 and w[0, 0] == 0
    z = sum(math.exp(v) for v in sim[0].tolist())
    assert w[0, 2].item() == pytest.approx(math.exp(2.0) / z + 1e-5, abs=1e-7)


def test_retrieval_losses_train_every_encoder():
    """Fine-tuning has no stop-gradient: ITM's gradient reaches the language encoder too."""
    model, b = tiny(), tiny_batch()
    g = torch.Generator().manual_seed(0)
    losses = model.retrieval_losses(b["images"], b["ids"], b["mask"], torch.tensor([0, 0, 1, 2]), generator=g)
    assert set(losses) == {"loss_itc", "loss_itm"}
    grads = _grads(model, losses["loss_itm"])
    assert _missing(grads, ("text_encoder.encoder.", "fusion_encoder.", "visual_encoder.blocks.", "itm_head.")) == []
    losses = model.retrieval_losses(b["images"], b["ids"], b["mask"], torch.tensor([0, 0, 1, 2]), generator=g)
    grads = _grads(model, losses["loss_itc"])
    assert _missing(grads, LANGUAGE[:2] + ("visual_encoder.blocks.", "vision_proj.")) == []


def test_retrieval_scores_are_itc_top_k_plus_itm_as_a_hand_loop():
    model, b = tiny(), tiny_batch()
    model.eval()
    with torch.no_grad():
        i2t, t2i = model.retrieval_scores(b["images"], TEXTS, k_test=2)
        image_embeds = model.encode_image(b["images"])
        ids, mask = tokenize(TEXTS, max_length=model.text_max_length)
        sim = model.image_feat(image_embeds) @ model.text_feat(model.encode_text(ids, mask)).t()
        for i in range(len(TEXTS)):
            top = sim[i].topk(2).indices.tolist()
            for t in range(len(TEXTS)):
                if t not in top:
                    assert i2t[i, t] == -100
                    continue
                hidden = model.encode_text(ids[t:t + 1], mask[t:t + 1])
                itm = model.itm_head(model.fuse(hidden, mask[t:t + 1], image_embeds[i:i + 1])[:, 0])[0, 1]
                assert i2t[i, t].item() == pytest.approx((itm + sim[i, t]).item(), abs=1e-4)
        assert (t2i > -100).sum(1).tolist() == [2] * len(TEXTS)


def test_xfm_retrieval_fine_tunes_from_a_checkpoint_through_its_script(tmp_path):
    """pretrain_xfm.py writes a checkpoint; train_xfm_retrieval.py fine-tunes it (ITC + ITM) and evaluates with the
    ITM re-rank; validation recall rises over the epochs, and --evaluate of its weights gives its numbers again."""
    import pretrain_xfm
    import train_xfm_retrieval
    world = tmp_path / "world"
    shapes = "{out_dir: %s, n_train: 160, n_val: 20, n_test: 20, image_size: 32, seed: 0, n_text_only: 40, " \
             "n_image_only: 40}" % world
    common = ["--device", "cpu", "--set", f"shapes={shapes}", "num_workers=0", "log_every=1"]
    pretrain_xfm.main(["--config", "configs/shapes_xfm.yaml", "--output-dir", str(tmp_path / "pre"), *common,
                       f"train_file=[{world}/pretrain_clean.json]", f"text_file=[{world}/text_only.json]",
                       f"image_file=[{world}/image_only.json]", "max_epoch=1"])
    roots = [f"image_root={world}", f"ann_root={world}", f"pretrained={tmp_path / 'pre' / 'model.safetensors'}"]
    trained = train_xfm_retrieval.main(["--config", "configs/shapes_xfm_retrieval.yaml", "--output-dir",
                                        str(tmp_path / "ft"), *common, *roots, "max_epoch=4", "init_lr=1e-3"])
    log = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    val = [e["val_r_mean"] for e in log if "val_r_mean" in e]
    assert len(val) == 4 and max(val[1:]) > val[0] + 5, val
    evaluated = train_xfm_retrieval.main(["--config", "configs/shapes_xfm_retrieval.yaml", "--output-dir",
                                          str(tmp_path / "ev"), *common, *roots[:2],
                                          f"pretrained={tmp_path / 'ft' / 'model.safetensors'}", "--evaluate"])
    assert evaluated["test_r_mean"] == pytest.approx(trained["test_r_mean"], abs=1e-6)
