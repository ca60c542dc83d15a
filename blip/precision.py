"""The one precision switch of training, evaluation and inference: a context for the computation that follows.

    fp32   nothing changes (the original's arithmetic)
    bf16   torch.autocast(<device>, bfloat16): matrix products and attention in bfloat16, the rest in fp32
    fp16   torch.autocast(<device>, float16) (training adds a GradScaler: blip.training.engine)
    tf32   fp32 tensors, matrix products on TensorFloat-32 units (CUDA's; elsewhere the same as fp32)
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "tf32")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device, precision: str = "fp32"):
    """The context that runs what follows on `device` (a torch.device or its type) in `precision`."""
    if check(precision) in _AUTOCAST:
        return torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST[precision])
    if precision == "tf32":
        return _tf32()
    return nullcontext()


@contextmanager
def _tf32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
