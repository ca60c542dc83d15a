"""Timing shared by the benchmarks."""
import time

import torch


def timed(fn, device):
    """(seconds, fn()) with the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out
