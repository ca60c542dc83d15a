"""Several data streams in one optimizer step (blip.data.samplers.Streams): the positions each stream draws, 2 gloo
ranks = one process with the global batch, one stream = one dataset."""
import os
from pathlib import Path

import pytest
import torch

from blip.data.samplers import ResumableSampler, Streams, stream_seed
from blip.training.engine import fit
from tests._tiny import OneDatasetTask, Rows, StreamsTask, tiny_config
from tests.conftest import launch
from tests.test_engine import _assert_same_weights, _rows

ROOT = Path(__file__).resolve().parents[1]


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
