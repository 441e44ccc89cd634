"""Decode steps of fusedattn's cpu backend alone (no SDPA), one line per run.

Each spec is DTYPE:B:HQ:HKV:SK:D (Sq 1, random inputs); median of seven timings, each the
mean of enough calls for 100k keys; GB/s counts K and V once.

    python decode_ab.py THREADS bfloat16:1:32:8:32768:128,float32:8:8:2:32768:64
"""

import functools
import statistics
import sys
import time
from collections.abc import Callable

import fusedattn
import torch


def seconds_per_call(step: Callable[[], object], keys: int) -> float:
    """Median of seven timings of step, each the mean of enough calls for 100k keys."""
    step()
    calls = max(3, 100000 // keys)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    out = []
    for spec in sys.argv[2].split(","):
        dtype_name, *sizes = spec.split(":")
        batch, heads_q, heads_kv, keys, dim = map(int, sizes)
        dtype = getattr(torch, dtype_name)
        q = torch.randn(batch, heads_q, 1, dim, dtype=dtype)
        k = torch.randn(batch, heads_kv, keys, dim, dtype=dtype)
        v = torch.randn_like(k)
        ms = seconds_per_call(functools.partial(fusedattn.attention, q, k, v, backend="cpu"), keys) * 1e3
        gb_per_s = 2 * k.numel() * k.element_size() / ms / 1e6
        out.append(f"{dtype_name[:4]} B{batch}H{heads_q}:{heads_kv}D{dim}Sk{keys} {ms:.3f}ms {gb_per_s:.1f}GB/s")
    print(" | ".join(out))


if __name__ == "__main__":
    main()
