"""Several data streams in one optimizer step (blip.data.samplers.Streams) and X-FM's task on them: the positions each
stream draws, exact resume, workers, 2 gloo ranks = one process with the global batch, one stream = one dataset, and
pretrain_xfm.py on the shapes world with three streams and with pairs only (arm A)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip.data.samplers import ResumableSampler, Streams, stream_seed
from blip.tasks import XFMTask
from blip.training.config import load_config
from blip.training.engine import fit
from tests._tiny import OneDatasetTask, Rows, StreamsTask, tiny_config
from tests.conftest import launch
from tests.test_engine import _assert_same_weights, _rows

ROOT = Path(__file__).resolve().parents[1]
XFM_LOSSES = {"loss_itc", "loss_itm", "loss_mlm", "loss_mim", "loss_text_mlm", "loss_image_mim"}


@pytest.fixture(autouse=True)
def _threads(one_thread):  # bit-identical comparisons: one float reduction order
    yield


def _sampled(n, batch, seed, epoch, position):
    sampler = ResumableSampler(n, batch, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)[position * batch:(position + 1) * batch]


def test_each_stream_draws_its_own_epochs_at_the_primarys_global_micro_batch():
    """Primary: 24 rows / 4 = 6 micro-batches an epoch; `short`: 10 rows / 4 = 2 (it wraps 3 times an epoch);
    `long`: 64 rows / 2 = 32 (it runs on across the primary's epochs). At global micro-batch g a stream of n
    micro-batches is in its epoch g // n at micro-batch g % n, in its own seeded order; a resume mid-epoch draws the
    same."""
    cfg = tiny_config(batch_size=4, seed=7, num_workers=0).training("cosine")
    lengths = {"main": 24, "short": 10, "long": 64}
    streams = Streams({name: Rows(n, offset=k) for k, (name, n) in enumerate(lengths.items())}, cfg, None,
                      torch.device("cpu"), batch_sizes={"long": 2})
    assert streams.micro_per_epoch == 6 and streams.position("short", 11) == (5, 1)
    assert streams.position("long", 11) == (0, 11)
    drawn = [batch for epoch in range(3) for batch, _ in streams.batches(epoch, 0)]
    assert len(drawn) == 18
    for g, batch in enumerate(drawn):
        assert batch["main"][0].tolist() == _sampled(24, 4, 7, *divmod(g, 6))  # the primary keeps the config's seed
        assert batch["short"][0].tolist() == _sampled(10, 4, stream_seed(7, "short"), *divmod(g, 2))
        assert batch["long"][0].tolist() == _sampled(64, 2, stream_seed(7, "long"), *divmod(g, 32))
    assert drawn[2]["short"][0].tolist() != drawn[0]["short"][0].tolist()  # a new epoch: a new order
    resumed = [batch for batch, _ in streams.batches(1, 4)] + [batch for batch, _ in streams.batches(2, 0)]
    for a, b in zip(resumed, drawn[10:], strict=True):
        assert all(torch.equal(a[name][1], b[name][1]) for name in lengths)


def test_streams_refuse_names_they_do_not_have():
    cfg = tiny_config(batch_size=4).training("cosine")
    with pytest.raises(ValueError, match=r"\['txt'\].*\['main', 'text'\]"):
        Streams({"main": Rows(8), "text": Rows(8)}, cfg, None, torch.device("cpu"), batch_sizes={"txt": 2})
    with pytest.raises(ValueError, match="training stream 'text': .*smaller than one global batch"):
        Streams({"main": Rows(8), "text": Rows(3)}, cfg, None, torch.device("cpu"))


def test_one_stream_trains_exactly_as_one_dataset(tmp_path):
    """{name: dataset} through Streams gives the parameters and logged losses of the dataset given alone (EpochData,
    the engine's single-dataset path): dropout draws and all."""
    runs = []
    for task_cls in (StreamsTask, OneDatasetTask):
        cfg = tiny_config(batch_size=4, grad_accum_steps=2, max_epoch=2, init_lr=1e-2, warmup_steps=0, log_every=1,
                          num_workers=0, seed=1)
        task = task_cls(cfg, {"main": 24}, dropout=0.3)
        model = task.build_model()
        fit(task, model, task.train_data(model), tmp_path / task_cls.__name__)
        runs.append(model)
    _assert_same_weights(*runs)
    a, b = (_rows(tmp_path / name) for name in ("StreamsTask", "OneDatasetTask"))
    assert [r["loss_main"] for r in a] == [r["loss_main"] for r in b] and len(a) == 6


@pytest.fixture(scope="module")
def xfm_world(tmp_path_factory):
    from data.shapes import generate_shapes_world
    root = tmp_path_factory.mktemp("xfm_world")
    return generate_shapes_world(root, n_train=16, n_val=2, n_test=4, image_size=32, n_shards=0, n_text_only=6,
                                 n_image_only=40)


def _xfm(world, **kw):
    """X-FM tiny on three streams: pairs 16 / 2 = 8 micro-batches an epoch, texts 6 / 2 = 3, images 40 / 2 = 20;
    augmentations on (random crops, flips, RandAugment), ITM negatives drawn from the model's stream."""
    options = {**dict(task="xfm", preset="tiny", batch_size=2, max_epoch=2, init_lr=1e-3, warmup_steps=0, seed=1,
                      num_workers=0), **kw}
    cfg = load_config(None, [f"train_file=[{world['pretrain_clean']}]", f"text_file=[{world['text_only']}]",
                             f"image_file=[{world['image_only']}]", *[f"{k}={v}" for k, v in options.items()]])
    task = XFMTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    return task, model, task.train_data(model)


@pytest.mark.parametrize("workers", [0, 2])
def test_xfm_kill_and_resume_gives_the_same_parameters(tmp_path, xfm_world, workers):
    """grad_accum_steps 2: 4 optimizer steps an epoch; killed after step 5 (epoch 1, micro-batch 2: the text stream
    in its 4th epoch, the image stream mid-way through its first), resumed in a fresh model."""
    task, full, data = _xfm(xfm_world, grad_accum_steps=2, num_workers=workers)
    fit(task, full, data, tmp_path / "full")
    task, part, data = _xfm(xfm_world, grad_accum_steps=2, num_workers=workers, save_every_steps=1)
    fit(task, part, data, tmp_path / "cut", max_steps=5)
    task, resumed, data = _xfm(xfm_world, grad_accum_steps=2, num_workers=workers)
    fit(task, resumed, data, tmp_path / "cut", resume="latest")
    _assert_same_weights(full, resumed)
    assert [r["global_step"] for r in _rows(tmp_path / "cut", "end")] == [8]
    assert XFM_LOSSES <= set(_rows(tmp_path / "cut")[-1])


def test_two_rank_gloo_streams_equal_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = ROOT / "tests" / "_ddp_worker.py"
    launch(worker, "streams", tmp_path / "one", 4, env=env)
    launch(worker, "streams", tmp_path / "two", 2, nproc=2, env=env)
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6), k
    init = StreamsTask(tiny_config(), {"pairs": 1, "text": 1, "images": 1}).build_model().state_dict()
    assert all(not torch.allclose(a[k], init[k]) for k in a)  # every head trained


def _world_args(tmp_path, n_train=32):
    shapes = (f"{{out_dir: {tmp_path / 'world'}, n_train: {n_train}, n_val: 2, n_test: 10, image_size: 32, seed: 0, "
              f"n_text_only: 40, n_image_only: 24}}")
    world = tmp_path / "world"
    return ["--config", ROOT / "configs/shapes_xfm.yaml", "--device", "cpu", "--set", f"shapes={shapes}",
            f"train_file=[{world}/pretrain_clean.json]", f"text_file=[{world}/text_only.json]",
            f"image_file=[{world}/image_only.json]", "max_epoch=1", "log_every=1"]


def _finite_losses(run_dir, expected):
    rows = _rows(run_dir)
    assert rows and all(set(r) >= expected and all(math.isfinite(r[k]) for k in expected) for r in rows)
    assert not any(k.startswith("loss") and k not in expected for r in rows for k in r)


def test_pretrain_xfm_runs_on_the_shapes_world_with_three_streams(tmp_path):
    import blip
    import pretrain_xfm
    out = tmp_path / "run"
    metrics = pretrain_xfm.main([str(a) for a in _world_args(tmp_path)] + [
        "batch_size=8", "batch_size_streams={text: 16, images: 8}", "--output-dir", str(out)])
    _finite_losses(out, XFM_LOSSES)
    (evaluation,) = _rows(out, "eval")
    assert {"txt_r1", "img_r1", "r_mean"} <= set(evaluation) and metrics["r_mean"] == evaluation["r_mean"]
    # the weights reload by the project's rules: their task and XFMConfig ride in the file
    model = blip.load_model(None, out / "model.safetensors")
    assert type(model).__name__ == "XFM" and model.cfg.text_width == 32
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_arm_a_pairs_only_runs_on_two_gloo_ranks(tmp_path):
    """Arm A of the issue: pairs only (ITC, ITM, image-conditioned MLM, MIM); the language MLM head gets no gradient,
    which DDP is told (find_unused_parameters)."""
    out = tmp_path / "run"
    launch(ROOT / "pretrain_xfm.py", *_world_args(tmp_path), "batch_size=4", "text_file=[]", "image_file=[]",
           "--output-dir", out, nproc=2, cwd=ROOT)
    _finite_losses(out, {"loss_itc", "loss_itm", "loss_mlm", "loss_mim"})
    assert [r["global_step"] for r in _rows(out, "end")] == [4]  # 32 pairs / (4 x 2 ranks)
