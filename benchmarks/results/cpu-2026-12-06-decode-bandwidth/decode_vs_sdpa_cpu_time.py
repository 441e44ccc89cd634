"""Decode steps against torch SDPA on the same inputs, one thread, CPU time (issue 16).

For a loaded machine, where two threads' wall time measures the other processes: each call
is timed by time.process_time (one thread: the process's CPU time is the call's), three
rounds alternating the two calls, the median of five calls each. Shapes: "gqa" is
decode_vs_sdpa.py's (B1 H32:8 and B8 H8:2), "multihead" decode_multihead_vs_sdpa.py's
(B1 H32 and B8 H8 without GQA); Sq 1, Sk 4096 and 32768, D 64 and 128:

    OMP_NUM_THREADS=1 python decode_vs_sdpa_cpu_time.py gqa|multihead float32,bfloat16 > ....jsonl
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F

SHAPES = {"gqa": [(1, 32, 8), (8, 8, 2)], "multihead": [(1, 32, 32), (8, 8, 8)]}


def cpu_milliseconds(function, calls: int = 5) -> float:
    function()
    times = []
    for _ in range(calls):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    shapes = SHAPES[sys.argv[1]]
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32"]
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for batch, heads_q, heads_kv in shapes:
            for dim in (64, 128):
                for seqlen_k in (4096, 32768):
                    q = torch.randn(batch, heads_q, 1, dim, dtype=dtype)
                    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
                    v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
                    ours_call = functools.partial(fusedattn.attention, q, k, v, backend="cpu")
                    gqa = heads_q != heads_kv
                    theirs_call = functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=gqa)
                    ours, theirs = [], []
                    for _ in range(3):
                        ours.append(cpu_milliseconds(ours_call))
                        theirs.append(cpu_milliseconds(theirs_call))
                    ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
                    record = {
                        "dtype": dtype_name,
                        "shape": f"B{batch} H{heads_q}:{heads_kv} D{dim}",
                        "seqlen_k": seqlen_k,
                        "fusedattn_cpu_ms": round(ours_ms, 3),
                        "sdpa_cpu_ms": round(theirs_ms, 3),
                        "ratio": round(theirs_ms / ours_ms, 2),
                        "fusedattn_gb_per_s": round(2 * k.numel() * k.element_size() / ours_ms / 1e6, 1),
                        "load": open("/proc/loadavg").read().split()[0],
                    }
                    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
