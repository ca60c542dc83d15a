"""`blip caption|answer|itm|embed|search|classify` over whole collections, run as a user runs them: a folder of
generated images with broken files among them, DataLoader workers, streamed outputs read back, a run killed with
SIGKILL and rerun, and two gloo ranks under torchrun against one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip import inference
from blip.__main__ import main
from tests.conftest import launch, trap_env

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220)}
BROKEN = ("green/empty.jpg", "red/cut.png", "blue/not_an_image.jpg")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """50 images in one sub-folder per class (colour), JPEG and PNG of several sizes, 3 of them broken."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.RandomState(0)
    names = list(COLORS)
    for i in range(47):
        color = names[i % 3]
        d = root / color / ("sub" if i % 5 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        h, w = 24 + 4 * (i % 7), 28 + 3 * (i % 5)
        a = (rng.rand(h, w, 3) * 60 + np.array(COLORS[color]) * 0.7).clip(0, 255).astype("uint8")
        ext = ".jpg" if i % 2 else ".png"
        Image.fromarray(a).save(d / f"img{i:02d}{ext}")
    (root / BROKEN[0]).write_bytes(b"")
    good = root / "red" / "img06.png"
    (root / BROKEN[1]).write_bytes(good.read_bytes()[:60])
    (root / BROKEN[2]).write_text("<html>not found</html>")
    return root


def _saved(tmp_path_factory, task, seed=0):
    torch.manual_seed(seed)
    model = blip.load_model(task, preset="micro")
    with torch.no_grad():  # outputs that differ between images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp(task) / f"{task}.safetensors"
    blip.save_weights(model, path)
    return model.eval(), path


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return _saved(tmp_path_factory, "caption")


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    return _saved(tmp_path_factory, "itm")


def cli(argv):
    return main([str(a) for a in argv])


def images_of(folder):
    return sorted(str(p) for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))


CAPTION = ["--beams", 2, "--max-length", 8, "--min-length", 2, "--device", "cpu", "--batch-size", 4,
           "--no-progress"]


def test_folder_with_broken_images_streams_47_rows_and_names_3(folder, captioner, tmp_path, capsys):
    model, ckpt = captioner
    out = tmp_path / "caps.jsonl"
    assert cli(["caption", folder, "--checkpoint", ckpt, "-o", out, "--workers", 2, *CAPTION]) == 0
    err = capsys.readouterr().err
    rows = inference.read_rows(out)
    good = [p for p in images_of(folder) if not p.endswith(BROKEN)]
    assert [r["image"] for r in rows] == good  # input order (sorted, recursive), the broken ones left out
    for name in BROKEN:
        assert name.split("/")[1] in err
    summary = json.loads((tmp_path / "caps.jsonl.summary.json").read_text())
    assert summary["done_now"] == 47 and summary["already_done"] == 0
    assert sorted(Path(b["image"]).name for b in summary["unreadable"]) == sorted(Path(b).name for b in BROKEN)
    # the captions are the model's, image by image (an independent path: load_images + generate)
    want = model.generate(blip.load_images(good[:5], 32), num_beams=2, max_length=8, min_length=2)
    assert [r["caption"] for r in rows[:5]] == want
    # rerun: everything is done, nothing is written twice
    assert cli(["caption", folder, "--checkpoint", ckpt, "-o", out, "--workers", 0, *CAPTION]) == 0
    assert inference.read_rows(out) == rows
    assert json.loads((tmp_path / "caps.jsonl.summary.json").read_text())["already_done"] == 47


