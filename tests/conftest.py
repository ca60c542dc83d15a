import os
from pathlib import Path

import pytest
import torch

from tests._device_trap import ImplicitDeviceTrap

TRAP_SITE = str(Path(__file__).parent / "_trap_site")


@pytest.fixture(scope="session", autouse=True)
def device_trap():
    """Every test runs under the implicit-device trap (tests/_device_trap.py): a tensor made by blip's code without
    `device=` fails the test, as it would crash on a GPU. Tests marked `no_device_trap` run without it."""
    with ImplicitDeviceTrap():
        yield


@pytest.fixture(autouse=True)
def _no_device_trap(request, device_trap):
    if request.node.get_closest_marker("no_device_trap") is None:
        yield
        return
    mode = torch.overrides._pop_mode()  # the session's trap, at the top of the mode stack
    try:
        yield
    finally:
        torch.overrides._push_mode(mode)


def trap_env(env=None) -> dict:
    """`env` (default: this process's) for a child Python process that runs under the trap too."""
    env = dict(os.environ if env is None else env, BLIP_DEVICE_TRAP="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TRAP_SITE, env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def one_thread():
    """Tiny models gain little from a second thread, and on a shared 2-core machine two spinning OpenMP threads
    per process slow a run tenfold; one thread also pins float reduction order for measured margins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch(script, *args, nproc=1, cwd=None, timeout=300, env=None, trap=True):
    """Run `script args` as one plain process (nproc=1) or under `torchrun --standalone` with nproc CPU ranks,
    one OpenMP thread each and no inherited torchrun variables, under the implicit-device trap unless `trap` is
    False (torch.compile traces the model, not the trap). Asserts success; returns the CompletedProcess."""
    import subprocess
    import sys
    env = dict(trap_env(env) if trap else (os.environ if env is None else env), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    runner = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([sys.executable, *runner, str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def shapes_main_job(tmp_path_factory):
    """The README's main job (configs/shapes_main.yaml: a tiny BLIP pretrained from scratch on a 400-image shapes
    world), run once per session at one thread and shared by the tests that need a trained model.
    Returns (held-out metrics, run directory, world directory)."""
    import pretrain
    tmp = tmp_path_factory.mktemp("shapes_main")
    world = tmp / "world"
    shapes = "{out_dir: %s, n_train: 400, n_val: 10, n_test: 50, image_size: 32, seed: 0}" % world  # as the config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = pretrain.main(["--config", "configs/shapes_main.yaml", "--output-dir", str(tmp / "run"), "--set",
                                 "shapes=" + shapes, f"train_file=[{world}/pretrain_clean.json]"])
    finally:
        torch.set_num_threads(threads)
    return metrics, tmp / "run", world
