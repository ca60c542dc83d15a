"""The training engine: exact resume, DDP = one process with the global batch, NaN guard, and counts in optimizer
steps; augmentation randomness apart from the model's; skipped images and losses reported from every worker and
rank."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip.data.samplers import ResumableSampler
from blip.training.engine import fit
from blip.training.optim import SCHEDULES
from blip.tasks import CaptionTask, NLVRTask, PretrainTask
from tests._tiny import PairData, tiny_config, tiny_model
from tests.conftest import launch

ROOT = Path(__file__).resolve().parents[1]


def _pretrain(*overrides, **kw):
    cfg = tiny_config(*overrides, **{**dict(task="pretrain", batch_size=4, max_epoch=2, queue_size=8, init_lr=1e-3,
                                           warmup_steps=2, num_workers=0, seed=1), **kw})
    return PretrainTask(cfg), tiny_model(PretrainTask, cfg)


def _rows(run_dir, event="train"):
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["event"] == event]


def _assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # queues, pointers and momentum encoders included


@pytest.mark.parametrize("accum", [1, 2])
def test_kill_and_resume_gives_the_same_parameters(tmp_path, accum):
    data = PairData(16)  # 4 micro-batches per epoch, 2 epochs
    task, full = _pretrain(grad_accum_steps=accum)
    fit(task, full, data, tmp_path / "a")

    task, part = _pretrain(grad_accum_steps=accum, save_every_steps=1)
    steps = 2 * math.ceil(4 / accum)
    fit(task, part, data, tmp_path / "b", max_steps=steps // 2 + 1)  # "killed" in epoch 1
    assert not _rows(tmp_path / "b", "end")  # cut short: the log does not say the run finished
    task, resumed = _pretrain(grad_accum_steps=accum)  # a fresh process: new model, state from the checkpoint
    fit(task, resumed, data, tmp_path / "b", resume="latest")

    _assert_same_weights(full, resumed)
    assert int(resumed.queue_ptr) == int(full.queue_ptr)
    assert (tmp_path / "b" / "metrics.jsonl").exists() and (tmp_path / "b" / "model.safetensors").exists()
    assert [r["global_step"] for r in _rows(tmp_path / "b", "end")] == [steps]  # ... until the resumed run finished


def test_accumulation_counts_optimizer_steps(tmp_path):
    """grad_accum_steps=2: one EMA per optimizer step, warmup / LR / log_every / save_every_steps in optimizer steps,
    and a config without `task:` still gets pretraining's warmup + step-decay schedule."""
    task, model = _pretrain("med_config.hidden_dropout_prob=0.0", task="", grad_accum_steps=2, warmup_steps=4,
                            warmup_lr=1e-5, init_lr=1e-3, log_every=1, save_every_steps=3, max_epoch=1)
    assert task.schedule_name == "step"
    with torch.no_grad():  # momentum encoders unlike the online ones, so that one EMA can be told from two
        for p in model.visual_encoder_m.parameters():
            p.mul_(0.5)
    online = [p.detach().clone() for p in model.visual_encoder.parameters()]
    before = [p.detach().clone() for p in model.visual_encoder_m.parameters()]
    fit(task, model, PairData(16), tmp_path, max_steps=1)
    m = model.cfg.momentum
    for p0, pm0, pm in zip(online, before, model.visual_encoder_m.parameters()):
        torch.testing.assert_close(pm, m * pm0 + (1 - m) * p0, rtol=0, atol=1e-7)  # once, before the micro-steps

    task, model = _pretrain(task="", grad_accum_steps=2, warmup_steps=4, warmup_lr=1e-5, init_lr=1e-3, log_every=1,
                            save_every_steps=3, max_epoch=1)
    fit(task, model, PairData(32), tmp_path / "full")  # 8 micro-batches = 4 optimizer steps
    rows = _rows(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([1e-5 + (1e-3 - 1e-5) * s / 4 for s in range(4)])
    state = torch.load(tmp_path / "full" / "checkpoint_latest.pt", weights_only=True)
    assert state["progress"]["global_step"] == 4


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    task, model = _pretrain(save_every_steps=1)
    calls = []
    losses = task.losses

    def poisoned(forward, batch, progress):
        calls.append(progress.step)
        out = losses(forward, batch, progress)
        if len(calls) == 3:
            out["loss_lm"] = out["loss_lm"] * float("nan")
        return out

    task.losses = poisoned
    with pytest.raises(FloatingPointError, match="non-finite loss in epoch 0 by step 2"):
        fit(task, model, PairData(16), tmp_path)
    state = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    assert state["progress"]["global_step"] == 2  # the last good step, intact
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_data_workers_do_not_change_the_losses(tmp_path):
    """Augmentations draw from their own per-sample stream and the model (dropout, ITM negatives) from the
    process-wide one: 0 and 2 workers give the same losses and weights."""
    runs = []
    for workers in (0, 2):
        task, model = _pretrain("med_config.hidden_dropout_prob=0.2", num_workers=workers, log_every=1, max_epoch=1)
        fit(task, model, PairData(16, augment=True), tmp_path / str(workers))
        runs.append(model)
    a, b = (_rows(tmp_path / str(w)) for w in (0, 2))
    assert [r["loss_itm"] for r in a] == [r["loss_itm"] for r in b]
    assert [r["loss_lm"] for r in a] == [r["loss_lm"] for r in b]
    _assert_same_weights(*runs)


def test_unreadable_images_are_counted_and_named_from_data_workers(tmp_path):
    from blip.tasks.pretrain import PretrainDataset
    from blip.data.transforms import test_transform
    entries = []
    for i in range(12):
        path = tmp_path / f"img{i}.png"
        if i in (3, 8):
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(path)
        entries.append({"image": path.name, "caption": f"picture {i}"})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    data = PretrainDataset(str(tmp_path / "ann.json"), test_transform(32))
    task, model = _pretrain(num_workers=2, max_epoch=1)
    fit(task, model, data, tmp_path / "run")
    (report,) = _rows(tmp_path / "run", "data")
    assert report["bad_images"] == 2
    assert sorted(Path(n).name for n in report["bad_image_names"]) == ["img3.png", "img8.png"]


def test_two_rank_gloo_run_equals_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = ROOT / "tests" / "_ddp_worker.py"
    one, two = tmp_path / "one", tmp_path / "two"
    launch(worker, "nlvr", one, 8, env=env)
    launch(worker, "nlvr", two, 4, nproc=2, env=env)
    a = torch.load(one / "final.pt", weights_only=True)
    b = torch.load(two / "final.pt", weights_only=True)
    for k in a:
        # Key biases get ~0 gradient (softmax ignores them); Adam turns that float noise into steps of up to
        # lr, so they get a looser bound. Every other weight agrees to float precision.
        assert torch.allclose(a[k], b[k], atol=1e-4 if k.endswith("key.bias") else 2e-6), k
    init = tiny_model(NLVRTask, tiny_config(task="nlvr")).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a if a[k].is_floating_point())  # it did train


