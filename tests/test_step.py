"""The training step at GPU speed, checked on the CPU: batches are typed tensors made in the DataLoader workers, a
step reads nothing back to the host (the queue pointer, hard negatives, LM targets, finiteness all stay on the
device), and `compile: true` gives eager's losses."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from blip.training import engine
from blip.data.batches import CaptionBatch, ClassBatch, PairBatch, VQABatch
from blip.training.engine import fit
from blip.tasks import CaptionTask, NLVRTask, PretrainTask, RetrievalTask, VETask, VQATask
from tests._device_trap import HostSyncError, HostSyncTrap
from tests._tiny import PairData, tiny_config, tiny_model
from tests.conftest import launch

ROOT = Path(__file__).resolve().parents[1]


class VQAData(torch.utils.data.Dataset):
    """Random images with a question and one or two weighted answers (VQADataset's training samples)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        image, text = PairData(16)[i]
        answers = ["red", "two"] if i % 2 else ["a blue square"]
        return image, "what is it " + text, answers, [0.5, 0.5] if i % 2 else [1.0]


TASKS = {  # task, its data, extra config
    "pretrain": (PretrainTask, lambda: PairData(16), ["hard_negatives={captions: 2, tagger: shapes}"]),
    "retrieval": (RetrievalTask, lambda: PairData(16, "retrieval"), ["hard_negatives={captions: 2}"]),
    "caption": (CaptionTask, lambda: PairData(16), []),
    "vqa": (VQATask, VQAData, []),
    "nlvr": (NLVRTask, lambda: PairData(16, "nlvr"), []),
    "ve": (VETask, lambda: [(*PairData(16)[i], i % 3) for i in range(16)], []),
}


def _task(name, *overrides, **kw):
    task_cls, data, extra = TASKS[name]
    cfg = tiny_config(*extra, *overrides, **{**dict(task=name, batch_size=4, max_epoch=1, queue_size=8, init_lr=1e-3,
                                                    warmup_steps=0, num_workers=0, seed=1, log_every=100), **kw})
    return task_cls(cfg), tiny_model(task_cls, cfg), data()


@pytest.mark.parametrize("name", list(TASKS))
def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, name):
    """Every optimizer step of a run (2 micro-batches each, 2 data workers) under the host-sync trap: the losses, the
    backward, clipping and AdamW ask the device for no value. (Logging, checkpoints and evaluation read on purpose,
    between steps.)"""
    task, model, data = _task(name, grad_accum_steps=2, num_workers=2, grad_clip=1.0)
    steps = []

    def guarded(run, batches, progress):
        with HostSyncTrap():
            out = train_step(run, batches, progress)
        steps.append(progress.step)
        return out

    train_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", guarded)
    fit(task, model, data, tmp_path)
    assert steps == [0, 1]


def test_the_trap_names_a_host_read_in_a_step(tmp_path, monkeypatch):
    """What the trap catches: the queue pointer read as a Python int, as the step did before (`int(ptr_buf)`)."""
    task, model, data = _task("pretrain")
    enqueue = type(model).enqueue

    def old_enqueue(self, image_feat, text_feat, idx=None):
        int(self.queue_ptr)
        return enqueue(self, image_feat, text_feat, idx)

    batch = task.collate(model)([data[i] for i in range(4)], list(range(4)))  # host-side: made before the step
    with HostSyncTrap():
        task.losses(model, batch, engine.Progress(0, 0, 1))
    monkeypatch.setattr(type(model), "enqueue", old_enqueue)
    with pytest.raises(HostSyncError, match=r"__int__ reads tensor values back to the host at tests/test_step.py:\d+ "
                                            r"in old_enqueue"):
        with HostSyncTrap():
            task.losses(model, batch, engine.Progress(0, 0, 1))


@pytest.mark.parametrize("name, kind", [("pretrain", PairBatch), ("retrieval", PairBatch), ("caption", CaptionBatch),
                                        ("vqa", VQABatch), ("nlvr", ClassBatch), ("ve", ClassBatch)])
