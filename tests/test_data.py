"""Transforms, RandAugment ops and every task dataset, on files from the shapes world."""
import io
import json
import logging
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blip.data import datasets as D
from blip.tasks.caption import CaptionEvalDataset, CaptionTrainDataset, NoCapsDataset
from blip.tasks.nlvr import NLVRDataset, swap_left_right
from blip.tasks.pretrain import PretrainDataset, WebDatasetShards
from blip.tasks.retrieval import RetrievalEvalDataset, RetrievalTrainDataset
from blip.tasks.vqa import VQADataset, answer_weights
from blip.data.batches import VQACollate
from blip.data import transforms as T
from data.shapes import generate_shapes_world

N_TRAIN, N_VAL, N_TEST = 8, 4, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes_world(tmp_path_factory.mktemp("shapes"), N_TRAIN, N_VAL, N_TEST, image_size=32, seed=0)


@pytest.fixture
def tf():
    return T.test_transform(16)


def _image(seed=0, size=(40, 48)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


# ---- transforms ----

def test_transform_shapes_and_normalisation():
    img = _image()
    x = T.train_transform(24)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    gray = Image.new("RGB", (30, 20), (128, 128, 128))
    y = T.test_transform(16)(gray)
    expect = (128 / 255 - torch.tensor(T.MEAN)) / torch.tensor(T.STD)
    assert y.shape == (3, 16, 16) and torch.allclose(y, expect[:, None, None].expand_as(y), atol=1e-5)
    assert torch.equal(T.test_transform(16)(img), T.test_transform(16)(img))


def test_train_transform_seeded_and_hflip_flag():
    img = _image()
    t = T.train_transform(24, scale=(0.2, 1.0))
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    assert torch.equal(a, t(img))
    assert not any(type(s).__name__ == "RandomHorizontalFlip" for s in T.train_transform(24, hflip=False).transforms)


def test_randaugment_ops():
    a = np.asarray(_image(1)).copy()
    for name in ("Brightness", "Sharpness"):  # factor (5/10)*1.8+0.1 = 1.0 at M=5
        op, args = T.OPS[name]
        assert args(5) == (1.0,) and np.array_equal(op(a, *args(5)), a)
    assert np.array_equal(T.OPS["Identity"][0](a), a)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        out = T.OPS[name][0](a, *T.OPS[name][1](5))
        assert out.shape == a.shape and out.dtype == np.uint8 and (out != a).mean() > 0.5, name
    moved = T.translate_x(a, 5.0)  # cv2 maps source to destination: +5 moves the content 5 px left
    assert (moved[:, -5:] == 128).all() and np.array_equal(moved[:, :-5], a[:, 5:])
    assert abs(T.OPS["ShearX"][1](5)[0]) == pytest.approx(0.15) and abs(T.OPS["Rotate"][1](5)[0]) == 15.0
    pil = Image.fromarray(a)
    assert np.array_equal(T.equalize(a), np.asarray(ImageOps.equalize(pil)))
    assert np.array_equal(T.autocontrast(a // 2 + 40), np.asarray(ImageOps.autocontrast(Image.fromarray(a // 2 + 40))))
    out = T.RandomAugment(2, 5, is_pil=True)(pil)
    assert out.dtype == np.uint8 and out.shape == a.shape


# ---- datasets on the shapes world ----

def test_pretrain_dataset(world, tf):
    ds = PretrainDataset([world["pretrain"], world["pretrain_clean"]], tf, max_words=30)
    assert len(ds) == 2 * N_TRAIN
    image, caption = ds[0]
    assert image.shape == (3, 16, 16) and isinstance(caption, str) and caption == caption.lower()


def test_webdataset_shards_split(world, tf):
    full = WebDatasetShards(world["pretrain_shards"], tf)
    assert len(full.shards) == 2
    captions = [c for _, c in full]
    assert len(captions) == N_TRAIN
    with open(world["pretrain"]) as f:
        assert sorted(captions) == sorted(e["caption"] for e in json.load(f))
    for shards in (full.shards, full.shards[:1]):  # by shard, then by sample (fewer shards than readers)
        parts = [[c for _, c in WebDatasetShards(shards, tf, rank=r, world_size=2)] for r in range(2)]
        whole = [c for _, c in WebDatasetShards(shards, tf)]
        assert sorted(parts[0] + parts[1]) == sorted(whole) and parts[0] and parts[1]


def test_webdataset_bad_member(tmp_path, tf):
    good = io.BytesIO()
    _image(2).save(good, format="PNG")
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", good.getvalue()), ("a.json", b'{"caption": "A Red Circle."}'),
                           ("b.jpg", b"garbage"), ("b.txt", b"bad"), ("c.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = WebDatasetShards(str(path), tf)
    samples = list(ds)
    assert [c for _, c in samples] == ["a red circle"] and ds.num_skipped == 1 and ds.bad_images == [f"{path}:b"]


def test_caption_datasets(world, tf):
    train = CaptionTrainDataset(world["karpathy_train"], world["root"], tf)
    assert len(train) == 5 * N_TRAIN and len(train.img_ids) == N_TRAIN
    image, caption, idx = train[7]
    assert image.shape == (3, 16, 16) and idx == 1 and not caption.startswith("a picture of")
    ev = CaptionEvalDataset(world["karpathy_val"], world["root"], tf)
    assert [ev[k][1] for k in range(len(ev))] == list(range(N_TRAIN + 1, N_TRAIN + N_VAL + 1))
    nocaps = NoCapsDataset(world["nocaps_val"], world["root"], tf)
    assert nocaps.image_ids == ev.image_ids
    assert D.int_id("val2014/COCO_val2014_000000391895.jpg") == 391895


def test_retrieval_datasets(world, tf):
    tr = RetrievalTrainDataset(world["karpathy_train"], world["root"], tf)
    assert [tr[k][2] for k in (0, 4, 5)] == [0, 0, 1]
    ev = RetrievalEvalDataset(world["karpathy_test"], world["root"], tf)
    assert len(ev) == len(ev.image) == N_TEST and len(ev.text) == 5 * N_TEST
    assert ev.img2txt[1] == [5, 6, 7, 8, 9] and all(ev.txt2img[t] == i for i, ts in ev.img2txt.items() for t in ts)
    image, index = ev[2]
    assert index == 2 and image.shape == (3, 16, 16)


def test_vqa_dataset_and_collate(world, tf):
    train = VQADataset([world["vqa_train"]], world["root"], tf, split="train")
    samples = [train[k] for k in range(3)]
    batch = VQACollate(question_max_length=35, answer_max_length=None)(samples)
    assert batch.images.shape == (3, 3, 16, 16) and batch.q_ids.shape[0] == 3
    n = [len(s[2]) for s in samples]
    assert len(batch.a_ids) == len(batch.weights) == sum(n) and torch.allclose(batch.weights.sum(), torch.tensor(3.0))
    assert batch.a_question.tolist() == [q for q, k in enumerate(n) for _ in range(k)]  # each answer's question
    test = VQADataset(world["vqa_test"], world["root"], tf, split="test", answer_list=world["answer_list"])
    image, question, qid = test[0]
    assert isinstance(qid, int) and question == question.lower() and "yes" in test.answer_list


def test_vqa_weights_as_original():
    answers, weights = answer_weights({"dataset": "vqa", "answer": ["two"] * 7 + ["three"] * 2 + ["2"]})
    assert answers == ["two", "three", "2"] and weights == pytest.approx([0.7, 0.2, 0.1])
    assert answer_weights({"dataset": "vg", "answer": "red"}) == (["red"], [0.2])


def test_nlvr_swap(world, tf):
    assert swap_left_right("the left image is right of the bright one") == "the right image is left of the bright one"
    rows = [{"images": ["images/train/shapes_000001.png", "images/train/shapes_000002.png"],
             "sentence": "The left image has more shapes than the right image.", "label": "True"}]
    ann = _write(os.path.join(world["root"], "nlvr_one.json"), rows)
    first = tf(Image.open(os.path.join(world["root"], rows[0]["images"][0])).convert("RGB"))
    ev = NLVRDataset(ann, world["root"], tf, train=False)
    for _ in range(5):  # evaluation never swaps
        im0, _, sentence, label = ev[0]
        assert torch.equal(im0, first) and sentence.startswith("the left image") and label == 1
    train = NLVRDataset(ann, world["root"], tf, train=True)
    seen = set()
    for seed in range(8):
        random.seed(seed)
        im0, im1, sentence, _ = train[0]
        swapped = torch.equal(im1, first)
        assert sentence == ("the right image has more shapes than the left image" if swapped
                            else "the left image has more shapes than the right image")
        seen.add(swapped)
    assert seen == {True, False}
    full = NLVRDataset(world["nlvr_train"], world["root"], tf, train=True)
    assert len(full) == 10 * N_TRAIN and full[0][2]  # 10 statements per image (the default)


# ---- validation and bad images ----

def test_missing_field_raises(tmp_path, world, tf):
    ann = _write(tmp_path / "bad.json", [{"image": "x.png", "caption": "a", "image_id": "1"}, {"image": "y.png", "caption": "b"}])
    with pytest.raises(ValueError, match=r"bad\.json: entry 1 .*image_id"):
        CaptionTrainDataset(ann, world["root"], tf)
    with pytest.raises(ValueError, match="entry 0"):
        VQADataset(_write(tmp_path / "q.json", [{"image": "x", "question": "q?"}]), ".", tf, split="test")
    with pytest.raises(ValueError, match="entry 0"):
        NLVRDataset(_write(tmp_path / "n.json", [{"images": ["a"], "sentence": "s", "label": "True"}]), ".", tf, train=False)


def test_corrupt_image_skipped_and_counted(tmp_path, world, tf, caplog):
    root = tmp_path
    shutil.copy(os.path.join(world["root"], "images/train/shapes_000001.png"), root / "good.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ann = _write(root / "pre.json", [{"image": "broken.jpg", "caption": "x"}, {"image": "missing.jpg", "caption": "y"},
                                     {"image": "good.png", "caption": "Two Circles!"}])
    ds = PretrainDataset([ann], tf)
    with caplog.at_level(logging.WARNING, logger="blip.data.datasets"):
        image, caption = ds[0]
        ds[0]
    assert caption == "two circles" and image.shape == (3, 16, 16)
    assert ds.bad_images == [str(root / "broken.jpg"), str(root / "missing.jpg")] and ds.num_skipped == 4
    assert sum("broken.jpg" in r.getMessage() for r in caplog.records) == 1  # logged once per path


def test_skip_count_reaches_trainer_from_workers(tmp_path, world, tf):
    shutil.copy(os.path.join(world["root"], "images/train/shapes_000001.png"), tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    rows = [{"image": "good.png", "caption": "a"}, {"image": "bad.jpg", "caption": "b"}]
    ds = PretrainDataset([_write(tmp_path / "p.json", rows)], tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    images, captions = next(iter(loader))
    assert images.shape[0] == 2 and list(captions) == ["a", "a"] and ds.num_skipped == 1