def test_killed_run_resumes_to_the_uninterrupted_output(folder, captioner, tmp_path, capsys):
    _, ckpt = captioner
    args = ["caption", folder, "--checkpoint", ckpt, *CAPTION, "--batch-size", 1, "--workers", 1]
    whole = tmp_path / "whole.jsonl"
    assert cli([*args, "-o", whole]) == 0
    cut = tmp_path / "cut.jsonl"
    env = dict(trap_env(dict(os.environ, PYTHONPATH=str(ROOT))), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "blip", *map(str, args), "-o", str(cut)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not cut.exists() or cut.read_text().count("\n") < 5):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = cut.read_text().count("\n")
    assert 5 <= written < 47, written  # killed part-way
    with open(cut, "a") as f:  # as if it died in the middle of a row
        f.write('{"image": "' + str(folder) + '/red/img')
    assert cli([*args, "-o", cut]) == 0
    assert cut.read_text() == whole.read_text()
    summary = json.loads((tmp_path / "cut.jsonl.summary.json").read_text())
    assert summary["already_done"] == written and summary["done_now"] == 47 - written
    capsys.readouterr()


def test_two_gloo_ranks_write_what_one_process_writes(folder, captioner, tmp_path, capsys):
    _, ckpt = captioner
    args = ["caption", folder, "--checkpoint", ckpt, *CAPTION, "--workers", 1]
    assert cli([*args, "-o", tmp_path / "one.jsonl"]) == 0
    launch("-m", "blip", *args, "-o", tmp_path / "two.jsonl", nproc=2, cwd=ROOT)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert not list(tmp_path.glob("*.part*"))  # the ranks' parts were merged and removed
    summary = json.loads((tmp_path / "two.jsonl.summary.json").read_text())
    assert summary["ranks"] == 2 and summary["done_now"] == 47 and len(summary["unreadable"]) == 3
    capsys.readouterr()


