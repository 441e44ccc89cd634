"""One fp32 prefill case alone with one and then two threads: fusedattn (backend="cpu") and
torch SDPA, medians of three rounds of 10 calls each.

    python prefill_threads.py B,H,S,D
"""

import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F

batch, heads, seqlen, dim = (int(x) for x in sys.argv[1].split(","))
q, k, v = (torch.randn(batch, heads, seqlen, dim) for _ in range(3))


def milliseconds(function, calls: int = 10) -> float:
    for _ in range(2):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e3


for threads in (1, 2):
    torch.set_num_threads(threads)
    ours = statistics.median(milliseconds(lambda: fusedattn.attention(q, k, v, backend="cpu")) for _ in range(3))
    sdpa = statistics.median(milliseconds(lambda: F.scaled_dot_product_attention(q, k, v)) for _ in range(3))
    print(f"{sys.argv[1]} threads {threads}: ours {ours:.1f} ms sdpa {sdpa:.1f} ms ratio {sdpa / ours:.2f}")
