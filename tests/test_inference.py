"""blip.inference's functions against independent references (the models' own pair-by-pair APIs), and zero-shot
classification and search on a tiny BLIP that pretraining on the shapes world has taught."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip import inference
from blip.data.tokenizer import pre_caption

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def matcher():
    torch.manual_seed(0)
    model = blip.load_model("itm", preset="micro")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.RandomState(1)
    out = []
    for i in range(5):
        p = d / f"{i}.png"
        Image.fromarray((rng.rand(20 + i, 30, 3) * 255).astype("uint8")).save(p)
        out.append(str(p))
    return out


def test_itm_matrix_runs_the_vit_once_per_image_and_equals_pairwise_itm(matcher, pngs):
    texts = ["a red square", "Two blue circles.", "a cat", "green", "a very long text about nothing at all"]
    seen = []
    hook = matcher.visual_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    rows = list(inference.itm(matcher, pngs, texts, batch_size=2, workers=0))
    hook.remove()
    assert sum(seen) == len(pngs)  # 5 images through the ViT, not 25 pairs
    x = blip.load_images(pngs, 32)
    clean = [pre_caption(t) for t in texts]
    want_itm = matcher.itm_score(x.repeat_interleave(len(texts), 0), clean * len(pngs))
    want_itc = matcher.itc_similarity(x, clean).reshape(-1)
    assert [(r["image"], r["text"]) for r in rows] == [(p, t) for p in pngs for t in clean]
    assert torch.allclose(torch.tensor([r["itm"] for r in rows]), want_itm, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor([r["itc"] for r in rows]), want_itc, atol=1e-5, rtol=0)


def test_classify_rerank_is_itm_averaged_over_templates(matcher, pngs):
    labels, templates = ["cat", "dog", "red square", "tree"], ("a photo of a {}.", "a {}")
    rows = list(inference.classify(matcher, pngs, labels, templates=templates, k=4, rerank=4, workers=0))
    x = blip.load_images(pngs, 32)
    texts = [pre_caption(t.format(label)) for label in labels for t in templates]
    n = len(texts)
    p = matcher.itm_score(x.repeat_interleave(n, 0), texts * len(pngs)).view(len(pngs), len(labels), 2).mean(-1)
    for row, want in zip(rows, p):
        order = want.argsort(descending=True).tolist()
        assert row["labels"] == [labels[i] for i in order]
        assert np.allclose(row["scores"], want[order].tolist(), atol=1e-5)
    plain = list(inference.classify(matcher, pngs, labels, templates=templates, k=2, workers=0))
    w = inference.label_features(matcher, labels, templates)
    sims = matcher.image_features(x)[1] @ w.t()
    assert [r["labels"] for r in plain] == [[labels[i] for i in s.topk(2).indices.tolist()] for s in sims]


def test_top_k_chunks_and_faiss_equal_the_full_product():
    g = torch.nn.functional.normalize(torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = g[[3, 500, 999]] + 0.01
    want_s, want_i = (q @ g.t()).topk(7, dim=1)
    s, i = inference.top_k(g, q, 7, use_faiss=False, chunk=96)
    assert torch.equal(i, want_i) and torch.allclose(s, want_s)
    pytest.importorskip("faiss")
    s, i = inference.top_k(g, q, 7, use_faiss=True)
    assert torch.equal(i, want_i) and torch.allclose(s, want_s, atol=1e-5)


def test_zero_shot_classify_and_search_on_the_trained_shapes_model(shapes_main_job, tmp_path, capsys):
    """The main job's model (tests/conftest.py), through the command line: zero-shot background classification
    (label names × a template, accuracy from a CSV of true labels) and text→image search over the 50 held-out
    images (the right image in the top 5). Measured: background 100% (chance 25%), search 40% (chance 10%).
    Colours and kinds this 10-epoch model does not yet tell apart zero-shot (22% and 26% against 17% and 25%),
    so they are not asserted."""
    from blip.__main__ import main
    _, run, world = shapes_main_job
    ckpt = run / "model.safetensors"
    scenes = json.loads((world / "scenes.json").read_text())
    test = json.loads((world / "karpathy_test.json").read_text())
    truth = tmp_path / "truth.csv"
    truth.write_text("image,label\n" + "".join(
        f"{world / e['image']},{scenes[str(int(e['image'][-10:-4]))]['background']}\n" for e in test))
    images = [str(world / e["image"]) for e in test]
    common = ["--checkpoint", ckpt, "--task", "pretrain", "--device", "cpu", "--no-progress", "--workers", 0]
    (tmp_path / "images.txt").write_text("\n".join(images) + "\n")
    out = tmp_path / "bg.jsonl"
    assert main(["classify", str(tmp_path / "images.txt"), "--labels", "white,black,striped,checkered",
                 "--template", "a {} background", "--truth", str(truth),
                 "--k", "2", "-o", str(out), *map(str, common)]) == 0
    summary = json.loads((tmp_path / "bg.jsonl.summary.json").read_text())
    assert summary["accuracy_n"] == 50 and summary["accuracy_top1"] >= 60.0, summary  # chance 25, measured 100
    gallery = tmp_path / "test.safetensors"
    assert main(["embed", str(tmp_path / "images.txt"), "-o", str(gallery), *map(str, common)]) == 0
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(e["caption"][0] for e in test) + "\n")
    hits_out = tmp_path / "hits.jsonl"
    assert main(["search", "--gallery", str(gallery), "--queries", str(queries), "--k", "5", "-o", str(hits_out),
                 *map(str, common)]) == 0
    rows = inference.read_rows(hits_out)
    assert len(rows) == 5 * 50
    found = sum(images[i] in [r["image"] for r in rows[5 * i:5 * i + 5]] for i in range(50))
    assert found >= 12, found  # chance 5 of 50, measured 20
    capsys.readouterr()


def test_sampled_captions_share_each_images_cross_attention_kv():
    """n sampled captions per image read one projection of its K/V: the same tokens as n copies of the image."""
    from blip.models.generation import Decoding, generate_ids
    torch.manual_seed(0)
    model = blip.load_model("caption", preset="micro").eval()
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # a peaked, image-dependent distribution
        emb = model.visual_encoder(torch.randn(3, 3, model.cfg.image_size, model.cfg.image_size))
        prompt = model.prompt_ids(model.cfg.prompt, 3 * 4)
        how = Decoding(sample=True, max_length=12, min_length=3)
        shared = generate_ids(model.text_decoder, emb, prompt, how, generator=torch.Generator().manual_seed(5))
        copies = generate_ids(model.text_decoder, emb.repeat_interleave(4, 0), prompt, how,
                              generator=torch.Generator().manual_seed(5))
        assert shared == copies and len({tuple(s) for s in shared}) > 3
        with pytest.raises(ValueError, match="12 prompts for 3 encoder rows"):
            generate_ids(model.text_decoder, emb, prompt, Decoding(num_beams=3))
