"""Real web images, generated here: each is read correctly, or skipped and counted with its name (refused by name in
evaluation and inference) — the same rules in training, evaluation, CapFilt and inference."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import blip
from blip.data import datasets as D
from blip.tasks.caption import CaptionEvalDataset
from blip.tasks.nlvr import NLVRDataset
from blip.tasks.pretrain import PretrainDataset
from blip.tasks.retrieval import RetrievalEvalDataset
from blip.tasks.vqa import VQADataset
from blip.data import transforms as T

BAD = ("truncated.jpg", "empty.jpg", "text.jpg", "bomb_warns.png", "bomb_raises.png")


def _halves(left, right, h=8, w=8, dtype=np.uint8):
    a = np.zeros((h, w, len(left)), dtype)
    a[:, : w // 2], a[:, w // 2:] = left, right
    return a


@pytest.fixture
def cases(tmp_path, monkeypatch):
    """{file name: expected RGB array (None = must not be read)}; PIL's bomb limit lowered to 1000 pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root, want = tmp_path, {}
    Image.fromarray(_halves((10, 200, 30, 255), (255, 0, 0, 0)), "RGBA").save(root / "rgba.png")
    want["rgba.png"] = _halves((10, 200, 30), (255, 255, 255))  # transparent -> white, not the stored red
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[:, 4:, 1], la[:, :4, 1] = 40, 0, 255
    Image.fromarray(la, "LA").save(root / "la.png")
    want["la.png"] = _halves((40, 40, 40), (255, 255, 255))
    p = Image.fromarray(_halves((0,), (1,))[..., 0], "P")
    p.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    p.save(root / "palette_alpha.png", transparency=1)
    want["palette_alpha.png"] = _halves((0, 0, 255), (255, 255, 255))
    p.save(root / "palette.png")
    want["palette.png"] = _halves((0, 0, 255), (255, 0, 0))
    Image.fromarray(np.full((8, 8, 3), (200, 50, 10), np.uint8)).convert("CMYK").save(root / "cmyk.jpg", quality=100)
    want["cmyk.jpg"] = np.full((8, 8, 3), (200, 50, 10), np.uint8)
    Image.fromarray(_halves((65535,), (32896,), dtype=np.uint16)[..., 0]).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I")
    want["grey16.png"] = _halves((255, 255, 255), (128, 128, 128))  # scaled, not clipped to white
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(root / "grey.png")
    want["grey.png"] = np.full((8, 8, 3), 77, np.uint8)
    photo = Image.fromarray(_halves((250, 0, 0), (0, 0, 250), h=16, w=32))  # stored: red left, blue right
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    photo.save(root / "exif_rotated.jpg", exif=exif.tobytes(), quality=100)
    upright = np.zeros((32, 16, 3), np.uint8)
    upright[:16], upright[16:] = (250, 0, 0), (0, 0, 250)  # displayed: red on top, blue below
    want["exif_rotated.jpg"] = upright
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(noisy, "JPEG")
    (root / "truncated.jpg").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("<html>404 not found</html>\n")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "bomb_warns.png")   # 1600 px: over 1x (PIL only warns)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "bomb_raises.png")  # 4096 px: over 2x (PIL raises)
    for name in BAD:
        want[name] = None
    return root, want


def test_each_web_image_is_read_right_or_refused_by_name(cases):
    root, want = cases
    for name, expect in want.items():
        if expect is None:
            with pytest.raises(D.UnreadableImage, match=name):
                D.read_image(root / name)
            continue
        img = D.read_image(root / name)
        assert img.mode == "RGB" and img.size == expect.shape[1::-1], name
        err = np.abs(np.asarray(img).astype(int) - expect)
        assert (err.mean() <= 4 if name.endswith(".jpg") else err.max() == 0), name  # JPEG rings at edges
    with pytest.raises(D.UnreadableImage, match="decompression-bomb"):
        D.read_image(root / "bomb_warns.png")


