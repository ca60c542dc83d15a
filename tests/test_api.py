"""The public API's small pieces and the command line (`python -m blip`), run in-process through `main(argv)`
on generated PNGs with tiny models saved by `blip.save_weights`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip.__main__ import main, parse_sets

pytestmark = pytest.mark.usefixtures("one_thread")

MED = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=40)
TINY = dict(image_size=32, patch_size=16, vision_width=48, vision_depth=2, vision_heads=2, embed_dim=16,
            med_config=MED)



@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    paths = []
    for i, (h, w) in enumerate([(40, 50), (64, 64), (30, 20)]):
        p = d / f"img{i}.png"
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


def saved(tmp_path, task, seed=0, **extra):
    torch.manual_seed(seed)
    model = blip.load_model(task, **TINY, **extra)
    with torch.no_grad():  # non-trivial weights: outputs that differ between images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"{task}.safetensors"
    blip.save_weights(model, path)
    return model, path


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- API pieces

def test_load_images_paths_and_pil(pngs):
    x = blip.load_images(pngs[:2], 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    with Image.open(pngs[0]) as im:
        y = blip.load_images([im.convert("L")], 32)  # grey PIL image: made RGB
    assert torch.equal(x[:1], blip.load_images([pngs[0]], 32))
    assert y.shape == (1, 3, 32, 32)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="captioning"):
        blip.load_model("captioning")


def test_parse_sets_reads_yaml_and_json_values():
    opts = parse_sets(["image_size=64", "vit=large", "drop_path_rate=0.1", "vit_grad_ckpt=true",
                       'med_config={"hidden_size": 32, "num_hidden_layers": 2}', "med_config.num_attention_heads=2",
                       "prompt='a photo of '"])
    assert opts == {"image_size": 64, "vit": "large", "drop_path_rate": 0.1, "vit_grad_ckpt": True,
                    "med_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
                    "prompt": "a photo of "}
    assert parse_sets(["med_config=configs/med_config.json"]) == {"med_config": "configs/med_config.json"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets(["image_size"])


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_caption_beam_equals_generate(tmp_path, pngs, capsys):
    model, path = saved(tmp_path, "caption")
    code, out, err = run_cli(capsys, ["caption", *pngs, "--checkpoint", path, "--beams", 3, "--max-length", 10,
                                      "--min-length", 3, "--device", "cpu", "--json", "--batch-size", 2])
    assert code == 0, err
    rows = json_lines(out)
    want = model.generate(blip.load_images(pngs, 32), num_beams=3, max_length=10, min_length=3)
    assert [r["caption"] for r in rows] == want
    assert [r["image"] for r in rows] == [str(p) for p in pngs]
    assert "RANDOM" not in err
    # the plain output: one tab-separated line per image
    code, out, _ = run_cli(capsys, ["caption", pngs[0], "--checkpoint", path, "--beams", 3, "--max-length", 10,
                                    "--min-length", 3, "--device", "cpu"])
    assert out == f"{pngs[0]}\t{want[0]}\n"


def test_cli_caption_sampling_prompt_and_bf16(tmp_path, pngs, capsys):
    model, path = saved(tmp_path, "caption")
    argv = ["caption", *pngs[:2], "--checkpoint", path, "--sample", "--top-p", 0.8, "--seed", 3,
            "--max-length", 10, "--min-length", 2, "--prompt", "a photo of ", "--device", "cpu", "--json"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    want = model.generate(blip.load_images(pngs[:2], 32), sample=True, top_p=0.8, max_length=10, min_length=2,
                          repetition_penalty=1.1, prompt="a photo of ", generator=torch.Generator().manual_seed(3))
    assert [r["caption"] for r in json_lines(out)] == want
    code, out, err = run_cli(capsys, ["caption", pngs[0], "--checkpoint", path, "--bf16", "--device", "cpu",
                                      "--beams", 2, "--max-length", 8, "--json"])
    assert code == 0, err
    assert isinstance(json_lines(out)[0]["caption"], str)


def test_cli_itm_equals_itm_score_and_itc_similarity(tmp_path, pngs, capsys):
    model, path = saved(tmp_path, "itm")
    texts = ["a dog running on the beach", "two cats"]
    code, out, err = run_cli(capsys, ["itm", *pngs[:2], "--text", texts[0], "--text", texts[1],
                                      "--checkpoint", path, "--device", "cpu", "--json"])
    assert code == 0, err
    rows = json_lines(out)
    x = blip.load_images(pngs[:2], 32)
    assert [(r["image"], r["text"]) for r in rows] == [(str(p), t) for p in pngs[:2] for t in texts]
    prob = model.itm_score(x.repeat_interleave(2, 0), texts * 2)
    sim = model.itc_similarity(x, texts).reshape(-1)
    assert torch.allclose(torch.tensor([r["itm"] for r in rows]), prob, atol=1e-6, rtol=0)
    assert torch.allclose(torch.tensor([r["itc"] for r in rows]), sim, atol=1e-6, rtol=0)
    assert len({round(r["itm"], 6) for r in rows}) == 4  # image and text both matter
    code, out, _ = run_cli(capsys, ["itm", pngs[0], "--text", "Two cats.", "--checkpoint", path, "--device", "cpu"])
    assert out.startswith(f"{pngs[0]}\ttwo cats\titm=")  # the text is cleaned as the original's pre_caption


def test_cli_answer_generate_and_rank(tmp_path, pngs, capsys):
    model, path = saved(tmp_path, "vqa")
    x = blip.load_images(pngs, 32)
    q = "what is in the picture?"  # the original's pre_question: lower-case, . ! " ( ) * # : ; ~ deleted
    code, out, err = run_cli(capsys, ["answer", *pngs, "--question", "What is in the (picture)?", "--checkpoint",
                                      path, "--device", "cpu", "--json"])
    assert code == 0, err
    rows = json_lines(out)
    assert all(r["question"] == q for r in rows)
    assert [r["answer"] for r in rows] == model.answer(x, [q] * 3, method="generate", num_beams=3, max_length=10,
                                                       min_length=1)
    answers = ["yes", "no", "two", "a red car", "beach", "dog"]
    alist = tmp_path / "answer_list.json"
    alist.write_text(json.dumps(answers))
    code, out, err = run_cli(capsys, ["answer", *pngs, "--question", q, "--rank", "--answer-list", alist,
                                      "--k", 4, "--checkpoint", path, "--device", "cpu", "--json"])
    assert code == 0, err
    got = [r["answer"] for r in json_lines(out)]
    assert got == model.answer(x, [q] * 3, method="rank", answer_list=answers, k=4)
    assert set(got) <= set(answers)
    txt = tmp_path / "answers.txt"  # one answer a line works too
    txt.write_text("\n".join(answers) + "\n")
    code, out2, _ = run_cli(capsys, ["answer", *pngs, "--question", q, "--rank", "--answer-list", txt, "--k", 4,
                                     "--checkpoint", path, "--device", "cpu", "--json"])
    assert code == 0 and out2 == out


def test_cli_random_weights_warn_and_options_apply(pngs, capsys):
    code, out, err = run_cli(capsys, ["caption", pngs[0], "--device", "cpu", "--beams", 1, "--max-length", 8,
                                      "--set", "image_size=32", "vision_width=48", "vision_depth=2",
                                      "vision_heads=2", f"med_config={json.dumps(MED)}"])
    assert code == 0, err
    assert "RANDOM weights" in err
    assert out.startswith(f"{pngs[0]}\t")


def test_cli_bad_input_is_a_one_line_error(tmp_path, pngs, capsys):
    _, path = saved(tmp_path, "caption")
    code, _, err = run_cli(capsys, ["caption", pngs[0], "--checkpoint", tmp_path / "missing.pth", "--device", "cpu"])
    assert code == 2 and "missing.pth" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image here")
    code, _, err = run_cli(capsys, ["caption", bad, "--checkpoint", path, "--device", "cpu"])
    assert code == 2 and "bad.png" in err
    code, _, err = run_cli(capsys, ["caption", pngs[0], "--checkpoint", path, "--set", "vision_widht=4",
                                    "--device", "cpu"])
    assert code == 2 and "vision_widht" in err
    code, _, err = run_cli(capsys, ["itm", pngs[0], "--text", "a dog", "--checkpoint", path, "--device", "cpu"])
    assert code == 2 and "holds a 'caption' model" in err  # a caption checkpoint is no ITM model
    code, _, err = run_cli(capsys, ["itm", pngs[0], "--text", "a dog", "--checkpoint", path, "--device", "cpu",
                                    "--task", "itm"])
    assert code == 2 and "missing key" in err  # asked for: loaded as one, and its weights do not fit
    with pytest.raises(SystemExit):
        main(["answer", str(pngs[0]), "--question", "what", "--rank"])  # --rank without --answer-list
    assert "--answer-list" in capsys.readouterr().err


def test_a_training_folder_and_its_latest_state_load_as_the_model_they_hold(tmp_path, pngs, capsys, caplog):
    from blip.training.engine import fit
    from blip.tasks import PretrainTask
    from tests._tiny import PairData, tiny_config, tiny_model
    cfg = tiny_config(task="pretrain", batch_size=4, max_epoch=1, queue_size=8, num_workers=0, seed=1)
    trained = tiny_model(PretrainTask, cfg)
    out = tmp_path / "run"
    fit(PretrainTask(cfg), trained, PairData(8), out)
    want = trained.state_dict()
    latest = out / "checkpoint_latest.pt"
    state = torch.load(latest, weights_only=True)
    assert state["task"] == "pretrain" and state["model_config"] == trained.cfg.to_dict()

    for src in (latest, out):  # no model_best yet: the folder means its latest training state
        model = blip.load_model(None, src)  # the task and sizes it names
        assert model.task == "pretrain" and model.cfg == trained.cfg
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    itm = blip.load_model("itm", out)  # another task: loads when the weights fit, with a warning
    assert torch.equal(itm.state_dict()["visual_encoder.cls_token"], want["visual_encoder.cls_token"])

    best = blip.load_model("pretrain", latest)
    with torch.no_grad():
        best.visual_encoder.cls_token.add_(1.0)
    blip.save_weights(best, out / "model_best.safetensors")
    assert torch.equal(blip.load_model(None, out).visual_encoder.cls_token, best.visual_encoder.cls_token)

    # the command line: a folder or checkpoint_latest.pt, as the task they name (ITC + ITM: pretrain's [ENC])
    for src in (out, latest):
        code, stdout, err = run_cli(capsys, ["itm", pngs[0], "--text", "a dog", "--checkpoint", src, "--device",
                                             "cpu", "--json"])
        assert code == 0, err
        assert json_lines(stdout)[0]["image"] == str(pngs[0])


def test_stochastic_depth_is_the_originals_for_each_model_class():
    # the original: a base ViT drops paths (0.1) under the VQA and NLVR2 heads only; ViT-L always; a set value wins
    from blip.models import TASKS, BlipModel, ModelConfig
    blip_tasks = {task: cls for task, cls in TASKS.items() if issubclass(cls, BlipModel)}  # X-FM has its own ViT sizes
    base = {task: ModelConfig(vit="base").vision(cls.vision_drop_path).drop_path_rate
            for task, cls in blip_tasks.items()}
    assert base == {"pretrain": 0.0, "retrieval": 0.0, "itm": 0.0, "caption": 0.0, "vqa": 0.1, "nlvr": 0.1, "ve": 0.0}
    large = {ModelConfig(vit="large").vision(cls.vision_drop_path).drop_path_rate for cls in blip_tasks.values()}
    assert large == {0.1}
    assert ModelConfig(vit="base", drop_path_rate=0.2).vision(TASKS["vqa"].vision_drop_path).drop_path_rate == 0.2
