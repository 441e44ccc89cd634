"""Per-call cost of a small decode step, one process (PYTHONPATH picks the build):
fusedattn.attention with backend="cpu" (full) and with the backend chosen (auto), its
remembered plan called directly (plan: the native call and the kernel, no Python key),
torch SDPA, and torch.empty of the output (empty). Median of five rounds of 2000 calls,
microseconds; q (B, HQ, 1, D), k and v (B, HKV, SK, D), float32.

    OMP_NUM_THREADS=1 python call_overhead.py B,HQ,HKV,SK,D
"""

import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F
from fusedattn import repeat_calls

batch, heads_q, heads_kv, seqlen_k, dim = (int(x) for x in sys.argv[1].split(","))
q = torch.randn(batch, heads_q, 1, dim)
k = torch.randn(batch, heads_kv, seqlen_k, dim)
v = torch.randn_like(k)
fusedattn.attention(q, k, v, backend="cpu")
plan = next(iter(repeat_calls._PLANS.values()))


def microseconds(function, calls: int = 2000) -> float:
    for _ in range(50):
        function()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


full = microseconds(lambda: fusedattn.attention(q, k, v, backend="cpu"))
auto = microseconds(lambda: fusedattn.attention(q, k, v))
planned = microseconds(lambda: plan(q, k, v))
sdpa = microseconds(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
empty = microseconds(lambda: torch.empty(batch, heads_q, 1, dim))
print(f"{sys.argv[1]} full {full:.2f} auto {auto:.2f} plan {planned:.2f} sdpa {sdpa:.2f} empty {empty:.2f}")
