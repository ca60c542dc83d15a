"""Device correctness without a GPU: the implicit-device trap that every test runs under (tests/_device_trap.py)
catches the mask the first GPU run crashed on, `init_distributed` gives `set_device` the index it needs, and what
`precision` does in training (autocast dtype inside the forward, losses near fp32, a GradScaler for fp16 only)."""
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import blip
import blip.models.med
from blip import distributed as dist
from blip.precision import autocast
from blip.training.engine import Progress, fit, setup
from blip.tasks import PretrainTask
from tests._device_trap import ImplicitDeviceError, ImplicitDeviceTrap
from tests._tiny import PairData, tiny_config, tiny_model
from tests.conftest import trap_env

ROOT = Path(__file__).resolve().parents[1]



def with_the_first_gpu_runs_mask():
    """blip/models/med.py's additive_mask with the line the first GPU run crashed on put back (the causal mask made with
    device=None when there is no padding mask), compiled as standing at its place in blip/models/med.py."""
    lines, first = inspect.getsourcelines(blip.models.med.additive_mask)
    src = "".join(lines)
    old = src.replace("dtype=torch.bool, device=device)", "dtype=torch.bool, device=None if mask is None else mask.device)")
    assert old != src
    scope = dict(vars(blip.models.med))
    exec(compile("\n" * (first - 1) + old, blip.models.med.__file__, "exec"), scope)
    return scope["additive_mask"]


def test_the_trap_is_on_in_every_test_and_in_the_processes_tests_launch():
    assert any(isinstance(m, ImplicitDeviceTrap) for m in _get_current_function_mode_stack())
    probe = ("from torch.overrides import _get_current_function_mode_stack as s; "
             "print(type(s()[-1]).__name__ if s() else None)")
    out = subprocess.run([sys.executable, "-c", probe], env=trap_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ImplicitDeviceTrap"


def test_the_trap_catches_the_causal_mask_of_the_first_gpu_run_when_it_is_put_back(monkeypatch):
    """Every beam search crashed on CUDA (`attn_bias is on cpu`): with that line restored in blip/models/med.py, a CPU
    beam search under the trap fails naming it; with today's line it runs."""
    torch.manual_seed(0)
    model = blip.load_model("caption", preset="micro")
    x = torch.randn(2, 3, 32, 32)
    good = model.generate(x, num_beams=2, max_length=6, min_length=2, return_ids=True)
    monkeypatch.setattr(blip.models.med, "additive_mask", with_the_first_gpu_runs_mask())
    with pytest.raises(ImplicitDeviceError, match=r"torch.ones without device= at blip/models/med.py:\d+ in additive_mask"):
        model.generate(x, num_beams=2, max_length=6, min_length=2)
    monkeypatch.undo()
    assert model.generate(x, num_beams=2, max_length=6, min_length=2, return_ids=True) == good


def test_the_trap_names_file_and_line_and_exempts_module_construction_and_host_side_values():
    src = textwrap.dedent('''
        def make_on_default():
            return torch.arange(3)
        def make_on(device):
            return torch.arange(3, device=device)
        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("b", torch.zeros(2))  # built on the default device, moved with the module
    ''')
    scope = {"torch": torch}
    exec(compile(src, str(ROOT / "blip" / "somewhere.py"), "exec"), scope)
    with ImplicitDeviceTrap():
        with pytest.raises(ImplicitDeviceError, match=r"torch.arange without device= at blip/somewhere.py:3"):
            scope["make_on_default"]()
        assert scope["make_on"]("cpu").tolist() == [0, 1, 2]
        assert scope["Head"]().b.shape == (2,)
        torch.arange(3)  # not the project's code (this test): not judged


class _FakeCuda:
    """CUDA as a CPU-only machine can fake it: `set_device` is torch's own (its index check is the one that failed on
    the H200), only the driver call below it is recorded."""

    def __init__(self, monkeypatch):
        self.selected = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch._C, "_cuda_setDevice", self.selected.append, raising=False)


@pytest.mark.parametrize("asked, index", [("cuda", 0), (None, 0), ("cuda:1", 1)])
def test_a_single_process_on_cuda_selects_an_indexed_device(monkeypatch, asked, index):
    """`--device cuda` (and the default, CUDA when available) used to die in torch.cuda.set_device: 'Expected a
    torch.device with a specified index or an integer, but got:cuda'."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cuda = _FakeCuda(monkeypatch)
    with pytest.raises(ValueError, match="specified index"):  # torch's own check, as on the H200
        torch.cuda.set_device(torch.device("cuda"))
    rank, local, world, device = dist.init_distributed(asked)
    assert (rank, local, world) == (0, 0, 1) and device == torch.device("cuda", index)
    assert cuda.selected == [index]


def test_cuda_asked_on_a_machine_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        dist.init_distributed("cuda")


# -- precision in training ------------------------------------------------------------------------------------------
def _pretrain(precision, **kw):
    cfg = tiny_config(task="pretrain", batch_size=4, max_epoch=1, queue_size=8, init_lr=1e-3, warmup_steps=0,
                      num_workers=0, seed=1, precision=precision, log_every=1, **kw)
    return PretrainTask(cfg), tiny_model(PretrainTask, cfg)


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_training_forward_runs_under_the_configured_autocast(tmp_path, precision, dtype):
    """What the engine's forward sees: autocast on with the configured dtype (off in fp32), matrix products in it;
    fp16 (and only fp16) steps through a GradScaler."""
    task, model = _pretrain(precision)
    seen = []

    def record(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))

    model.text_encoder.encoder.layer[0].intermediate.dense.register_forward_hook(record)
    run = setup(task, model, PairData(8), tmp_path)
    assert (run.scaler is not None) == (precision == "fp16")
    fit(task, model, PairData(8), tmp_path, max_steps=1)
    assert seen
    for enabled, autocast_dtype, out_dtype in seen:
        assert enabled == (dtype is not None)
        assert out_dtype == (dtype or torch.float32)
        if dtype is not None:
            assert autocast_dtype == dtype


def test_bf16_losses_differ_from_fp32_within_bf16_tolerance():
    """The same batch, weights and random draws: bf16 autocast changes the losses (it is applied), by less than
    bf16's resolution allows for (it is the same computation)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        task, model = _pretrain(precision, **{"med_config.hidden_dropout_prob": 0.0,
                                              "med_config.attention_probs_dropout_prob": 0.0})
        batch = task.collate(model)([PairData(4)[i] for i in range(4)], list(range(4)))
        torch.manual_seed(5)
        with autocast(torch.device("cpu"), precision):
            out = task.losses(model, batch, Progress(epoch=0, step=0, steps_per_epoch=1))
        losses[precision] = {k: v.item() for k, v in out.items()}
    for k, v in losses["fp32"].items():
        assert losses["bf16"][k] != v, k
        assert losses["bf16"][k] == pytest.approx(v, rel=2e-2, abs=2e-2), (k, losses)

