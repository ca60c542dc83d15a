import json
import textwrap

import torch

from blip import distributed as d
from tests.conftest import launch


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert d.init_distributed("cpu") == (0, 0, 1, torch.device("cpu"))
    assert (d.get_rank(), d.get_world_size(), d.is_main(), d.is_dist()) == (0, 1, True, False)
    x = torch.randn(3, 2, requires_grad=True)
    assert d.all_gather_with_grad(x) is x and d.all_gather_no_grad(x) is x
    assert d.all_reduce_mean(2.5) == 2.5 and d.all_gather_object({"a": 1}) == [{"a": 1}]
    d.barrier()
    d.cleanup()


WORKER = textwrap.dedent("""
    import importlib.util, json, sys, torch
    # Load the module by path: importing the `blip` package would pull in the models (2 s a rank).
    spec = importlib.util.spec_from_file_location("blip_distributed", sys.argv[2])
    d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d)

    rank, local_rank, world, dev = d.init_distributed("cpu")
    # rank r holds 2 rows [[r, 10r], [r + .5, 10r + 5]]
    x = torch.tensor([[rank, 10.0 * rank], [rank + 0.5, 10.0 * rank + 5]], requires_grad=True)
    g = d.all_gather_with_grad(x)
    w = torch.arange(8.0).reshape(4, 2) * (rank + 1)  # a different loss on every rank
    (g * w).sum().backward()
    out = dict(rank=rank, local_rank=local_rank, world=world, main=d.is_main(), gathered=g.tolist(),
               grad=x.grad.tolist(), no_grad=d.all_gather_no_grad(x).tolist(),
               no_grad_requires=d.all_gather_no_grad(x).requires_grad,
               mean_float=d.all_reduce_mean(float(rank)), mean_tensor=d.all_reduce_mean(x.detach()).tolist(),
               objects=d.all_gather_object(f"r{rank}"))
    d.barrier()
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
    d.cleanup()
""")


def test_two_gloo_ranks_gather_with_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch(script, tmp_path, d.__file__, nproc=2, timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    rows = [[0.0, 0.0], [0.5, 5.0], [1.0, 10.0], [1.5, 15.0]]
    for r, out in enumerate((r0, r1)):
        assert (out["rank"], out["local_rank"], out["world"], out["main"]) == (r, r, 2, r == 0)
        assert out["gathered"] == rows and out["no_grad"] == rows and not out["no_grad_requires"]
        assert out["mean_float"] == 0.5 and out["objects"] == ["r0", "r1"]
        assert out["mean_tensor"] == [[0.5, 5.0], [1.0, 10.0]]
        # d(sum of both ranks' losses)/dx_r = (1 + 2) * w_base[rows of rank r]
        base = torch.arange(8.0).reshape(4, 2)[2 * r: 2 * r + 2] * 3
        assert out["grad"] == base.tolist()
