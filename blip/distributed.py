"""Distributed helpers: torchrun's environment in, no-ops in a single process.

Launch with `torchrun --nproc_per_node=N script.py`; without RANK/WORLD_SIZE in the environment
everything runs as one plain process and every collective below returns its input.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> tuple[int, int, int, torch.device]:
    """-> (rank, local_rank, world_size, device). NCCL on CUDA, gloo on CPU.

    device: 'cpu', 'cuda' or None (CUDA when available). Under torchrun each process takes the
    GPU of its LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = torch.device(device or ("cuda" if use_cuda else "cpu"))
        if dev.type == "cuda":
            if dev.index is None:  # set_device needs an index: 'cuda' means the current GPU
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return 0, 0, 1, dev
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank, local_rank, world_size, dev


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    # torch.distributed.nn.functional.all_gather does this too but is deprecated (warns per call).
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on this slice
        return grad.chunk(get_world_size(), dim=0)[get_rank()]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) from every rank along dim 0, with gradient.

    The backward hands each rank the sum over ranks of the gradients at its own slice (as the
    original's GatherLayer), so a loss over the gathered batch trains every rank's features.
    """
    if get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) from every rank along dim 0, no gradient."""
    if get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks of a tensor (a new float tensor) or a number (a float), e.g. a logged loss."""
    if get_world_size() == 1:
        return x
    is_number = not isinstance(x, torch.Tensor)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(x), device=dev) if is_number else x.detach().float().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= get_world_size()
    return t.item() if is_number else t


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order (e.g. caption results to score on rank 0)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
