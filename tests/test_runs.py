"""The entry scripts as a user meets them: a folder that holds a run is refused (--overwrite moves it aside, --resume
continues it, a finished run says so), results are labelled with their folder, and a bad input is one line and
exit status 2, found before anything is written."""
import json
import logging

import pytest
import torch

import pretrain
import train_caption
from blip.errors import OutputExistsError, exit_on_user_error
from data.worlds import ensure_shapes_world

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = {"n_train": 16, "n_val": 4, "n_test": 8, "image_size": 32, "seed": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_world({"out_dir": str(root), **WORLD})
    return root


def shapes(world):
    return "shapes={out_dir: %s, n_train: 16, n_val: 4, n_test: 8, image_size: 32, seed: 0}" % world


def pretrain_args(world, out, *sets):
    return ["--config", "configs/shapes_main.yaml", "--device", "cpu", "--output-dir", str(out), "--set",
            "preset=micro", shapes(world), f"train_file=[{world}/pretrain.json]", "batch_size=4",
            "queue_size=16", "max_epoch=1", "k_test=4", "num_workers=0", *sets]


def caption_args(world, out, *sets):
    return ["--config", "configs/shapes_caption.yaml", "--device", "cpu", "--output-dir", str(out), "--set",
            "preset=micro", shapes(world), f"image_root={world}", f"ann_root={world}", f"coco_gt_root={world}",
            "batch_size=4", "max_epoch=1", "num_workers=0", "meteor=false", "score_captions=false", *sets]


def user_error(capsys, main, argv):
    """(exit status, stderr) of an entry script run as from the shell."""
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(main, argv)
    return exit_.value.code, capsys.readouterr().err


def test_a_folder_holding_a_run_is_refused_and_overwrite_moves_it_aside(world, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    pretrain.main(pretrain_args(world, out))
    printed = capsys.readouterr().out
    assert f"results ({out}):" in printed  # the results block names its folder
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    with pytest.raises(OutputExistsError, match=r"holds a run .*--resume latest.*--overwrite"):
        pretrain.main(pretrain_args(world, out, "init_lr=1e-3"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched

    caplog.set_level(logging.WARNING, logger="blip.training.engine")
    pretrain.main([*pretrain_args(world, out), "--resume", "latest"])
    assert "already complete (1 of 1 epochs trained)" in caplog.text

    pretrain.main([*pretrain_args(world, out, "init_lr=1e-3"), "--overwrite"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert "init_lr: 0.001" in (out / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps))  # one fresh log, not a second "step 1" appended to the old one
    assert f"moved aside to {aside[0]}" in capsys.readouterr().err


def test_bad_inputs_are_one_line_and_nothing_is_written(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = user_error(capsys, pretrain.main, pretrain_args(world, out, "batch_size_train=0"))
    assert code == 2 and err.count("\n") == 1 and "batch_size_train" in err and "Traceback" not in err
    code, err = user_error(capsys, pretrain.main, pretrain_args(world, out, f"pretrained={tmp_path}/nothing.pth"))
    assert code == 2 and "pretrained" in err and "nothing.pth" in err and err.count("\n") == 1
    code, err = user_error(capsys, train_caption.main, caption_args(world, out, f"image_root={tmp_path}/photos"))
    assert code == 2 and "'image_root'" in err and "photos" in err and err.count("\n") == 1
    bad = tmp_path / "args.pth"  # a pickle of more than tensors: torch's page of weights_only advice, cut to a line
    import argparse
    torch.save({"args": argparse.Namespace(lr=1), "model": {}}, bad)
    code, err = user_error(capsys, pretrain.main, pretrain_args(world, out, f"pretrained={bad}"))
    assert code == 2 and err.count("\n") == 1 and "args.pth" in err and "argparse.Namespace" in err
    assert "\x1b" not in err and "weights_only" not in err
    assert not out.exists()  # no folder, no config.yaml: the inputs were refused first
    with pytest.raises(ValueError, match="batch_size_train"):  # --debug: the exception itself, with its traceback
        exit_on_user_error(pretrain.main, [*pretrain_args(world, out, "batch_size_train=0"), "--debug"])


def test_images_that_cannot_be_read_name_image_root_once(world, tmp_path, capsys, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = user_error(capsys, train_caption.main, caption_args(world, tmp_path / "out", f"image_root={empty}"))
    assert code == 2 and [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert "no readable image" in err and f"'image_root' ('{empty}')" in err and "Traceback" not in err
    assert caplog.text.count("skipping unreadable image") == 10  # then counted, not named one by one


def test_help_describes_the_task_not_its_class(capsys):
    with pytest.raises(SystemExit):
        train_caption.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Captioning fine-tuning on COCO" in text and "CaptionTask" not in text
    assert "--overwrite" in text and "--debug" in text


def test_a_config_names_its_task_and_what_the_task_needs(tmp_path, capsys):
    # An empty file once ran as a BLIP-base model on `ann_root: annotation` until "dataset of 0 samples".
    out, empty, untasked = tmp_path / "out", tmp_path / "empty.yaml", tmp_path / "untasked.yaml"
    empty.write_text("\n")
    untasked.write_text("init_lr: 1e-4\n")
    code, err = user_error(capsys, pretrain.main, ["--config", str(empty), "--output-dir", str(out)])
    assert code == 2 and "empty.yaml: the file is empty" in err and "task: pretrain" in err
    code, err = user_error(capsys, train_caption.main, ["--config", str(untasked), "--output-dir", str(out)])
    assert code == 2 and "untasked.yaml: no `task:` key" in err and "task: caption` (or nocaps)" in err
    code, err = user_error(capsys, pretrain.main, ["--config", "configs/shapes_main.yaml", "--output-dir", str(out),
                                                   "--set", "train_file=[]"])
    assert code == 2 and "config key 'train_file' is empty" in err
    assert not out.exists()


def test_a_resumed_run_keeps_the_better_earlier_epoch_as_model_best(tmp_path):
    # the best score so far comes back from the log: a resumed run's first, worse evaluation overwrites nothing
    import blip
    from blip.training.run import Evaluator

    class Scored:
        eval_every_epoch, cfg = True, type("Cfg", (), {"max_epoch": 3})()
        score = 0.0

        def evaluations(self, model, out_dir):
            return {"val": lambda m: {"acc": self.score}}

        def best(self, metrics):
            return metrics["val_acc"]

    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"time": 1.0, "event": "eval", "epoch": 0, "val_acc": 0.9}) + "\n")
    task, model = Scored(), blip.load_model("itm", preset="micro")
    evaluate = Evaluator(task, tmp_path)
    task.score = 0.5
    assert evaluate(model, 1) == {"val_acc": 0.5} and not (tmp_path / "model_best.safetensors").exists()
    task.score = 0.95
    evaluate(model, 2)
    assert (tmp_path / "model_best.safetensors").exists() and evaluate.best == 0.95
