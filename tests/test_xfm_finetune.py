"""X-FM fine-tuned: retrieval's losses against hand computations and by gradients, the shared retrieval protocol
against a hand loop, and the task trained through its entry script; the same for VQA's and NLVR2's heads on the
fusion encoder (their losses, answers / predictions, a pretraining checkpoint loaded into each)."""
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import blip
from blip.data.batches import ClassBatch, SoftTargetBatch, SoftTargetCollate
from blip.data.tokenizer import CLS_ID, tokenize
from blip.models.checkpoint import CheckpointMismatchError, load_into
from blip.models.xfm import XFMConfig, hard_negative_weights, itc_loss_xfm
from blip.models.xfm_heads import XFMNLVR, XFMVQA, nlvr_loss, vqa_classifier_loss
from blip.tasks.vqa import answer_weights
from tests.test_xfm import LANGUAGE, TEXTS, _grads, _missing, tiny, tiny_batch

ROOT = Path(__file__).resolve().parents[1]


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


# -- VQA and NLVR2: a head on the fusion encoder per task ------------------------------------------------------------

ANSWERS = ["red", "blue", "yes", "no", "2"]


def tiny_vqa(seed=0):
    torch.manual_seed(seed)
    return XFMVQA(XFMConfig.from_preset("tiny", answers=ANSWERS))


def tiny_nlvr(seed=0):
    torch.manual_seed(seed)
    return XFMNLVR(XFMConfig.from_preset("tiny"))


def test_vqa_classifier_loss_is_bce_of_the_soft_targets_summed_over_answers():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.5, -2.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.2]])

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    per_question = [sum(bce(z, t) for z, t in zip(zs, ts)) for zs, ts in zip(logits.tolist(), targets.tolist())]
    assert vqa_classifier_loss(logits, targets).item() == pytest.approx(sum(per_question) / 2, abs=1e-6)


def test_soft_targets_are_the_annotators_weights_and_drop_answers_outside_the_vocabulary():
    """answer_weights (VQA's) of ten annotators: 'red' 7, 'blue' 2, 'plaid' 1 (not in the vocabulary: dropped)."""
    vqa_entry = {"dataset": "vqa", "answer": ["red"] * 7 + ["blue"] * 2 + ["plaid"]}
    vg_entry = {"dataset": "vg", "answer": "yes"}
    image = torch.zeros(3, 32, 32)
    samples = [(image, "what color is it", *answer_weights(vqa_entry)), (image, "is it", *answer_weights(vg_entry))]
    batch = SoftTargetCollate(35, ANSWERS)(samples)
    expected = [[0.7, 0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0, 0.0]]
    assert batch.targets.tolist() == [[pytest.approx(v, abs=1e-6) for v in row] for row in expected]
    assert batch.ids[:, 0].tolist() == [CLS_ID, CLS_ID]  # X-FM's language encoder reads [CLS] first
    assert torch.equal(batch.ids, tokenize(["what color is it", "is it"])[0])


