"""The machine's ceilings, measured in the same run as the cases: the matmul rate per dtype
(what attention's two matmuls could reach at best) and the bandwidth of a large copy (what a
memory-bound decode could reach at best). They turn "0.13 TFLOP/s" into "40% of what this
machine's torch.mm does", so a reader can tell whether a number is good.

Both are practical ceilings (torch's own kernels), not datasheet peaks, and both take about
a second: best of a few calls after one warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .cases import DTYPES, dtype_name


def _best_seconds(fn: Callable[[], object], device: torch.device, calls: int, budget_s: float) -> float:
    """Shortest time of fn over at most calls calls (fewer once budget_s is spent), after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    started = time.perf_counter()
    for _ in range(calls):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        else:
            begin_s = time.perf_counter()
            fn()
            seconds = time.perf_counter() - begin_s
        best = min(best, seconds)
        if time.perf_counter() - started > budget_s:
            break
    return best


def matmul_tflops(dtype: str, device: torch.device) -> float:
    """TFLOP/s of a square torch.mm in dtype: 1024 on CPU (a few ms to 100 ms), 8192 on GPU."""
    size = 8192 if device.type == "cuda" else 1024
    torch_dtype = DTYPES[dtype_name(dtype)]
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b), device, calls=10, budget_s=0.5)
    return 2 * size**3 / seconds / 1e12


def copy_gb_per_s(device: torch.device) -> float:
    """GB/s (bytes read + written) of copying a buffer larger than any cache: 256 MiB on CPU, 1 GiB on GPU."""
    megabytes = 1024 if device.type == "cuda" else 256
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device, calls=5, budget_s=0.5)
    return 2 * source.numel() * 4 / seconds / 1e9


def measure_ceilings(dtypes: list[str], device: torch.device) -> dict[str, Any]:
    """The report's "ceilings" block: matmul TFLOP/s per dtype, copy GB/s, and how they were measured.

    A measurement that fails (a dtype the device has no matmul for) is left out, never fatal.
    """
    matmul: dict[str, float] = {}
    for dtype in sorted({dtype_name(d) for d in dtypes}):
        try:
            matmul[dtype] = matmul_tflops(dtype, device)
        except Exception:  # e.g. no half-precision mm on an old CPU build: no ceiling, no failure
            continue
    try:
        copy = copy_gb_per_s(device)
    except Exception:
        copy = None
    size = 8192 if device.type == "cuda" else 1024
    return {
        "matmul_tflops": matmul,
        "copy_gb_per_s": copy,
        "method": f"best of up to 10 torch.mm {size}x{size} calls per dtype; best of up to 5 copies of a "
        f"{'1 GiB' if device.type == 'cuda' else '256 MiB'} float32 buffer (bytes read + written)",
    }
