"""Visual entailment: ALBEF's SNLI-VE files read as they are, the shapes-world VE set balanced so that the text alone
predicts nothing, and a tiny model trained by train_ve.py beating that text prior."""
import collections
import json

import pytest
import torch

import blip
from blip.tasks.ve import VEDataset
from data.shapes_ve import VE_TEMPLATES, ensure_ve_set

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = dict(n_train=150, n_val=30, n_test=60, image_size=32, seed=0, n_shards=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.worlds import ensure_shapes_world
    root = tmp_path_factory.mktemp("shapes_ve")
    ensure_shapes_world({"out_dir": str(root), **WORLD})
    ensure_ve_set(root, {"statements_per_image": 6, "seed": 0})
    return root


def test_albef_files(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "1000092795.jpg")
    ann = tmp_path / "ve_dev.json"
    ann.write_text(json.dumps([{"image": "1000092795", "sentence": "Two men  are OUTSIDE.", "label": "entailment"},
                               {"image": "1000092795", "sentence": "a dog", "label": "contradiction"},
                               {"image": "1000092795", "sentence": "they are brothers", "label": "neutral"}]))
    data = VEDataset(ann, str(tmp_path), None, train=False)
    assert data.image_files(0) == [str(tmp_path / "1000092795.jpg")]  # a Flickr30k id: image_root/{id}.jpg
    assert [data[i][1:] for i in range(3)] == [("two men are outside", 2), ("a dog", 0), ("they are brothers", 1)]
    ann.write_text(json.dumps([{"image": "1", "sentence": "x", "label": "entails"}]))
    with pytest.raises(ValueError, match=r"ve_dev.json: entry 0 has label 'entails'"):
        VEDataset(ann, str(tmp_path), None, train=False)


def test_shapes_ve_set_is_balanced_and_true_to_the_scenes(world):
    scenes = json.loads((world / "scenes.json").read_text())
    train = json.loads((world / "ve_train.json").read_text())
    test = json.loads((world / "ve_test.json").read_text())
    assert len(train) == 6 * WORLD["n_train"] and len(test) == 6 * WORLD["n_test"]
    from data.shapes import ATTRS
    per_template = collections.Counter()
    for e in train:
        s = scenes[e["image"].split("_")[-2].lstrip("0")]
        assert ("hidden" in e["image"]) == (e["label"] == "neutral")  # neutral: the curtain hides the shapes
        said = [(attr, v) for t, attr, word in VE_TEMPLATES for v in ATTRS[attr] if e["sentence"] == t.format(word(v))]
        assert len(said) == 1, e
        attr, value = said[0]
        per_template[attr, e["label"]] += 1
        if e["label"] != "neutral":  # entailed exactly when the value is the scene's
            assert (s[attr] == value) == (e["label"] == "entailment"), (e, s)
    for attr in {a for a, _ in per_template}:
        n = [per_template[attr, label] for label in ("entailment", "neutral", "contradiction")]
        assert max(n) - min(n) <= 1, (attr, n)  # a third of every template is each label

    # the text alone: each test sentence's most frequent training label scores about a third
    by_sentence = collections.defaultdict(collections.Counter)
    for e in train:
        by_sentence[e["sentence"]][e["label"]] += 1
    hits = [by_sentence[e["sentence"]].most_common(1)[0][0] == e["label"] for e in test if e["sentence"] in by_sentence]
    assert 100 * sum(hits) / len(hits) < 42


def test_ve_learns_on_the_shapes_world(world, tmp_path):
    import train_ve
    argv = ["--config", "configs/shapes_ve.yaml", "--device", "cpu", "--output-dir", str(tmp_path), "--set",
            f"shapes.out_dir={world}", f"image_root={world}", f"ann_root={world}", "num_workers=2", "max_epoch=2",
            "shapes_ve={statements_per_image: 6, seed: 0}",
            *[f"shapes.{k}={v}" for k, v in WORLD.items()]]
    metrics = train_ve.main(argv)
    # measured once: test 57.8 after 2 epochs (neutral 69, entailment + contradiction 52: near chance); the text
    # prior is 33 by construction, the image alone 67 (it sees whether the shapes are hidden)
    assert metrics["test_acc"] > 33.3 + 14, metrics
    model = blip.load_model("ve", tmp_path / "model_best.safetensors")
    assert model.cls_head[-1].out_features == 3
    with torch.no_grad():
        assert model.logits(torch.zeros(2, 3, 32, 32), ["the shapes are red", "the shapes are small"]).shape == (2, 3)