def test_truncated_stays_refused_when_another_library_allows_truncated_images(cases, monkeypatch):
    root, _ = cases
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(D.UnreadableImage, match="truncated"):
        D.read_image(root / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back


def _ann(root, want):
    path = root / "ann.json"
    path.write_text(json.dumps([{"image": n, "caption": n, "image_id": k} for k, n in enumerate(want)]))
    return str(path)


def test_same_rules_in_training_evaluation_capfilt_and_inference(cases):
    root, want = cases
    tf = T.test_transform(16)
    names = list(want)
    ann = _ann(root, want)
    expected = {n: tf(D.read_image(root / n)) for n in names if want[n] is not None}

    train = PretrainDataset(ann, tf)  # training: skipped, counted, named
    for k, n in enumerate(names):
        sample = train.load(k)
        assert (sample is None) == (n in BAD), n
        if sample is not None:
            assert torch.equal(sample[0], expected[n])
    assert sorted(train.bad_images) == sorted(str(root / n) for n in BAD) and train.num_skipped == len(BAD)

    ev = CaptionEvalDataset(ann, str(root), tf)  # evaluation: never another image under this id
    for k, n in enumerate(names):
        if n in BAD:
            with pytest.raises(D.UnreadableEvalImages) as err:
                ev[k]
            assert all(b in str(err.value) for b in BAD) and f"{len(BAD)} of its images" in str(err.value)
        else:
            image, image_id = ev[k]
            assert image_id == k and torch.equal(image, expected[n])

    from blip.data.images import ImageReads  # CapFilt's shards, feature passes and inference read through it
    from blip.inference.capfilt import list_pairs
    shard_images = ImageReads(list_pairs(ann), [tf], keep_bytes=True)
    reasons = []
    for k, n in enumerate(names):
        _, pixels, _, why = shard_images[k]
        assert (pixels is None) == (n in BAD), n
        if pixels is not None:
            assert torch.equal(pixels[0], expected[n])
        else:
            reasons.append(why)
    assert len(reasons) == len(BAD) and all(any(b in r for r in reasons) for b in BAD)  # each one named

    for n in names:  # inference: ValueError naming the file (the CLI prints it)
        if n in BAD:
            with pytest.raises(ValueError, match=n):
                blip.load_images([root / n], 16)
        else:
            assert torch.equal(blip.load_images([root / n], 16)[0], expected[n])
    assert torch.equal(blip.load_images([Image.open(root / "rgba.png")], 16)[0], expected["rgba.png"])

    # the folder pipeline (blip.inference: uint8 from the workers, floats made on the device): the same pixels
    from blip.inference.inputs import Item, image_batches
    bad, seen = [], {}
    for batch, pixels in image_batches([Item(str(root / n)) for n in names], 16, batch_size=3, workers=2,
                                       unreadable=bad):
        seen.update({Path(it.id).name: x for it, x in zip(batch, pixels)})
    assert sorted(seen) == sorted(n for n in names if n not in BAD) and len(bad) == len(BAD)
    for n, x in seen.items():
        assert torch.equal(x, expected[n]), n


def test_every_evaluation_dataset_refuses_unreadable_images_instead_of_duplicating(cases):
    root, _ = cases
    tf = T.test_transform(16)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "ok.png")
    (root / "ret.json").write_text(json.dumps([{"image": "ok.png", "caption": ["a"]}, {"image": "text.jpg", "caption": ["b"]}]))
    (root / "vqa.json").write_text(json.dumps([{"image": "empty.jpg", "question": "q?", "question_id": 1}]))
    (root / "nlvr.json").write_text(json.dumps([{"images": ["ok.png", "truncated.jpg"], "sentence": "s", "label": "True"}]))
    ret = RetrievalEvalDataset(str(root / "ret.json"), str(root), tf)
    assert ret[0][1] == 0
    with pytest.raises(D.UnreadableEvalImages, match=r"entry 1: .*text\.jpg"):
        ret[1]
    with pytest.raises(D.UnreadableEvalImages, match="empty.jpg"):
        VQADataset(str(root / "vqa.json"), str(root), tf, split="test")[0]
    with pytest.raises(D.UnreadableEvalImages, match="truncated.jpg"):
        NLVRDataset(str(root / "nlvr.json"), str(root), tf, train=False)[0]
    with pytest.raises(RuntimeError, match="no readable image"):  # training skips (and here finds none)
        NLVRDataset(str(root / "nlvr.json"), str(root), tf, train=True)[0]


# ---- item 5: annotation errors name the file and the place ----

def test_annotation_errors_name_the_file_and_line_or_entry(tmp_path):
    tf = T.test_transform(16)
    bad = tmp_path / "train.json"
    bad.write_text('[\n  {"image": "a.png", "caption": "x"},\n  {"image": "b.png" "caption": "y"}\n]')
    with pytest.raises(ValueError, match=r"train\.json: line 3 column 21"):
        PretrainDataset(str(bad), tf)
    from blip.inference.capfilt import list_pairs
    with pytest.raises(ValueError, match=r"train\.json: line 3"):
        list_pairs(str(bad))
    (tmp_path / "latin.json").write_bytes('[{"image": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.json: not UTF-8"):
        CaptionEvalDataset(str(tmp_path / "latin.json"), ".", tf)
    (tmp_path / "dict.json").write_text('{"image": "a.png"}')
    with pytest.raises(ValueError, match=r"dict\.json: expected a JSON list"):
        CaptionEvalDataset(str(tmp_path / "dict.json"), ".", tf)
    (tmp_path / "str.json").write_text('[{"image": "a.png"}, "b.png"]')
    with pytest.raises(ValueError, match=r"str\.json: entry 1 is a str"):
        CaptionEvalDataset(str(tmp_path / "str.json"), ".", tf)
    (tmp_path / "q.json").write_text('[{"image": "a.png", "question": "q", "question_id": 1}]')
    (tmp_path / "answers.json").write_text('["yes", "no",]')
    with pytest.raises(ValueError, match=r"answers\.json: line 1 column 14"):
        VQADataset(str(tmp_path / "q.json"), ".", tf, split="test", answer_list=str(tmp_path / "answers.json"))
    (tmp_path / "answers.json").write_text('["yes", 2]')
    with pytest.raises(ValueError, match=r"answers\.json: .*entry 1"):
        VQADataset(str(tmp_path / "q.json"), ".", tf, split="test", answer_list=str(tmp_path / "answers.json"))
