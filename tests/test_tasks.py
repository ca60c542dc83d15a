"""A task is one unit: a new one trains through the shared runner with no edit elsewhere; a checkpoint's stored
model description defines the model unless the config sets a key."""
import json

import pytest
import torch

import blip
import blip.training.config
from blip.training.run import run
from blip.tasks import CaptionTask, PretrainTask, Task
from tests._tiny import PairData, tiny_config, tiny_model


class ColourCaptionTask(Task):
    """A task written outside the library: captioning on the tests' random pairs, 'evaluated' by its LM loss."""
    names = ("colour_caption",)
    model_task = "caption"

    def train_data(self, model):
        return PairData(16)

    def losses(self, forward, batch, progress):
        images, captions = batch
        return forward(images, captions)

    def evaluations(self, model, out_dir):
        images, captions = zip(*(PairData(8)[i] for i in range(8)))

        def held_out(m):
            with torch.no_grad():
                return {"loss": m.losses(torch.stack(images), list(captions))["loss_lm"].item()}
        return {"held_out": held_out}

    def best(self, metrics):
        return -metrics["held_out_loss"]


def test_a_new_task_is_one_class_and_the_runner(tmp_path, one_thread):
    config = tmp_path / "colour.yaml"
    config.write_text("task: colour_caption\npreset: micro\nbatch_size: 4\nmax_epoch: 2\ninit_lr: 1e-3\n"
                      "num_workers: 0\nlog_every: 1\n")
    argv = ["--config", str(config), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    metrics = run(ColourCaptionTask, argv)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["held_out_loss"] for r in rows if r["event"] == "eval"]
    assert len(evals) == 2 and evals[-1] < evals[0] and metrics["held_out_loss"] == evals[-1]  # it learns
    for name in ("model.safetensors", "model_best.safetensors", "checkpoint_latest.pt", "loss_curve.png",
                 "config.yaml"):
        assert (tmp_path / "out" / name).exists(), name
    assert blip.load_model("caption", tmp_path / "out" / "model_best.safetensors").cfg.vision_width == 24


def test_stored_model_description_defines_the_model_unless_the_config_sets_a_key(tmp_path):
    """A checkpoint of another size fine-tunes under a config whose preset is another size: the stored description
    wins over the preset, and a key the config sets wins over the stored description."""
    small = tiny_model(PretrainTask, tiny_config(queue_size=8))  # micro: vision width 24, text 16
    blip.save_weights(small, tmp_path / "small.safetensors")
    cfg = blip.training.config.load_config("configs/shapes_caption.yaml", [f"pretrained={tmp_path / 'small.safetensors'}"])
    assert cfg.model.get("preset") == "tiny"  # vision width 64, text 64
    model = CaptionTask(cfg).build_model()
    assert (model.cfg.vision_width, model.cfg.med_config["hidden_size"]) == (24, 16)
    torch.testing.assert_close(model.visual_encoder.pos_embed, small.visual_encoder.pos_embed)

    cfg = blip.training.config.load_config("configs/shapes_caption.yaml",
                                  [f"pretrained={tmp_path / 'small.safetensors'}", "prompt='an image of '"])
    assert CaptionTask(cfg).build_model().cfg.prompt == "an image of "
    cfg = blip.training.config.load_config("configs/shapes_caption.yaml",
                                  [f"pretrained={tmp_path / 'small.safetensors'}", "vision_width=32"])
    with pytest.raises(blip.CheckpointMismatchError, match="visual_encoder"):  # set by the user: refused, named
        CaptionTask(cfg).build_model()
