"""The training engine: exact resume, DDP = one process with the global batch, NaN guard, schedules."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

import blip
from blip.engine import ResumableSampler, fit, lr_at
from blip.tasks import PretrainObjective, model_options
from tests._tiny import PairData, tiny_config
from tests.conftest import launch

ROOT = Path(__file__).resolve().parents[1]


def _pretrain(tmp, **kw):
    cfg = tiny_config(task="pretrain", batch_size=4, max_epoch=2, queue_size=8, init_lr=1e-3, warmup_steps=2,
                      num_workers=0, seed=1, **kw)
    torch.manual_seed(0)
    model = blip.load_model("pretrain", **model_options(cfg))
    return cfg, model


def test_kill_and_resume_gives_the_same_parameters(tmp_path):
    data = PairData(16)  # 4 steps per epoch, 2 epochs
    cfg, full = _pretrain(tmp_path)
    fit(full, PretrainObjective(0.4), data, cfg, tmp_path / "a")

    cfg, part = _pretrain(tmp_path, save_every_steps=1)
    fit(part, PretrainObjective(0.4), data, cfg, tmp_path / "b", max_steps=5)  # "killed" mid epoch 1
    cfg, resumed = _pretrain(tmp_path)  # a fresh process: new model, state from the checkpoint
    fit(resumed, PretrainObjective(0.4), data, cfg, tmp_path / "b", resume="latest")

    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # queues, pointers and momentum encoders included
    assert int(resumed.queue_ptr) == int(full.queue_ptr)
    assert (tmp_path / "b" / "metrics.jsonl").exists() and (tmp_path / "b" / "model.safetensors").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg, model = _pretrain(tmp_path, save_every_steps=1)
    calls = []

    def objective(forward, m, batch, epoch, i, n):
        calls.append(i)
        out = PretrainObjective(0.4)(forward, m, batch, epoch, i, n)
        if len(calls) == 3:
            out["loss_lm"] = out["loss_lm"] * float("nan")
        return out

    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 0 batch 2"):
        fit(model, objective, PairData(16), cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert state["progress"]["step"] == 2  # the last good step, intact
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_two_rank_gloo_run_equals_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = ROOT / "tests" / "_ddp_worker.py"
    one, two = tmp_path / "one", tmp_path / "two"
    launch(worker, one, 8, env=env)
    launch(worker, two, 4, nproc=2, env=env)
    a = torch.load(one / "final.pt", weights_only=True)
    b = torch.load(two / "final.pt", weights_only=True)
    for k in a:
        # Key biases get ~0 gradient (softmax ignores them); Adam turns that float noise into steps of up to
        # lr, so they get a looser bound. Every other weight agrees to float precision.
        assert torch.allclose(a[k], b[k], atol=1e-4 if k.endswith("key.bias") else 2e-6), k
    init = blip.load_model("nlvr", **model_options(tiny_config(task="nlvr"))).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a if a[k].is_floating_point())  # it did train


def test_all_rank_hard_negatives_run_on_two_gloo_ranks(tmp_path):
    launch(ROOT / "tests" / "_ddp_worker.py", tmp_path, 0, nproc=2, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for task in ("pretrain", "retrieval"):
        rows = [json.loads(l) for l in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(math.isfinite(r["loss_itm"]) for r in rows if r["event"] == "train")


def test_sampler_splits_global_batches_across_ranks_and_resumes():
    one = list(ResumableSampler(20, 4, world=1, seed=5))
    r0 = list(ResumableSampler(20, 2, world=2, rank=0, seed=5))
    r1 = list(ResumableSampler(20, 2, world=2, rank=1, seed=5))
    for j in range(5):
        assert sorted(one[4 * j:4 * j + 4]) == sorted(r0[2 * j:2 * j + 2] + r1[2 * j:2 * j + 2])
    s = ResumableSampler(20, 4, seed=5)
    s.set_epoch(0, start_batch=3)
    assert list(s) == one[12:]


def test_learning_rate_schedules_are_the_originals():
    cfg = tiny_config(task="pretrain", init_lr=3e-4, warmup_lr=1e-6, warmup_steps=3000, min_lr=1e-6,
                      lr_decay_rate=0.9, max_epoch=20)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 0, 1500) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert lr_at(cfg, 0, 5000) == pytest.approx(3e-4)
    assert lr_at(cfg, 3, 0) == pytest.approx(3e-4 * 0.9 ** 3)
    ft = tiny_config(task="caption", init_lr=1e-5, min_lr=0.0, max_epoch=5)
    assert lr_at(ft, 0, 0) == pytest.approx(1e-5)
    assert lr_at(ft, 2, 7) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_webdataset_shards_train_and_resume(tmp_path):
    """Pretraining reads tar shards: an epoch is sized from the shards and a resume continues from there."""
    from data.datasets import WebDatasetShards
    from data.shapes import generate_shapes_world
    from data.transforms import test_transform
    files = generate_shapes_world(tmp_path / "w", n_train=24, n_val=2, n_test=2, image_size=32, n_shards=2)
    data = WebDatasetShards(files["pretrain_shards"], test_transform(32), shuffle=True)
    assert len(data) == 24
    cfg, model = _pretrain(tmp_path, save_every_steps=1)
    fit(model, PretrainObjective(0.4), data, cfg, tmp_path / "run", max_steps=4)  # 6 steps per epoch
    fit(model, PretrainObjective(0.4), data, cfg, tmp_path / "run", resume="latest")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert max(steps) == 12 and torch.load(tmp_path / "run" / "checkpoint_latest.pt",
                                          weights_only=True)["progress"] == {"epoch": 2, "batch": 0, "step": 12}
