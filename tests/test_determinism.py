"""The `deterministic` option: two runs at 2 CPU threads, and a run killed and resumed, end with bit-identical
weights. The kernel it fixes (see blip/training/determinism.py) is the ITM negatives' indexing backward, parallel with
atomic adds from 32,768 elements on: the tiny preset's image tokens at batch 16 are past that."""
import pytest
import torch

from blip.training.determinism import enable_deterministic
from blip.training.engine import fit
from blip.tasks import PretrainTask
from tests._tiny import PairData, tiny_config, tiny_model


@pytest.fixture
def deterministic_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    enable_deterministic("cpu")
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.set_num_threads(threads)


def _run(out, **kw):
    cfg = tiny_config("preset=tiny", task="pretrain", batch_size=16, max_epoch=2, queue_size=64, init_lr=5e-4,
                      warmup_steps=0, num_workers=0, seed=3, save_every_steps=1, deterministic=True)
    model = tiny_model(PretrainTask, cfg)
    fit(PretrainTask(cfg), model, PairData(48), out, **kw)  # 3 steps per epoch
    return model.state_dict()


def test_two_runs_and_a_resumed_run_are_bit_identical_at_two_threads(tmp_path, deterministic_two_threads):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    _run(tmp_path / "c", max_steps=4)  # killed in epoch 1
    c = _run(tmp_path / "c", resume="latest")
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k
