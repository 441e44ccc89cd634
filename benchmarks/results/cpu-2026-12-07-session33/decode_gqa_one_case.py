"""One decode case alone (GQA allowed), fusedattn (backend="cpu") against torch SDPA, torch's
default threads (set OMP_NUM_THREADS): five rounds of 300 calls each, alternated; prints the
median time of ours and the median ratio SDPA / ours.

    OMP_NUM_THREADS=1 python decode_gqa_one_case.py B,HQ,HKV,SK,D [bf16]
"""

import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F

torch.manual_seed(0)
B, HQ, HKV, SK, D = [int(x) for x in sys.argv[1].split(",")]
dtype = torch.bfloat16 if len(sys.argv) > 2 and sys.argv[2] == "bf16" else torch.float32
q = torch.randn(B, HQ, 1, D, dtype=dtype)
k = torch.randn(B, HKV, SK, D, dtype=dtype)
v = torch.randn_like(k)


def microseconds(function, calls: int = 300) -> float:
    for _ in range(20):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def ours():
    return fusedattn.attention(q, k, v, backend="cpu")


def theirs():
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


ratios, times = [], []
for _ in range(5):
    a, b = microseconds(ours), microseconds(theirs)
    ratios.append(b / a)
    times.append(a)
print(f"{sys.argv[1]} {dtype}: ours {statistics.median(times):.1f} us, sdpa / ours {statistics.median(ratios):.2f}")