def test_logged_losses_are_the_mean_over_ranks_and_micro_steps(tmp_path):
    launch(ROOT / "tests" / "_ddp_worker.py", "ranklog", tmp_path, 2, nproc=2,
           env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = _rows(tmp_path)
    # rank r's loss at micro-step j is 10 r + j: the mean over 2 ranks and 2 micro-steps is 5.5
    assert rows and all(r["loss_rank"] == pytest.approx(5.5) for r in rows)


def test_all_rank_hard_negatives_run_on_two_gloo_ranks(tmp_path):
    launch(ROOT / "tests" / "_ddp_worker.py", "negatives", tmp_path, 0, nproc=2,
           env={**os.environ, "PYTHONPATH": str(ROOT)})
    for task in ("pretrain", "retrieval"):
        rows = _rows(tmp_path / task)
        assert rows and all(math.isfinite(r["loss_itm"]) for r in rows)


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
    cfg = tiny_config(init_lr=3e-4, warmup_lr=1e-6, warmup_steps=3000, min_lr=1e-6, lr_decay_rate=0.9, max_epoch=20)
    step = SCHEDULES["step"]
    assert step(cfg, 0, 0) == pytest.approx(1e-6)
    assert step(cfg, 0, 1500) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert step(cfg, 0, 5000) == pytest.approx(3e-4)
    assert step(cfg, 3, 0) == pytest.approx(3e-4 * 0.9 ** 3)
    ft = tiny_config(init_lr=1e-5, min_lr=0.0, max_epoch=5)
    assert SCHEDULES["cosine"](ft, 0, 0) == pytest.approx(1e-5)
    assert SCHEDULES["cosine"](ft, 2, 7) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_schedule_is_the_tasks_unless_the_config_names_one():
    assert PretrainTask(tiny_config()).schedule_name == "step"  # no `task:` in the config
    assert CaptionTask(tiny_config()).schedule_name == "cosine"
    assert PretrainTask(tiny_config(schedule="cosine")).schedule_name == "cosine"
    with pytest.raises(ValueError, match="schedule"):
        tiny_config(schedule="cosnie")
    with pytest.raises(ValueError, match="'pretrian'.*PretrainTask"):
        PretrainTask(tiny_config(task="pretrian"))


def test_webdataset_shards_train_and_resume(tmp_path):
    """Pretraining reads tar shards: an epoch is sized from the shards and a resume continues from there."""
    from blip.tasks.pretrain import WebDatasetShards
    from blip.data.transforms import test_transform
    from data.shapes import generate_shapes_world
    files = generate_shapes_world(tmp_path / "w", n_train=24, n_val=2, n_test=2, image_size=32, n_shards=2)
    data = WebDatasetShards(files["pretrain_shards"], test_transform(32), shuffle=True)
    assert len(data) == 24
    task, model = _pretrain(save_every_steps=1)
    fit(task, model, data, tmp_path / "run", max_steps=4)  # 6 steps per epoch
    fit(task, model, data, tmp_path / "run", resume="latest")
    steps = [r["step"] for r in _rows(tmp_path / "run")]
    progress = torch.load(tmp_path / "run" / "checkpoint_latest.pt", weights_only=True)["progress"]
    assert max(steps) == 12 and progress == {"epoch": 2, "step": 0, "global_step": 12, "skipped": []}
