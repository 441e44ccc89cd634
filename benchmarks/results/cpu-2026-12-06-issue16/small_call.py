"""Time per call of the smallest decode step (B1, H8, Sq 1, Sk 16, D64, fp32): torch SDPA and
fusedattn.attention, median of 7 loops of 1000 calls. One JSON line per run; `tree` names the
checkout that ran (alternate a base tree's PYTHONPATH with this one's).

    .venv/bin/python small_call.py THREADS >> small_call.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F


def microseconds(function, calls: int = 1000) -> float:
    for _ in range(50):
        function()
    loops = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        loops.append((time.perf_counter() - start) / calls * 1e6)
    return round(statistics.median(loops), 2)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 16, 64), torch.randn(1, 8, 16, 64)
    result = {
        "tree": fusedattn.__file__.split("/")[2],
        "threads": torch.get_num_threads(),
        "sdpa_us": microseconds(lambda: F.scaled_dot_product_attention(q, k, v)),
        "fusedattn_us": microseconds(lambda: fusedattn.attention(q, k, v)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
