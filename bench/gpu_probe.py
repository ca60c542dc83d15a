"""In-process checks of the training engine and decoding on one device, for bench/gpu_check.sh (`--device cpu` runs
the same checks on the CPU). Each check prints one line, `check NAME: ok (what was seen)` or `check NAME: FAIL
(why)`; the exit status is 1 when any failed.

    python bench/gpu_probe.py --device cuda

- autocast_<precision>: a training step through blip.training.engine.fit; inside the model's forward autocast is on with the
  configured dtype (off in fp32) and a text-stack Linear computes in it; fp16 (only) steps through a GradScaler.
- bf16_losses_near_fp32: the same batch and weights: bf16 losses differ from fp32 (autocast is applied) by less
  than bf16 allows (it is the same computation).
- nonfinite_caught: a NaN loss stops training with FloatingPointError, naming the step.
- no_host_sync_in_steps (CUDA): a training step of every task under torch.cuda.set_sync_debug_mode("error").
- beam_search_on_device: beam search, greedy and sampling run on the device; beam tokens are compared with the CPU's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import blip  # noqa: E402
from blip.training.config import load_config  # noqa: E402
from blip.precision import autocast  # noqa: E402
from blip.training.engine import Progress, fit  # noqa: E402
from blip.tasks import PretrainTask  # noqa: E402

TEXTS = ["a red circle", "two blue squares", "a green triangle on the left", "three yellow crosses"]


class Pairs(Dataset):
    def __init__(self, n=8):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), TEXTS[i % len(TEXTS)]


def pretraining(precision, **overrides):
    sets = dict(task="pretrain", preset="micro", batch_size=4, max_epoch=1, queue_size=8, init_lr=1e-3, warmup_steps=0,
                num_workers=0, seed=1, precision=precision, log_every=1, **overrides)
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    task = PretrainTask(cfg)
    return task, task.build_model()


def check_autocast(device, precision):
    task, model = pretraining(precision)
    seen = []
    model.text_encoder.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_autocast_enabled(device.type),
                                       torch.get_autocast_dtype(device.type), out.dtype)))
    scalers = []
    with tempfile.TemporaryDirectory() as out:
        from blip.training import engine
        setup = engine.setup

        def spy(*a, **k):
            run = setup(*a, **k)
            scalers.append(run.scaler)
            return run

        engine.setup = spy
        try:
            fit(task, model.to(device), Pairs(), out, max_steps=1, device=device)
        finally:
            engine.setup = setup
    want = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled, dtype, out_dtype = seen[0]
    assert enabled == (want is not None), f"autocast enabled={enabled} in the forward"
    assert out_dtype == (want or torch.float32), f"Linear computed in {out_dtype}"
    assert want is None or dtype == want, f"autocast dtype {dtype}"
    assert (scalers[0] is not None) == (precision == "fp16"), f"GradScaler: {scalers[0]}"
    return f"autocast {'on, ' + str(dtype) if enabled else 'off'}, Linear out {out_dtype}, scaler {scalers[0] is not None}"


def check_bf16_losses(device):
    losses = {}
    for precision in ("fp32", "bf16"):
        task, model = pretraining(precision, **{"med_config.hidden_dropout_prob": 0.0,
                                                "med_config.attention_probs_dropout_prob": 0.0})
        model = model.to(device).train()
        data = Pairs(4)
        batch = task.collate(model)([data[i] for i in range(4)], list(range(4))).to(device)
        torch.manual_seed(5)
        with autocast(device, precision):
            out = task.losses(model, batch, Progress(0, 0, 1))
        losses[precision] = {k: v.item() for k, v in out.items()}
    for k, v in losses["fp32"].items():
        b = losses["bf16"][k]
        assert b != v, f"{k}: bf16 {b} == fp32 {v}: autocast did not change the computation"
        assert abs(b - v) <= 2e-2 * max(1.0, abs(v)), f"{k}: bf16 {b} vs fp32 {v}"
    return "; ".join(f"{k} fp32 {v:.5f} bf16 {losses['bf16'][k]:.5f}" for k, v in losses["fp32"].items())


def check_nonfinite(device):
    task, model = pretraining("bf16")
    losses = task.losses

    def poisoned(forward, batch, progress):
        out = losses(forward, batch, progress)
        out["loss_lm"] = out["loss_lm"] * float("nan")
        return out

    task.losses = poisoned
    with tempfile.TemporaryDirectory() as out:
        try:
            fit(task, model.to(device), Pairs(), out, device=device)
        except FloatingPointError as e:
            return str(e).split(";")[0]
    raise AssertionError("a NaN loss did not stop training")


def samples_of(name, n=4):
    """A few synthetic training samples in the shape each task's dataset gives them."""
    images = [Pairs(n)[i][0] for i in range(n)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    return {"pretrain": list(zip(images, texts)),
            "retrieval": [(x, t, i // 2) for i, (x, t) in enumerate(zip(images, texts))],
            "caption": list(zip(images, texts, range(n))),
            "vqa": [(x, "what is it", ["red", "two"], [0.5, 0.5]) for x in images],
            "nlvr": [(x, x.flip(-1), t, i % 2) for i, (x, t) in enumerate(zip(images, texts))],
            "ve": [(x, t, i % 3) for i, (x, t) in enumerate(zip(images, texts))]}[name]


def check_no_host_sync(device):
    """One training step of every task (typed batch on the device, accumulation 2) under
    torch.cuda.set_sync_debug_mode("error"): a host sync anywhere in it raises."""
    import itertools
    from blip.training import engine
    from blip import tasks
    done = []
    for name, cls in (("pretrain", tasks.PretrainTask), ("retrieval", tasks.RetrievalTask),
                      ("caption", tasks.CaptionTask), ("vqa", tasks.VQATask), ("nlvr", tasks.NLVRTask),
                      ("ve", tasks.VETask)):
        extra = ["hard_negatives={captions: 2, tagger: shapes}"] if name in ("pretrain", "retrieval") else []
        cfg = load_config(None, [f"task={name}", "preset=micro", "batch_size=4", "queue_size=8", "grad_accum_steps=2",
                                 "precision=bf16", "grad_clip=1.0", "num_workers=0", *extra])
        task = cls(cfg)
        model = task.build_model()
        data = samples_of(name)
        with tempfile.TemporaryDirectory() as out:
            run = engine.setup(task, model, data, out, device=device)
            collate = task.collate(model)
            batch = (collate(data, list(range(4))) if getattr(collate, "seeded", False) else collate(data)).to(device)
            step = lambda: engine.train_step(run, itertools.repeat((batch, [])), engine.Progress(1, 0, 10))  # noqa
            step()  # warm-up: allocations, first-call checks
            if device.type != "cuda":
                step()
            else:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
        done.append(name)
    if device.type != "cuda":  # tests/test_step.py checks these steps on the CPU with its host-sync trap
        return "steps ran; the sync check itself is CUDA's: " + ", ".join(done)
    return "no host sync in a step of " + ", ".join(done)


def check_decoding(device):
    torch.manual_seed(0)
    model = blip.load_model("caption", preset="micro")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=3, max_length=12, min_length=3, return_ids=True)
    cpu = model.generate(x, **kw)
    on = model.to(device).generate(x.to(device), **kw)
    model.generate(x.to(device), num_beams=1, max_length=8)
    model.generate(x.to(device), sample=True, num_captions=2, max_length=8,
                   generator=torch.Generator(device).manual_seed(0))
    same = sum(a == b for a, b in zip(cpu, on))
    return f"beam/greedy/sampling ran; beam tokens identical to the CPU's for {same}/{len(cpu)} images"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    checks = {f"autocast_{prec}": (lambda prec=prec: check_autocast(device, prec)) for prec in ("fp32", "bf16", "fp16")}
    checks.update(bf16_losses_near_fp32=lambda: check_bf16_losses(device),
                  nonfinite_caught=lambda: check_nonfinite(device),
                  no_host_sync_in_steps=lambda: check_no_host_sync(device),
                  beam_search_on_device=lambda: check_decoding(device))
    failed = 0
    for name, fn in checks.items():
        try:
            print(f"check {name}: ok ({fn()})", flush=True)
        except Exception as e:  # every check reports, whatever the others do
            failed += 1
            traceback.print_exc()
            print(f"check {name}: FAIL ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
