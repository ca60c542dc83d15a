"""Fault runs: a 2-rank gloo pretraining run killed with SIGKILL mid-epoch and resumed ends with the weights of the
uninterrupted run; a damaged latest checkpoint is named, and the one before it resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip.training.engine import fit
from blip.tasks import PretrainTask
from tests._tiny import PairData, tiny_config, tiny_model
from tests.conftest import launch, trap_env

ROOT = Path(__file__).resolve().parents[1]


def _pretrain_args(world, out):
    shapes = f"{{out_dir: {world}, n_train: 128, n_val: 4, n_test: 8, image_size: 32, seed: 0}}"
    return [ROOT / "pretrain.py", "--config", ROOT / "configs/shapes_main.yaml", "--device", "cpu",
            "--output-dir", out, "--set", "preset=micro", f"shapes={shapes}", f"train_file=[{world}/pretrain.json]",
            "batch_size=4", "queue_size=16", "max_epoch=3", "save_every_steps=1", "log_every=1", "k_test=4",
            "seed=5", "deterministic=true"]


def _global_step(out):
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return max((r["step"] for r in rows if r["event"] == "train"), default=0)


def test_sigkill_of_a_two_rank_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    world = tmp_path / "world"
    full, killed = tmp_path / "full", tmp_path / "killed"
    launch(*_pretrain_args(world, full), nproc=2, cwd=ROOT, timeout=300)  # 16 steps per epoch, 3 epochs

    env = dict(trap_env(), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *map(str, _pretrain_args(world, killed))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while _global_step(killed) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, mid epoch 1
    proc.wait()
    state = torch.load(killed / "checkpoint_latest.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and 0 < state["progress"]["step"] < 16, state["progress"]

    launch(*_pretrain_args(world, killed), "--resume", "latest", nproc=2, cwd=ROOT, timeout=300)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical (deterministic option, one thread per rank)


def test_a_truncated_latest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path):
    def run(out, **kw):
        cfg = tiny_config(task="pretrain", batch_size=4, max_epoch=1, queue_size=8, num_workers=0, seed=1,
                          save_every_steps=1)
        model = tiny_model(PretrainTask, cfg)
        fit(PretrainTask(cfg), model, PairData(16), out, **kw)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=3)
    latest = tmp_path / "cut" / "checkpoint_latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a disk that filled up
    with pytest.raises(RuntimeError, match=r"cannot read checkpoint .*checkpoint_latest\.pt.*checkpoint_previous\.pt"):
        run(tmp_path / "cut", resume="latest")
    resumed = run(tmp_path / "cut", resume=tmp_path / "cut" / "checkpoint_previous.pt")  # step 2 of 4
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
