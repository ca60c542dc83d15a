"""The `deterministic` option: bit-identical weights from two runs with one seed, and from a run killed and
resumed, at a fixed thread count (CPU) or on one GPU with torch's deterministic algorithms (CUDA).

Call `enable_deterministic(device)` at process start, before the model is built and before any CUDA work.

What it fixes (measured at 2 CPU threads, torch 2.14.1, MKL 2024.2, oneDNN 3.12, AVX512): the only
nondeterministic kernel in pretraining is the backward of advanced indexing with repeated indices,
`image_embeds[neg_image_for_text]` (the ITM hard negatives): autograd's `index_put_(accumulate=True)`,
which on CPU, for float tensors of >= 32768 elements and more than one thread, adds rows with atomic adds
in parallel, so duplicated rows sum in thread-arrival order (4.8e-07 between repeats of that op alone,
in-process and across processes; ~1e-12 on the image-token gradient; 1e-5..2e-4 on weights after tens of
steps). Measured deterministic as they are: SDPA (CPU flash kernel) forward/backward with and without masks
and dropout, Linear/matmul (MKL), conv patch embedding and LayerNorm (oneDNN/ATen), embedding backward,
index_add_, cross_entropy with label smoothing, fused and foreach AdamW, torch._foreach_*, multinomial. No
MKL_CBWR / OMP environment variable and no SDPA backend choice is needed, so there is no kernel context
manager: the global flag below is the whole fix on CPU.
"""
from __future__ import annotations

import os

import torch


def enable_deterministic(device: torch.device | str | None = None) -> None:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        # cuBLAS reads its workspace configuration when CUDA first creates a handle: setting it afterwards
        # does nothing, so refuse rather than silently stay nondeterministic.
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            if torch.cuda.is_initialized():
                raise RuntimeError("enable_deterministic must run before CUDA is initialised (or set "
                                   "CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment)")
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.backends.cudnn.benchmark = False  # the same convolution algorithm every run
        torch.backends.cudnn.deterministic = True
    # CPU: index_put_(accumulate=True) (indexing backward) runs serially. CUDA: sorted index_put_/index_add_,
    # deterministic flash / memory-efficient SDPA backward, no cuDNN SDPA; raises on an op that has no
    # deterministic implementation. warn_only would keep the nondeterministic SDPA backward on CUDA.
    torch.use_deterministic_algorithms(True)
    # With the flag on, torch.empty() also fills new memory with NaN by default; nothing here reads
    # uninitialised memory, and the fill is pure cost.
    torch.utils.deterministic.fill_uninitialized_memory = False
