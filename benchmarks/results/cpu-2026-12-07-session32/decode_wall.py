"""Wall time of one decode step (median of 7 calls), THREADS threads, for the A/B of two builds
(run once per build, alternating): B1 H32:8 and B8 H8:2, Sq 1, Sk 32768, D 64 and 128.

    PYTHONPATH=BUILD/python python decode_wall.py THREADS float32,bfloat16 LABEL
"""

from __future__ import annotations

import statistics
import sys
import time

import fusedattn
import torch


def main() -> None:
    threads, dtypes, label = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for batch, heads_q, heads_kv in ((1, 32, 8), (8, 8, 2)):
            for dim in (64, 128):
                q = torch.randn(batch, heads_q, 1, dim, dtype=dtype)
                k = torch.randn(batch, heads_kv, 32768, dim, dtype=dtype)
                v = torch.randn_like(k)
                fusedattn.attention(q, k, v, backend="cpu")
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    fusedattn.attention(q, k, v, backend="cpu")
                    times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                gb = 2 * k.numel() * k.element_size() / (ms / 1e3) / 1e9
                print(f"{label} {dtype_name} B{batch} H{heads_q}:{heads_kv} D{dim} Sk32768: {ms:.3f} ms {gb:.1f} GB/s")


if __name__ == "__main__":
    main()