def test_nlvr_loss_is_two_way_cross_entropy():
    logits, labels = torch.tensor([[1.0, 3.0], [0.5, -0.5]]), torch.tensor([1, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert nlvr_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_vqa_and_nlvr_fine_tuning_train_every_encoder_and_the_new_head():
    """No stop-gradient: the head's loss reaches the language encoder, the fusion encoder and the vision encoder."""
    b = tiny_batch()
    model = tiny_vqa()
    targets = torch.zeros(len(TEXTS), len(ANSWERS))
    targets[:, 0], targets[1, 2] = 1.0, 0.3
    loss = model(vqa=SoftTargetBatch(b["images"], b["ids"], b["mask"], targets))["loss_vqa"]
    grads = _grads(model, loss)
    assert _missing(grads, ("text_encoder.encoder.", "fusion_encoder.", "visual_encoder.blocks.", "vqa_head.")) == []
    model = tiny_nlvr()
    batch = ClassBatch(b["images"], b["ids"], b["mask"], torch.tensor([0, 1, 1, 0]), b["images"].flip(0))
    grads = _grads(model, model(nlvr=batch)["loss_nlvr"])
    assert _missing(grads, ("text_encoder.encoder.", "fusion_encoder.", "visual_encoder.blocks.", "nlvr_head.")) == []


def test_vqa_answers_are_the_classifiers_argmax_over_its_vocabulary():
    model, b = tiny_vqa(), tiny_batch()
    model.eval()
    with torch.no_grad():
        ids, mask = tokenize(TEXTS, max_length=model.text_max_length)
        hidden = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(b["images"]))
        # a fresh model's [CLS] states are nearly alike: centred, the classifier's choices differ between questions
        features = model.vqa_head[:3](hidden[:, 0])
        model.vqa_head[3].bias.copy_(-model.vqa_head[3].weight @ features.mean(0))
        logits = model.vqa_head(hidden[:, 0])
    assert len(set(logits.argmax(1).tolist())) > 2
    assert model.answer(b["images"], TEXTS) == [ANSWERS[i] for i in logits.argmax(1).tolist()]
    # evaluate_vqa's call: method 'rank' over an answer list; only its answers the vocabulary has may be answered
    allowed = ["no", "red", "maybe"]
    restricted = model.answer(b["images"], TEXTS, method="rank", answer_list=allowed, k=2)
    assert restricted == [("red", "no")[int(row[3] > row[0])] for row in logits.tolist()]
    assert set(restricted) == {"red", "no"}
    with pytest.raises(ValueError, match="'rank'.*'generate'"):
        model.answer(b["images"], TEXTS, method="generate")
    with pytest.raises(ValueError, match="none of its answers"):
        model.answer(b["images"], TEXTS, answer_list=["maybe"])
    with pytest.raises(ValueError, match="answer vocabulary"):
        XFMVQA(XFMConfig.from_preset("tiny"))


def test_nlvr_predict_reads_the_sentence_with_each_image_and_concatenates_both_cls_states():
    model, b = tiny_nlvr(), tiny_batch()
    model.eval()
    images0, images1 = b["images"], b["images"].flip(0)
    with torch.no_grad():
        ids, mask = tokenize(TEXTS, max_length=model.text_max_length)
        hidden = model.encode_text(ids, mask)
        cls = [model.fuse(hidden, mask, model.encode_image(x))[:, 0] for x in (images0, images1)]
        logits = model.nlvr_head(torch.cat(cls, dim=1))
        assert torch.allclose(model.nlvr_logits(images0, images1, ids, mask), logits, atol=1e-5)
        assert not torch.allclose(model.nlvr_logits(images1, images0, ids, mask), logits, atol=1e-3)
    predicted = model.predict(images0, images1, TEXTS)
    assert predicted.dtype == torch.long and predicted.tolist() == logits.argmax(1).tolist()


def test_a_pretraining_checkpoint_starts_each_fine_tuning_model_with_only_its_head_fresh(tmp_path, caplog):
    """pretrain_xfm.py's weights (an XFM's safetensors) load into XFMVQA / XFMNLVR without a warning: every weight
    but the new head's is the checkpoint's. A fine-tuned VQA model keeps its answer vocabulary in its file."""
    pretrained = tiny(seed=3)
    blip.save_weights(pretrained, tmp_path / "xfm.safetensors")
    own = pretrained.state_dict()
    for task, head in (("xfm_vqa", "vqa_head."), ("xfm_nlvr", "nlvr_head.")):
        with caplog.at_level(logging.WARNING):
            model = blip.load_model(task, tmp_path / "xfm.safetensors", **({"answers": ANSWERS} if task == "xfm_vqa"
                                                                            else {}))
        assert "was saved as" not in caplog.text
        report = load_into(model, tmp_path / "xfm.safetensors")
        assert report["unexpected"] == [] and report["missing"] and all(k.startswith(head) for k in report["missing"])
        assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if not k.startswith(head))
        with pytest.raises(CheckpointMismatchError):  # the head is fresh; nothing else may be missing
            load_into(model, {k: v for k, v in own.items() if not k.startswith("fusion_encoder.")})
    blip.save_weights(model := tiny_vqa(seed=4), tmp_path / "vqa.safetensors")
    again = blip.load_model(None, tmp_path / "vqa.safetensors")
    assert type(again) is XFMVQA and again.cfg.answers == ANSWERS
    images = tiny_batch()["images"]
    assert again.answer(images, TEXTS) == model.eval().answer(images, TEXTS)


@pytest.fixture(scope="module")
def pretrained_world(tmp_path_factory):
    """A tiny shapes world and pretrain_xfm.py's checkpoint of it (one epoch), shared by the fine-tuning scripts. Its
    NLVR2 statements are about backgrounds only (a tiny model learns those within a few epochs; the rest of the world
    is as without the option)."""
    import pretrain_xfm
    tmp = tmp_path_factory.mktemp("xfm_pretrained")
    world = tmp / "world"
    shapes = "{out_dir: %s, n_train: 160, n_val: 20, n_test: 20, image_size: 32, seed: 0, n_text_only: 40, " \
             "n_image_only: 40, nlvr_about: [background]}" % world
    common = ["--device", "cpu", "--set", f"shapes={shapes}", "num_workers=0", "log_every=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_xfm.main(["--config", "configs/shapes_xfm.yaml", "--output-dir", str(tmp / "pre"), *common,
                           f"train_file=[{world}/pretrain_clean.json]", f"text_file=[{world}/text_only.json]",
                           f"image_file=[{world}/image_only.json]", "max_epoch=1"])
    finally:
        torch.set_num_threads(threads)
    return world, tmp / "pre" / "model.safetensors", common