def test_every_output_format_reads_back(folder, captioner, matcher, tmp_path, capsys):
    _, cap_ckpt = captioner
    model, ckpt = matcher
    sub = folder / "blue"
    for ext in ("jsonl", "csv"):
        assert cli(["caption", sub, "--checkpoint", cap_ckpt, "-o", tmp_path / f"c.{ext}", *CAPTION]) == 0
    assert inference.read_rows(tmp_path / "c.csv") == inference.read_rows(tmp_path / "c.jsonl")
    texts = ["a red square", "a blue circle", "green"]
    for ext in ("jsonl", "csv"):
        argv = ["itm", sub, "--checkpoint", ckpt, "-o", tmp_path / f"m.{ext}", "--device", "cpu", "--no-progress"]
        assert cli(argv + [a for t in texts for a in ("--text", t)]) == 0
    js, cs = inference.read_rows(tmp_path / "m.jsonl"), inference.read_rows(tmp_path / "m.csv")
    assert [(r["image"], r["text"]) for r in cs] == [(r["image"], r["text"]) for r in js]
    assert np.allclose([float(r["itm"]) for r in cs], [r["itm"] for r in js], atol=1e-12)
    good = [p for p in images_of(sub) if not p.endswith(BROKEN)]
    assert len(js) == 3 * len(good)
    for ext in ("jsonl", "csv"):
        argv = ["classify", folder, "--checkpoint", ckpt, "-o", tmp_path / f"k.{ext}", "--k", 2, "--no-progress",
                "--device", "cpu"]
        assert cli(argv) == 0
    kj, kc = inference.read_rows(tmp_path / "k.jsonl"), inference.read_rows(tmp_path / "k.csv")
    assert [r["labels"] for r in kc] == [r["labels"] for r in kj] and [r["label"] for r in kc] == [r["label"] for r in kj]
    assert all(set(r["labels"]) <= set(COLORS) for r in kj)
    summary = json.loads((tmp_path / "k.jsonl.summary.json").read_text())
    assert summary["accuracy_n"] == 47
    top1 = 100 * np.mean([r["labels"][0] == r["label"] for r in kj])
    assert summary["accuracy_top1"] == pytest.approx(top1)
    # --k above the number of labels: top-k accuracy over all of them (100%), the k the rows hold
    assert cli(["classify", folder, "--checkpoint", ckpt, "-o", tmp_path / "k5.jsonl", "--k", 5, "--no-progress",
                "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "k5.jsonl.summary.json").read_text())
    assert summary["k"] == 3 and summary["accuracy_topk"] == 100.0
    # embeddings: safetensors and .npy + ids, equal to the ITC features computed directly
    x = blip.load_images(good, 32)
    _, want = model.image_features(x)
    for name in ("g.safetensors", "g.npy"):
        assert cli(["embed", sub, "--checkpoint", ckpt, "-o", tmp_path / name, "--text", texts[0], "--text",
                    texts[1], "--no-progress", "--device", "cpu"]) == 0
        got = inference.read_embeddings(tmp_path / name)
        assert got["image_ids"] == good and got["text_ids"] == texts[:2]
        assert torch.allclose(got["image_embeds"], want, atol=1e-5)
        assert torch.allclose(got["text_embeds"], model.text_features(texts[:2])[2], atol=1e-5)
    # search reads that gallery back: the query's top hit is the image with the largest ITC similarity
    for ext in ("jsonl", "csv"):
        assert cli(["search", "--gallery", tmp_path / "g.safetensors", "--query", texts[1], "--k", 3,
                    "--checkpoint", ckpt, "-o", tmp_path / f"s.{ext}", "--device", "cpu"]) == 0
    sj, sc = inference.read_rows(tmp_path / "s.jsonl"), inference.read_rows(tmp_path / "s.csv")
    sims = (want @ model.text_features([texts[1]])[2].t())[:, 0]
    assert [r["image"] for r in sj] == [good[i] for i in sims.topk(3).indices.tolist()]
    assert [r["image"] for r in sc] == [r["image"] for r in sj] and [int(r["rank"]) for r in sc] == [1, 2, 3]
    capsys.readouterr()


def test_answer_per_image_questions_from_csv(folder, tmp_path_factory, tmp_path, capsys):
    model, ckpt = _saved(tmp_path_factory, "vqa")
    good = [p for p in images_of(folder / "red") if not p.endswith(BROKEN)][:3]
    qs = ["What colour is it?", "is it red", "how many"]
    csv_file = tmp_path / "q.csv"
    csv_file.write_text("image,question\n" + "".join(f"{os.path.relpath(p, tmp_path)},{q}\n" for p, q in zip(good, qs)))
    out = tmp_path / "a.jsonl"
    assert cli(["answer", *good, "--questions", csv_file, "--checkpoint", ckpt, "-o", out, "--device", "cpu",
                "--no-progress"]) == 0
    rows = inference.read_rows(out)
    want = model.answer(blip.load_images(good, 32), [blip.data.tokenizer.pre_question(q) for q in qs])
    assert [r["answer"] for r in rows] == want and [r["image"] for r in rows] == good
    capsys.readouterr()


def test_shards_and_path_lists_are_inputs(folder, tmp_path):
    import tarfile
    good = [p for p in images_of(folder / "green") if not p.endswith(BROKEN)][:4]
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as t:
        for i, p in enumerate(good):
            t.add(p, arcname=f"{i:06d}{Path(p).suffix}")
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = 3
            import io
            t.addfile(info, io.BytesIO(b"abc"))
    items = inference.collect(str(tmp_path / "shard-{000..000}.tar"))
    assert [it.id for it in items] == [f"{tar}:{i:06d}" for i in range(4)]
    from_tar = torch.cat([x for _, x in inference.image_batches(items, 32, batch_size=2, workers=1)])
    assert torch.equal(from_tar, blip.load_images(good, 32))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(os.path.relpath(p, tmp_path) for p in good) + "\nmissing.png\n")
    bad = []
    listed = inference.collect(lst)
    got = torch.cat([x for _, x in inference.image_batches(listed, 32, batch_size=3, workers=0, unreadable=bad)])
    assert torch.equal(got, from_tar) and [Path(it.id).name for it, _ in bad] == ["missing.png"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inference.collect(str(tmp_path / "nowhere"))


def test_bf16_runs_every_command_on_bfloat16_weights_near_fp32(folder, captioner, matcher, tmp_path, capsys):
    """--bf16 casts the weights: every command runs, embeddings and ITM stay near the fp32 run's, captions decode."""
    _, cap_ckpt = captioner
    _, ckpt = matcher
    sub, texts = folder / "green", ["a red square", "a blue circle"]
    tx = [a for t in texts for a in ("--text", t)]
    common = ["--checkpoint", ckpt, "--device", "cpu", "--no-progress"]
    for prec in ([], ["--bf16"]):
        tag = "bf16" if prec else "fp32"
        assert cli(["embed", sub, *common, *tx, "-o", tmp_path / f"e_{tag}.safetensors", *prec]) == 0
        assert cli(["itm", sub, *common, *tx, "-o", tmp_path / f"m_{tag}.jsonl", *prec]) == 0
        assert cli(["caption", sub, "--checkpoint", cap_ckpt, "-o", tmp_path / f"c_{tag}.jsonl", *CAPTION, *prec]) == 0
    e32, e16 = (inference.read_embeddings(tmp_path / f"e_{t}.safetensors") for t in ("fp32", "bf16"))
    assert e16["image_embeds"].dtype == torch.float32 and e16["image_ids"] == e32["image_ids"]
    cos = torch.nn.functional.cosine_similarity(e16["image_embeds"], e32["image_embeds"], dim=-1)
    assert cos.min() > 0.98, cos
    m32, m16 = (inference.read_rows(tmp_path / f"m_{t}.jsonl") for t in ("fp32", "bf16"))
    assert np.abs(np.array([r["itm"] for r in m16]) - [r["itm"] for r in m32]).max() < 0.05
    from blip.__main__ import build_parser, load
    args = build_parser().parse_args(["embed", str(sub), "--checkpoint", str(ckpt), "--bf16"])
    assert {p.dtype for p in load("itm", args, torch.device("cpu")).parameters()} == {torch.bfloat16}
    c16 = inference.read_rows(tmp_path / "c_bf16.jsonl")
    assert len(c16) == len(inference.read_rows(tmp_path / "c_fp32.jsonl")) and all(r["caption"] for r in c16)
    capsys.readouterr()


def test_a_rerun_with_another_request_is_refused_naming_what_differs(folder, captioner, tmp_path, capsys):
    _, ckpt = captioner
    sub, out = folder / "blue", tmp_path / "caps.jsonl"
    args = ["caption", sub, "--checkpoint", ckpt, *CAPTION, "--workers", 0]
    assert cli([*args, "-o", out]) == 0
    assert cli([*args, "-o", out]) == 0  # the same request resumes (all done)
    written = out.read_bytes()
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(ckpt).read_bytes())
    for change, differs in ((["--beams", 3], "beams"), (["--sample"], "sample"), (["--bf16"], "precision"),
                            (["--checkpoint", copy], "checkpoint")):
        capsys.readouterr()
        assert cli([*args, *change, "-o", out]) == 2
        err = capsys.readouterr().err
        assert f"{out} holds rows of another request ({differs} differ)" in err and "--overwrite" in err, err
        assert out.read_bytes() == written  # refused: nothing appended
    # a killed run is known by its request too: it is recorded before the first row
    assert json.loads((tmp_path / "caps.jsonl.summary.json").read_text())["request"]["beams"] == 2
    # --overwrite: the old output and its summary moved aside, never deleted; the new one made from scratch
    assert cli([*args, "--beams", 3, "-o", out, "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("caps.old-") and p.name.endswith(".jsonl")]
    assert len(aside) == 1 and aside[0].read_bytes() == written
    assert json.loads(Path(f"{aside[0]}.summary.json").read_text())["request"]["beams"] == 2
    summary = json.loads((tmp_path / "caps.jsonl.summary.json").read_text())
    assert summary["request"]["beams"] == 3 and summary["done_now"] == summary["items"] - 1  # one broken image
    # .jsonl and .csv of one stem keep a summary each
    assert cli([*args, "--beams", 3, "-o", tmp_path / "caps.csv"]) == 0
    assert json.loads((tmp_path / "caps.jsonl.summary.json").read_text())["output"] == str(out)
    assert json.loads((tmp_path / "caps.csv.summary.json").read_text())["output"] == str(tmp_path / "caps.csv")
    capsys.readouterr()


def test_questions_name_the_images_they_do_not_cover(folder, tmp_path_factory, tmp_path, capsys):
    _, ckpt = _saved(tmp_path_factory, "vqa")
    good = [p for p in images_of(folder / "red") if not p.endswith(BROKEN)][:4]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({good[0]: "what colour is it?", good[2]: "is it red"}))
    out = tmp_path / "a.jsonl"
    assert cli(["answer", *good, "--questions", questions, "--checkpoint", ckpt, "-o", out, "--device", "cpu",
                "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "has no question for 2 of the 4 images" in err and good[1] in err and good[3] in err
    summary = json.loads((tmp_path / "a.jsonl.summary.json").read_text())
    assert summary["without_question"] == [good[1], good[3]] and summary["done_now"] == 2
    questions.write_text(json.dumps({good[0]: "how many?"}))  # another file content: another request
    assert cli(["answer", *good, "--questions", questions, "--checkpoint", ckpt, "-o", out, "--device", "cpu",
                "--no-progress"]) == 2
    assert "questions differ" in capsys.readouterr().err


def test_a_checkpoint_runs_as_the_task_it_names(folder, matcher, tmp_path_factory, tmp_path, capsys):
    _, itm_ckpt = matcher
    _, retrieval_ckpt = _saved(tmp_path_factory, "retrieval")
    _, vqa_ckpt = _saved(tmp_path_factory, "vqa")
    sub = folder / "red"
    common = ["--text", "a red square", "--device", "cpu", "--no-progress", "--json", "--workers", 0]
    rows = {}
    for name, task in (("stored", []), ("retrieval", ["--task", "retrieval"]), ("itm", ["--task", "itm"])):
        assert cli(["itm", sub, "--checkpoint", retrieval_ckpt, *common, *task]) == 0
        out, err = capsys.readouterr()
        rows[name] = [json.loads(line)["itm"] for line in out.splitlines()]
        assert ("saved as a 'retrieval' model; loading it as --task itm" in err) == (name == "itm")
    assert rows["stored"] == rows["retrieval"] != rows["itm"]  # [ENC] first, as it was trained
    # a VQA checkpoint is no captioner: refused by name; asked for, it loads only if its weights fit (these do not:
    # the micro answer decoder reads 16-wide question states, a captioner's decoder 24-wide image features)
    assert cli(["caption", sub, "--checkpoint", vqa_ckpt, *CAPTION]) == 2
    assert "holds a 'vqa' model; `blip caption` runs 'caption' models" in capsys.readouterr().err
    assert cli(["caption", sub, "--checkpoint", vqa_ckpt, *CAPTION, "--task", "caption"]) == 2
    err = capsys.readouterr().err
    assert "saved as a 'vqa' model" in err and "does not fit the 'caption' model" in err

    # a gallery knows its model: search with another (same width) or of another width is refused in one line
    gallery = tmp_path / "g.safetensors"
    assert cli(["embed", sub, "--checkpoint", itm_ckpt, "-o", gallery, "--device", "cpu", "--no-progress"]) == 0
    assert inference.read_embeddings(gallery)["model"]["task"] == "itm"
    search = ["search", "--gallery", gallery, "--query", "a red square", "--device", "cpu"]
    assert cli([*search, "--checkpoint", itm_ckpt]) == 0
    capsys.readouterr()
    assert cli([*search, "--checkpoint", retrieval_ckpt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embedded by another model (checkpoint, task differ" in err
    torch.manual_seed(0)
    wide = blip.load_model("itm", preset="micro", embed_dim=24)
    wide_ckpt = tmp_path / "wide.safetensors"
    blip.save_weights(wide, wide_ckpt)
    assert cli([*search, "--checkpoint", wide_ckpt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features" in err and "wide, this model's are 24" in err
