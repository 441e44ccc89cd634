"""One thread's CPU time of a decode step per key per KV head (the lead's check, issue 18).

B1, 32 query heads over 8 KV heads, Sq 1, D 128; DTYPE bf16, int8, e4m3 (bf16 queries,
per-token scales) or fp32; SK keys. Prints ms, GB/s of K and V bytes and cycles per key per
KV head at an assumed 3.5 GHz (`time.process_time`, so run with OMP_NUM_THREADS=1):

    OMP_NUM_THREADS=1 python decode_cycles_per_key.py DTYPE SK
"""

from __future__ import annotations

import sys
import time

import fusedattn
import torch


def main() -> None:
    torch.manual_seed(0)
    cache, keys = sys.argv[1], int(sys.argv[2])
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 8, keys, 128, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scales = {}
    if cache == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    if cache in ("int8", "e4m3"):
        dtype = torch.int8 if cache == "int8" else torch.float8_e4m3fn
        k, k_descale = fusedattn.quantize_kv(k, dtype)
        v, v_descale = fusedattn.quantize_kv(v, dtype)
        scales = {"k_descale": k_descale, "v_descale": v_descale}
    for _ in range(3):
        fusedattn.attention(q, k, v, backend="cpu", **scales)
    calls = max(5, int(2e9 / (k.numel() * k.element_size() * 2)))
    start = time.process_time()
    for _ in range(calls):
        fusedattn.attention(q, k, v, backend="cpu", **scales)
    ms = (time.process_time() - start) / calls * 1e3
    cache_bytes = k.numel() * k.element_size() * 2
    cycles = ms * 1e-3 * 3.5e9 / (8 * keys)
    print(cache, keys, f"{ms:.3f} ms {cache_bytes / ms / 1e6:.1f} GB/s  {cycles:.0f} cycles/key/kvhead@3.5GHz")


if __name__ == "__main__":
    main()