def question_blind_accuracy(world) -> float:
    """The VQA accuracy of answering every test question with the training set's most frequent answer."""
    from blip.evaluation.metrics import vqa_accuracy
    train = json.load(open(world / "vqa_train.json"))
    test = json.load(open(world / "vqa_test.json"))
    counts = {}
    for e in train:
        for a in e["answer"]:
            counts[a] = counts.get(a, 0) + 1
    top = max(counts, key=counts.get)
    return vqa_accuracy([top] * len(test), [e["answer"] for e in test])


def test_xfm_vqa_fine_tunes_from_a_checkpoint_through_its_script(tmp_path, pretrained_world):
    """train_xfm_vqa.py fine-tunes pretrain_xfm.py's checkpoint (its classifier's vocabulary: the world's
    answer_list.json) and answers the test questions; its accuracy beats answering every question with the most
    frequent answer by far, and --evaluate of its saved weights (the vocabulary in their file) gives it again."""
    import train_xfm_vqa
    world, checkpoint, common = pretrained_world
    roots = [f"image_root={world}", f"ann_root={world}", f"vqa_root={world}"]
    trained = train_xfm_vqa.main(["--config", "configs/shapes_xfm_vqa.yaml", "--output-dir", str(tmp_path / "ft"),
                                  *common, *roots, f"pretrained={checkpoint}", "max_epoch=8", "init_lr=2e-3"])
    blind = question_blind_accuracy(world)
    assert trained["test_acc"] > blind + 15, (trained, blind)
    answers = json.load(open(world / "answer_list.json"))
    results = json.load(open(tmp_path / "ft" / "vqa_result.json"))
    assert len(results) == len(json.load(open(world / "vqa_test.json")))
    assert all(r["answer"] in answers for r in results) and len({r["answer"] for r in results}) > 3
    evaluated = train_xfm_vqa.main(["--config", "configs/shapes_xfm_vqa.yaml", "--output-dir", str(tmp_path / "ev"),
                                    *common, *roots, f"pretrained={tmp_path / 'ft' / 'model.safetensors'}",
                                    "--evaluate"])
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)


def test_xfm_nlvr_fine_tunes_from_a_checkpoint_through_its_script(tmp_path, pretrained_world):
    """train_xfm_nlvr.py fine-tunes pretrain_xfm.py's checkpoint; dev accuracy after training beats the first
    epoch's and chance (50: each statement template is half true), and --evaluate of its weights gives its numbers
    again."""
    import train_xfm_nlvr
    world, checkpoint, common = pretrained_world
    roots = [f"image_root={world}", f"ann_root={world}"]
    trained = train_xfm_nlvr.main(["--config", "configs/shapes_xfm_nlvr.yaml", "--output-dir", str(tmp_path / "ft"),
                                   *common, *roots, f"pretrained={checkpoint}", "max_epoch=4", "init_lr=5e-4"])
    log = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    dev = [e["dev_acc"] for e in log if "dev_acc" in e]
    assert len(dev) == 4 and max(dev[1:]) > max(dev[0], 50) + 5, dev
    evaluated = train_xfm_nlvr.main(["--config", "configs/shapes_xfm_nlvr.yaml", "--output-dir", str(tmp_path / "ev"),
                                     *common, *roots, f"pretrained={tmp_path / 'ft' / 'model.safetensors'}",
                                     "--evaluate"])
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)


@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr"])
def test_each_xfm_fine_tune_runs_on_two_gloo_ranks(task, pretrained_world, tmp_path):
    """Fine-tuning leaves pretraining's heads (MLM, the MIM mask token, ITC / ITM where unused) without gradients:
    DDP is told (find_unused_parameters), else its second step stops with an unfinished reduction. As a user runs
    it: 2 ranks, 2 data workers each, 2 micro-steps per optimizer step."""
    from tests.conftest import launch
    world, checkpoint, common = pretrained_world
    out = tmp_path / "run"
    roots = [f"image_root={world}", f"ann_root={world}", f"pretrained={checkpoint}", "max_epoch=1",
             "batch_size_train=8", "num_workers=2", "grad_accum_steps=2",  # collates in workers, micro-steps
             *([f"vqa_root={world}"] if task == "vqa" else [])]
    launch(ROOT / f"train_xfm_{task}.py", "--config", f"configs/shapes_xfm_{task}.yaml", "--output-dir", out,
           *common, *roots, nproc=2, cwd=ROOT)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "end" and any(r["event"] == "train" for r in rows)
