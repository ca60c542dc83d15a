"""CapFilt on a tiny shapes world with tiny random captioner and filter: outputs, counts, unreadable images,
resume after a crash (byte-identical), the threshold on the ITM score, the filter's precision/recall."""
import json
import shutil

import pytest
import torch

import blip
import blip.inference.capfilt as bc
import capfilt
from blip.inference.capfilt import CapFilt, filter_precision_recall, list_pairs, separation_auc
from data.shapes import generate_shapes_world

TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, embed_dim=16,
            med_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    files = generate_shapes_world(root / "shapes", n_train=10, n_val=1, n_test=1, image_size=32, noise_fraction=0.3,
                                  seed=0, questions_per_image=1, n_shards=2)
    torch.manual_seed(0)
    blip.save_weights(blip.load_model("caption", **TINY), root / "captioner.safetensors")
    blip.save_weights(blip.load_model("retrieval", queue_size=8, **TINY), root / "filter.safetensors")
    # the web pairs plus one whose image is not an image
    (root / "broken.png").write_bytes(b"not a png")
    entries = json.load(open(files["pretrain"]))
    entries = [dict(e, image=str(root / "shapes" / e["image"])) for e in entries]
    entries.append({"image": str(root / "broken.png"), "caption": "a broken image"})
    (root / "web.json").write_text(json.dumps(entries))
    noise = json.load(open(files["pretrain_noise"])) + [True]
    (root / "noise.json").write_text(json.dumps(noise))
    return root, files


def run(world, out, *sets, max_shards=None, inputs=None):
    root, _ = world
    argv = ["--config", "configs/shapes_capfilt.yaml", "--output-dir", str(out), "--device", "cpu", "--set",
            "shapes=null", f"train_file=[{inputs or root / 'web.json'}]", f"noise_file={root / 'noise.json'}",
            f"captioner={root / 'captioner.safetensors'}", f"filter={root / 'filter.safetensors'}",
            "shard_size=4", "batch_size_test=3", "max_length=8", "min_length=3", "num_captions=2", *sets]
    return capfilt.main(argv, max_shards=max_shards)


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory):
    """One uninterrupted run: (out_dir, summary)."""
    out = tmp_path_factory.mktemp("base") / "out"
    return out, run(world, out)


def test_outputs_counts_and_unreadable(world, baseline):
    root, _ = world
    out_dir, summary = baseline
    out = json.load(open(out_dir / "capfilt.json"))
    assert summary["pairs"] == 11 and summary["images_scored"] == 10
    assert summary["unreadable"]["count"] == 1
    assert summary["unreadable"]["images"] == [{"index": 10, "image": str(root / "broken.png")}]
    assert summary["web"]["candidates"] == 10 and summary["synthetic"]["candidates"] == 20
    for c in (summary["web"], summary["synthetic"], summary["total"]):
        assert c["kept"] + c["dropped"] == c["candidates"]
    assert summary["total"]["kept"] == len(out)
    assert {e["source"] for e in out} <= {"web", "synthetic"}
    assert all(e["score"] >= summary["threshold"] == 0.3 and set(e) == {"image", "caption", "source", "score"} for e in out)
    assert "filter_vs_noise" in summary and summary["filter_vs_noise"]["scored"] == 10
    assert (out_dir / "capfilt_scores.png").stat().st_size > 0
    # the cleaned JSON is a pretraining file: its image paths resolve from its own folder
    from blip.tasks.pretrain import PretrainDataset
    ds = PretrainDataset(str(out_dir / "capfilt.json"), None)
    assert all(ds.load(i) is not None for i in range(len(ds)))


def test_resume_is_byte_identical(world, baseline, tmp_path, monkeypatch):
    assert run(world, tmp_path / "b", max_shards=1) is None  # a "crash" after one of three shards
    assert not (tmp_path / "b" / "capfilt.json").exists()
    done = []
    real = bc.process_shard
    monkeypatch.setattr(bc, "process_shard", lambda *a, **k: done.append(a[2]) or real(*a, **k))
    run(world, tmp_path / "b")
    assert done == [4, 8]  # the finished shard (pairs 0-3) was skipped
    (tmp_path / "b" / "shards" / "shard-00001.json").unlink()
    run(world, tmp_path / "b")
    assert done == [4, 8, 4]
    for name in ("capfilt.json", "capfilt_summary.json"):
        assert (baseline[0] / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_threshold_acts_on_itm_score(world, baseline, tmp_path, monkeypatch):
    shutil.copytree(baseline[0], tmp_path / "o")
    monkeypatch.setattr(bc, "process_shard", None)  # the finished shards are only re-merged
    s = run(world, tmp_path / "o", "filter_threshold=0")
    assert s["total"]["kept"] == s["total"]["candidates"] == 30
    s = run(world, tmp_path / "o", "filter_threshold=1.01")
    assert s["total"]["kept"] == 0 and s["total"]["dropped"] == 30
    monkeypatch.undo()
    # the decision is the score's: web texts scored high, synthetic low
    monkeypatch.setattr(CapFilt, "itm_scores", lambda self, px, texts: [[0.9] + [0.1] * (len(t) - 1) for t in texts])
    s = run(world, tmp_path / "p")
    assert (s["web"]["kept"], s["synthetic"]["kept"]) == (10, 0)
    kept = json.load(open(tmp_path / "p" / "capfilt.json"))
    root, files = world
    web = [e["caption"] for e in json.load(open(files["pretrain"]))]
    assert [e["caption"] for e in kept] == web and all(e["source"] == "web" for e in kept)


def test_scores_are_itm_probabilities(world):
    root, _ = world
    itm = blip.load_model("itm", root / "filter.safetensors")
    cf = CapFilt(None, itm, filter_task="itm")
    px = torch.randn(2, 3, 32, 32)
    texts = [["a red circle", "two blue squares"], ["a cross"]]
    got = cf.itm_scores(px, texts)
    want = itm.itm_score(px[[0, 0, 1]], ["a red circle", "two blue squares", "a cross"]).tolist()
    assert got[0] == pytest.approx(want[:2], abs=1e-5) and got[1] == pytest.approx(want[2:], abs=1e-5)


def test_webdataset_input(world, tmp_path):
    root, files = world
    shards = root / "shapes" / "pretrain_shards" / "shard-*.tar"
    pairs = list_pairs(str(shards))
    assert sorted(p.caption for p in pairs) == sorted(e["caption"] for e in json.load(open(files["pretrain"])))
    s = run(world, tmp_path / "w", "filter_threshold=0", "num_captions=1", inputs=shards)
    kept = json.load(open(tmp_path / "w" / "capfilt.json"))
    assert s["total"]["kept"] == 20 and all((tmp_path / "w" / e["image"]).exists() for e in kept)


def test_filter_precision_recall_by_hand():
    kept = [True, False, False, True, None, False]
    noise = [False, True, False, True, True, True]
    # dropped: 1 (wrong), 2 (right), 5 (wrong) -> caught 2, false alarm 1; kept wrong: 3 -> missed 1; 4 not scored
    r = filter_precision_recall(kept, noise)
    assert (r["caught"], r["false_alarms"], r["missed"], r["scored"]) == (2, 1, 1, 5)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert filter_precision_recall([True, True], [False, False])["precision"] == 0.0
    with pytest.raises(ValueError):
        filter_precision_recall([True], [True, False])
    # (right, wrong) pairs: 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1
    assert separation_auc([0.9, 0.4], [0.4, 0.1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert separation_auc([0.2], [0.8]) == 0.0 and separation_auc([], [0.1]) is None
