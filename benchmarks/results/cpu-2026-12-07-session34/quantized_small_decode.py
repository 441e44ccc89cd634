"""A small decode step from an 8-bit cache: bf16 queries (B, HQ, 1, D), int8 or float8_e4m3fn
K and V (B, HKV, SK, D) with per-token scales from fusedattn.quantize_kv. Median of five
rounds of 1000 calls, microseconds.

    OMP_NUM_THREADS=1 python quantized_small_decode.py B,HQ,HKV,SK,D int8|fp8
"""

import statistics
import sys
import time

import fusedattn
import torch

batch, heads_q, heads_kv, seqlen_k, dim = (int(x) for x in sys.argv[1].split(","))
cache_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[sys.argv[2]]
torch.manual_seed(0)
q = torch.randn(batch, heads_q, 1, dim, dtype=torch.bfloat16)
k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=torch.bfloat16)
v = torch.randn_like(k)
key_cache, k_descale = fusedattn.quantize_kv(k, cache_dtype)
value_cache, v_descale = fusedattn.quantize_kv(v, cache_dtype)


def step() -> torch.Tensor:
    return fusedattn.attention(q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, backend="cpu")


def microseconds(calls: int = 1000) -> float:
    for _ in range(20):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


print(sys.argv[1], sys.argv[2], f"{statistics.median(microseconds() for _ in range(5)):.2f} us")
