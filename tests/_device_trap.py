"""A CPU-side guard against tensors made on the default device by the project's own code.

On a GPU, a tensor made without `device=` lands on the CPU while the data it meets is on the GPU: the first run on
an H200 crashed that way (a causal mask from `torch.ones(..., device=None)` in `blip/models/med.py`). A CPU machine cannot
see the mistake, because there the default device IS the data's device. This trap makes it visible everywhere:
while it is on, every tensor factory (`torch.ones`, `zeros`, `arange`, `tensor`, `full`, `randperm`, ... torch's own
list of device-taking constructors) called from the project's files (`blip/`, `data/`, the entry scripts) without an
explicit `device=` raises ImplicitDeviceError naming the file and line. Two kinds of call are exempt, being right on
any device by construction:
  * building modules (a factory under an `nn.Module.__init__`): models are built on the default device and moved
    (or built under `with torch.device(...)`), as torch intends;
  * the DataLoader's machinery (samplers, workers, collate under `torch.utils.data`): the host side of the pipeline,
    whose batches the engine moves to the device.
Everything else says where its tensor lives: the device of the data it meets, or `"cpu"` for host-side values.

    with ImplicitDeviceTrap():
        model.losses(...)          # raises at the first implicit-device factory in blip code

tests/conftest.py turns it on for every test, and `launch` passes BLIP_DEVICE_TRAP=1 to the scripts it starts,
which `tests/_trap_site/sitecustomize.py` reads (so torchrun ranks and DataLoader workers are guarded too).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

ROOT = Path(__file__).resolve().parent.parent
_PROJECT = (str(ROOT / "blip") + os.sep, str(ROOT / "data") + os.sep)
_SCRIPTS = {str(p) for p in ROOT.glob("*.py")}
_TORCH = str(Path(torch.__file__).parent) + os.sep
_DATA_MACHINERY = str(Path(torch.utils.data.__file__).parent) + os.sep
_CONSTRUCTORS = _device_constructors()
_FOLLOW_DATA = {torch.as_tensor, torch.asarray}  # of a tensor: its own device


class ImplicitDeviceError(RuntimeError):
    pass


def _project_caller() -> str | None:
    """'file:line' of the project frame that called the factory, or None when the call is not the project's own or
    is exempt (module construction, the DataLoader's machinery)."""
    frame, where = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_DATA_MACHINERY):
            return None
        if where is None and not name.startswith(_TORCH):
            if not (name.startswith(_PROJECT) or name in _SCRIPTS):
                return None  # transformers, timm, numpy, the tests: not ours to judge
            where = f"{os.path.relpath(name, ROOT)}:{frame.f_lineno} in {frame.f_code.co_name}"
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
            return None
        frame = frame.f_back
    return where


class ImplicitDeviceTrap(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None and not (
                func in _FOLLOW_DATA and args and isinstance(args[0], torch.Tensor)):
            where = _project_caller()
            if where is not None:
                raise ImplicitDeviceError(
                    f"torch.{getattr(func, '__name__', func)} without device= at {where}: on a GPU this tensor "
                    f"would be made on the CPU; pass the device of the data it meets (or device='cpu' for a "
                    f"host-side value)")
        return func(*args, **kwargs)


# -- host syncs --------------------------------------------------------------------------------------------------
class HostSyncError(RuntimeError):
    pass


def _bool_index(args) -> bool:
    """An index holding a bool tensor (a mask): indexing by it needs the number of True entries on the host."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


T = torch.Tensor
# Reads a device tensor's values back to the host: on a GPU each waits for every kernel queued before it.
_READS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.cpu, T.numpy, T.nonzero, torch.nonzero,
          torch.argwhere, T.masked_select, torch.masked_select, torch.unique, T.unique, torch.unique_consecutive,
          torch.bincount, T.bincount, torch.equal, torch.allclose, T.allclose,
          torch.multinomial, T.multinomial}  # multinomial checks its weights on the host (blip.data.batches.sample_one)
_SIZED_BY_VALUES = {torch.repeat_interleave, T.repeat_interleave}  # output size from the repeats' values
_INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put}


class HostSyncTrap(TorchFunctionMode):
    """While on, an operation that reads tensor values back to the host (`.item()`, `.tolist()`, `bool()`, `nonzero`,
    boolean-mask indexing, `repeat_interleave` by a tensor, `multinomial`, ...) raises HostSyncError naming it and the
    project line that asked for it; the DataLoader's machinery (host data by nature) is exempt. On the CPU it shows
    the reads that would stall a GPU step; bench/gpu_check.sh checks the same step under
    torch.cuda.set_sync_debug_mode("error") on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = (func in _READS
                 or (func in _SIZED_BY_VALUES and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                             torch.Tensor) and kwargs.get("output_size") is None)
                 or (func in _INDEXING and _bool_index(args))
                 or (func is torch.where and len(args) + len(kwargs) == 1))
        if reads and not _in_data_machinery():
            raise HostSyncError(f"{getattr(func, '__qualname__', func)} reads tensor values back to the host at "
                                f"{_caller()}")
        return func(*args, **kwargs)


def _in_data_machinery() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_DATA_MACHINERY):
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    """'file:line in function' of the first frame outside torch: the code that asked."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        frame = frame.f_back
    if frame is None:
        return "(torch)"
    return f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno} in {frame.f_code.co_name}"
