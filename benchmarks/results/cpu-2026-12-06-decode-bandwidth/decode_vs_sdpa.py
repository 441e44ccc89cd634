"""Decode steps with GQA against torch SDPA (enable_gqa=True) on the same inputs (issue 16).

B1 H32:8 and B8 H8:2, Sq 1, Sk 4096 and 32768, D 64 and 128. Three rounds alternating the two
calls, the median of five calls each; prints one line per case with the fusedattn GB/s of
K and V bytes:

    python decode_vs_sdpa.py THREADS float32,bfloat16 > decode_vs_sdpa_....txt
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F


def milliseconds(function, calls: int = 5) -> float:
    function()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


GQA_SHAPES = [(1, 32, 8), (8, 8, 2)]  # batch, query heads, KV heads


def main(head_shapes: list[tuple[int, int, int]] = GQA_SHAPES) -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32"]
    torch.set_num_threads(threads)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for batch, heads_q, heads_kv in head_shapes:
            for dim in (64, 128):
                for seqlen_k in (4096, 32768):
                    q = torch.randn(batch, heads_q, 1, dim, dtype=dtype)
                    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
                    v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
                    ours_call = functools.partial(fusedattn.attention, q, k, v, backend="cpu")
                    theirs_call = functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
                    ours, theirs = [], []
                    for _ in range(3):
                        ours.append(milliseconds(ours_call))
                        theirs.append(milliseconds(theirs_call))
                    ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
                    gb_per_s = 2 * k.numel() * k.element_size() / (ours_ms / 1e3) / 1e9
                    print(
                        f"{dtype_name} B{batch} H{heads_q}:{heads_kv} D{dim} Sk{seqlen_k}: fusedattn {ours_ms:.3f} ms "
                        f"({gb_per_s:.1f} GB/s) sdpa {theirs_ms:.3f} ms  ratio {theirs_ms / ours_ms:.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
