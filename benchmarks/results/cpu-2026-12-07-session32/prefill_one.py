"""One prefill case alone, fusedattn (backend="cpu") against torch SDPA, torch's default
threads: five rounds of 50 calls each, alternated.

    python prefill_one.py B,H,S,D
"""

import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F

torch.manual_seed(0)
B, H, S, D = [int(x) for x in sys.argv[1].split(",")]
q, k, v = (torch.randn(B, H, S, D) for _ in range(3))


def milliseconds(function, calls: int = 50) -> float:
    for _ in range(5):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e3


ratios = []
for _ in range(5):
    ours = milliseconds(lambda: fusedattn.attention(q, k, v, backend="cpu"))
    theirs = milliseconds(lambda: F.scaled_dot_product_attention(q, k, v))
    ratios.append(theirs / ours)
    print(f"ours {ours:.3f} ms sdpa {theirs:.3f} ms ratio {theirs / ours:.2f}")
print("median", statistics.median(ratios))