def test_batches_are_typed_tensors_and_static_when_compiled(name, kind):
    """The collate makes the model's batch: texts tokenized (padded to the longest, or to the model's maximum when
    static), LM targets listed; the training path through it gives the string API's losses."""
    task, model, data = _task(name)
    samples = [data[i] for i in range(4)]
    batch = task.collate(model)(samples, list(range(4))) if name in ("pretrain", "retrieval") else \
        task.collate(model)(samples)
    assert isinstance(batch, kind)
    fields = {k: v for k, v in vars(batch).items() if v is not None}
    assert all(isinstance(v, torch.Tensor) for v in fields.values())
    static_task, _, _ = _task(name, compile=True)
    static = static_task.collate(model)(samples, list(range(4))) if name in ("pretrain", "retrieval") else \
        static_task.collate(model)(samples)
    ids = {"vqa": "q_ids"}.get(name, "ids")
    width = {"pretrain": 30, "retrieval": 35, "caption": 40, "vqa": 35, "nlvr": 64, "ve": 35}[name]
    assert getattr(static, ids).shape[1] == width and getattr(batch, ids).shape[1] < width
    if name in ("pretrain", "caption", "vqa"):  # every position listed, the ignored ones at -100
        assert static.lm_positions.numel() > batch.lm_positions.numel()
    model.train()
    for b in (batch, static):
        torch.manual_seed(0)
        losses = task.losses(copy.deepcopy(model), b, engine.Progress(0, 0, 1))  # (a fresh queue each time)
        if b is batch:
            first = {k: v.item() for k, v in losses.items()}
        else:
            for k, v in losses.items():
                assert v.item() == pytest.approx(first[k], rel=1e-4, abs=1e-5), k


@pytest.mark.no_device_trap  # dynamo traces the model, not the tests' trap around it
def test_compiled_training_gives_the_eager_losses_and_weights(tmp_path, one_thread):
    """`compile: true` (static batches, the forward and backward compiled) logs the losses of the plain eager run and
    ends with its weights, within float tolerance (inductor drawing with eager's random ops); accumulation 2, the
    alpha ramp changing every step (one recompile, then none)."""
    import torch._inductor.config as inductor
    runs = {}
    with inductor.patch(fallback_random=True):
        for compiled in (False, True):
            task, model, data = _task("pretrain", "hard_negatives=null", grad_accum_steps=2, log_every=1,
                                      max_epoch=2, compile=compiled)
            fit(task, model, data, tmp_path / str(compiled))
            runs[compiled] = model
    train = {m: [r for r in map(json.loads, (tmp_path / str(m) / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "train"] for m in runs}
    assert len(train[False]) == len(train[True]) == 4
    for a, b in zip(train[False], train[True]):
        for k in ("loss_ita", "loss_itm", "loss_lm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a, b)
    for (name, a), b in zip(runs[False].state_dict().items(), runs[True].state_dict().values()):
        # key biases get ~0 gradient (softmax ignores them) and Adam turns float noise into steps of up to lr (1e-3)
        symmetric = name.endswith(("key.bias", "qkv.bias"))
        assert torch.allclose(a, b, rtol=1e-3, atol=5e-3 if symmetric else 1e-4), (name, (a - b).abs().max())


def test_compiled_ddp_on_two_gloo_ranks_equals_one_eager_process(tmp_path):
    """torch.compile over DDP (its graph split at the gradient buckets): 2 ranks of batch 4, compiled, end with the
    weights of one eager process with the global batch of 8."""
    worker, env = ROOT / "tests" / "_ddp_worker.py", {**os.environ, "PYTHONPATH": str(ROOT)}
    launch(worker, "nlvr", tmp_path / "one", 8, env=env)
    launch(worker, "nlvr", tmp_path / "two", 4, "compile", nproc=2, env=env, trap=False)
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for k in a:  # key biases: ~0 gradient that Adam turns into steps of up to lr (as in test_engine)
        assert torch.allclose(a[k], b[k], atol=1e-4 if k.endswith("key.bias") else 2e-6), (k, (a[k] - b[k]).abs().max())


def test_activation_checkpointing_of_both_towers_gives_the_same_gradients():
    """`vit_grad_ckpt` (+ `vit_ckpt_layer`) and `text_grad_ckpt` trade compute for memory, nothing else: the same
    losses and gradients as without (dropout off: the recomputed forward draws nothing)."""
    grads = []
    for ckpt in (False, True):
        task, model, data = _task("pretrain", "hard_negatives=null", vit_grad_ckpt=ckpt, vit_ckpt_layer=1,
                                  text_grad_ckpt=ckpt)
        assert model.text_encoder.encoder.gradient_checkpointing == ckpt
        model.train()
        torch.manual_seed(0)
        losses = task.losses(model, task.collate(model)([data[i] for i in range(4)], list(range(4))),
                             engine.Progress(0, 0, 1))
        sum(losses.values()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
