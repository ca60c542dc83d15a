"""The shapes world: deterministic, and every text is true to the scene it was drawn from."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from data.shapes import (COLORS, KINDS, NLVR_TEMPLATES, NUMBER, PLURAL, POS_PHRASE, caption_is_true, captions,
                         generate_shapes_world, sample_scene, wrong_caption)

SIZES = dict(n_train=24, n_val=6, n_test=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    files = generate_shapes_world(out, **SIZES, image_size=64, noise_fraction=0.25, seed=0)
    return files, {int(k): v for k, v in json.load(open(files["scenes"])).items()}


def _load(files, name):
    with open(files[name]) as f:
        return json.load(f)


def _tree(root):
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_deterministic(world, tmp_path):
    files, _ = world
    again = generate_shapes_world(tmp_path / "a", **SIZES, image_size=64, noise_fraction=0.25, seed=0)
    other = generate_shapes_world(tmp_path / "b", **SIZES, image_size=64, noise_fraction=0.25, seed=1)
    first, second = _tree(files["root"]), _tree(again["root"])
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first)
    assert _tree(other["root"])["scenes.json"] != first["scenes.json"]


def _check_caption(caption, s):
    words = caption.split(" ")
    assert {w for w in words if w in COLORS} <= {s["color"]}, caption
    kinds = {w for w in words if w in KINDS or w in PLURAL.values()}
    assert kinds == {s["kind"] if s["count"] == 1 else PLURAL[s["kind"]]}, caption
    numbers = {w for w in words if w in NUMBER.values()}  # a single shape may be "a" instead of "one"
    assert numbers == {NUMBER[s["count"]]} or (s["count"] == 1 and not numbers), caption
    for pos, phrase in POS_PHRASE.items():
        assert (phrase in caption) <= (pos == s["position"]), caption
    assert {w for w in words if w in ("white", "black", "striped", "checkered")} <= {s["background"]}, caption
    assert {w for w in words if w in ("small", "large")} <= {s["size"]}, caption


def test_captions_true_to_scene(world):
    files, scenes = world
    train = _load(files, "karpathy_train")
    assert len(train) == 5 * SIZES["n_train"]
    for e in train:
        _check_caption(e["caption"], scenes[int(e["image_id"])])
    for e in _load(files, "karpathy_val"):
        i = int(re.findall(r"\d+", e["image"])[-1])
        assert scenes[i]["split"] == "val" and len(e["caption"]) == 5
        for c in e["caption"]:
            _check_caption(c, scenes[i])


def test_images_true_to_scene(world):
    """Saturated pixels form `count` blobs of the scene's colour, size and position."""
    files, scenes = world
    for i, s in list(scenes.items())[:20]:
        img = np.asarray(Image.open(os.path.join(files["root"], f"images/{s['split']}/shapes_{i:06d}.png")), dtype=int)
        mask = img.max(-1) - img.min(-1) > 60  # the backgrounds are gray
        blobs = regionprops(label(mask))
        assert len(blobs) == s["count"], (i, s)
        mean = img[mask].mean(0)
        assert min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum()) == s["color"]
        extent = np.mean([max(b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]) for b in blobs])
        assert (extent > 12) == (s["size"] == "large"), (i, s, extent)
        y, x = np.mean([b.centroid for b in blobs], 0) / 64
        where = {"left": x < 0.35, "right": x > 0.65, "top": y < 0.35, "bottom": y > 0.65,
                 "center": 0.3 < x < 0.7 and 0.3 < y < 0.7}
        assert where[s["position"]], (i, s, x, y)


def test_pretrain_noise(world):
    files, scenes = world
    noisy, clean, flags = _load(files, "pretrain"), _load(files, "pretrain_clean"), _load(files, "pretrain_noise")
    assert len(noisy) == len(clean) == len(flags) == SIZES["n_train"]
    assert sum(flags) == round(0.25 * SIZES["n_train"])
    for e, c, bad in zip(noisy, clean, flags):
        s = scenes[int(re.findall(r"\d+", e["image"])[-1])]
        _check_caption(c["caption"], s)
        kind_words = {s["kind"], PLURAL[s["kind"]]}
        assert bool(kind_words & set(e["caption"].split())) != bad  # a wrong caption names another kind
        assert (e["caption"] == c["caption"]) != bad


def test_vqa_answers_true(world):
    files, scenes = world
    answers = set(_load(files, "answer_list"))
    for split in ("vqa_train", "vqa_test"):
        entries = _load(files, split)
        assert len({e["question_id"] for e in entries}) == len(entries)
        for e in entries:
            s = scenes[int(re.findall(r"\d+", e["image"])[-1])]
            assert len(e["answer"]) == 10 and set(e["answer"]) <= answers
            top = max(set(e["answer"]), key=e["answer"].count)
            if e["question"].startswith("what color"):
                assert top == s["color"]
            if e["question"].startswith("how many"):
                assert top == str(s["count"])
            if e["question"].startswith("where"):
                assert top == s["position"]


