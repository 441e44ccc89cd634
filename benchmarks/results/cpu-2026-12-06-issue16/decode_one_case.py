"""One decode case alone, fusedattn (backend="cpu") against torch SDPA, two threads: five rounds of 200 calls each, alternated.

python decode_one_case.py B,H,SK,D
"""

import statistics
import sys
import time

import fusedattn
import torch
import torch.nn.functional as F

torch.manual_seed(0)
B, H, SK, D = [int(x) for x in sys.argv[1].split(",")]
q = torch.randn(B, H, 1, D)
k = torch.randn(B, H, SK, D)
v = torch.randn(B, H, SK, D)


def t(f, n=200):
    for _ in range(10):
        f()
    s = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - s) / n * 1e6


def ours():
    return fusedattn.attention(q, k, v, backend="cpu")


def theirs():
    return F.scaled_dot_product_attention(q, k, v)


r = []
for _ in range(5):
    a = t(ours)
    b = t(theirs)
    r.append(b / a)
    print(f"ours {a:.1f} us sdpa {b:.1f} us ratio {b / a:.2f}")
print("median", statistics.median(r))
