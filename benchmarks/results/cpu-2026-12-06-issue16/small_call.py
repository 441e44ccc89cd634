"""Time per call of the smallest decode step (default B1, H8, Sq 1, Sk 16, D64, fp32): torch
SDPA and fusedattn.attention, 1000 calls per loop, the two alternating loop by loop so that
both see the same machine; medians of 9 loops each and the median of the per-loop ratios.
One JSON line per run; `tree` names the checkout that ran (alternate a base tree's
PYTHONPATH with this one's).

    .venv/bin/python small_call.py THREADS [--clock wall|cpu] [--shape B,H,SK] >> small_call.jsonl

--clock cpu counts the process's CPU time (time.process_time), steadier than wall time
while other processes share the machine (use it with one thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import fusedattn
import torch
import torch.nn.functional as F

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("threads", type=int)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--shape", default="1,8,16", help="B,H,Sk (Sq 1, D 64, fp32)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    batch, heads, keys = (int(part) for part in arguments.shape.split(","))
    q = torch.randn(batch, heads, 1, 64)
    k, v = torch.randn(batch, heads, keys, 64), torch.randn(batch, heads, keys, 64)
    clock = CLOCKS[arguments.clock]
    functions = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "fusedattn": lambda: fusedattn.attention(q, k, v),
    }
    loops: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        for _ in range(200):
            function()
    calls = 1000
    for _ in range(9):
        for name, function in functions.items():
            start = clock()
            for _ in range(calls):
                function()
            loops[name].append((clock() - start) / calls * 1e6)
    ratios = [s / f for s, f in zip(loops["sdpa"], loops["fusedattn"], strict=True)]
    result = {
        "tree": fusedattn.__file__.split("/")[2],
        "threads": torch.get_num_threads(),
        "clock": arguments.clock,
        "shape": f"B{batch} H{heads} Sq1 Sk{keys} D64 fp32",
        "sdpa_us": round(statistics.median(loops["sdpa"]), 2),
        "fusedattn_us": round(statistics.median(loops["fusedattn"]), 2),
        "speed_vs_sdpa": round(statistics.median(ratios), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