def test_nlvr_balanced_and_true(world):
    files, scenes = world
    patterns = [re.compile(t.format(r"(\w+)")) for t, _, _ in NLVR_TEMPLATES]
    for split, n in (("nlvr_train", 10 * SIZES["n_train"]), ("nlvr_dev", 10 * SIZES["n_val"])):  # 10 per image
        entries = _load(files, split)
        assert len(entries) == n and sum(e["label"] == "True" for e in entries) == n // 2
        per_template = {}
        for e in entries:
            a, b = (scenes[int(re.findall(r"\d+", p)[-1])] for p in e["images"])
            t = next(k for k, p in enumerate(patterns) if p.fullmatch(e["sentence"]))
            per_template.setdefault(t, []).append(e["label"] == "True")
            m = re.fullmatch(r"there is a (\w+) shape in both images", e["sentence"])
            if m:
                assert (e["label"] == "True") == (a["color"] == m[1] == b["color"])
            m = re.fullmatch(r"the right image has a (\w+) background", e["sentence"])
            if m:
                assert (e["label"] == "True") == (b["background"] == m[1])
            if e["sentence"] == "both images have the same number of shapes":
                assert (e["label"] == "True") == (a["count"] == b["count"])
            if e["sentence"] == "the left image has more shapes than the right image":
                assert (e["label"] == "True") == (a["count"] > b["count"])
            assert " on the " not in e["sentence"]  # no in-image positions: swapping left/right keeps it true
        # every template is there, half true: the sentence alone tells nothing
        assert len(per_template) == len(NLVR_TEMPLATES)
        assert all(abs(2 * sum(v) - len(v)) <= 1 for v in per_template.values())


def test_nlvr_statements_about_chosen_attributes(tmp_path):
    from data.shapes import generate_shapes_world

    files = generate_shapes_world(tmp_path, n_train=20, n_val=4, n_test=4, image_size=32, n_shards=0,
                                  statements_per_image=4, nlvr_about=["background"])
    entries = json.load(open(files["nlvr_train"]))
    assert len(entries) == 80 and all("background" in e["sentence"] for e in entries)
    for about in (["smell"], ["background", "smell"], []):
        with pytest.raises(ValueError, match="nlvr_about: no NLVR2 template is about"):
            generate_shapes_world(tmp_path, n_train=4, n_val=2, n_test=2, image_size=32, n_shards=0, nlvr_about=about)


def test_world_on_disk_is_redone_when_the_generator_version_changes(tmp_path):
    from data.worlds import ensure_shapes_world
    from data import shapes

    spec = {"out_dir": str(tmp_path), "n_train": 4, "n_val": 2, "n_test": 2, "image_size": 32, "n_shards": 0}
    ensure_shapes_world(spec)
    marker = tmp_path / "nlvr_train.json"
    marker.write_text("[]")  # what an older generator might have written
    ensure_shapes_world(spec)
    assert marker.read_text() == "[]"  # same spec, same version: kept
    stamp = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / "spec.json").write_text(json.dumps(dict(stamp, version=shapes.VERSION - 1)))
    ensure_shapes_world(spec)
    assert len(json.loads(marker.read_text())) == 40  # an older version's world: regenerated


def test_coco_ground_truth(world):
    from pycocotools.coco import COCO

    files, scenes = world
    coco = COCO(files["karpathy_test_gt"])
    ids = sorted(coco.getImgIds())
    assert ids == sorted(i for i, s in scenes.items() if s["split"] == "test")
    res = coco.loadRes([{"image_id": i, "caption": "a red circle"} for i in ids])
    assert len(res.getAnnIds()) == len(ids) and len(coco.getAnnIds(imgIds=ids[0])) == 5


def test_cli(tmp_path):
    from data.shapes import main

    main(["--out", str(tmp_path), "--n-train", "4", "--n-val", "2", "--n-test", "2", "--image-size", "32", "--shards", "1"])
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert all(os.path.exists(tmp_path / p) for k, p in manifest.items() if k != "pretrain_shards")
    assert Image.open(tmp_path / "images/train/shapes_000001.png").size == (32, 32)


def test_caption_truth_checker():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert all(caption_is_true(c, scene) for c in captions(scene))
        assert not caption_is_true(wrong_caption(scene, rng), scene)
        other = dict(scene, color=next(c for c in COLORS if c != scene["color"]))
        assert not any(caption_is_true(c, other) for c in captions(scene) if scene["color"] in c)
    scene = {"kind": "circle", "color": "red", "count": 2, "size": "small", "position": "left", "background": "white"}
    assert caption_is_true("two red circles on the left", scene)
    assert not caption_is_true("a red circle on the left", scene)      # one circle: the count is two
    assert not caption_is_true("two red circles at the top", scene)    # position
    assert not caption_is_true("three red circles", scene)             # number
    assert not caption_is_true("a white background", scene)            # names no shape
