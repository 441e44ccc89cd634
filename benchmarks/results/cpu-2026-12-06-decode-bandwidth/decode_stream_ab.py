"""One thread's CPU time of one decode call (time.process_time, median of 5 rounds of n calls).

    OMP_NUM_THREADS=1 PYTHONPATH=<tree>/python python decode_stream_ab.py DTYPE SK [BATCH HEADS_Q HEADS_KV DIM]

Prints one JSON line: ms, GB/s of K+V bytes, and a hash of the output bytes (the A/B of two
builds must print the same hash: the kernel change keeps every sum in the same order).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time

import fusedattn
import torch


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype_name, seqlen_k = sys.argv[1], int(sys.argv[2])
    batch, heads_q, heads_kv, dim = (int(x) for x in sys.argv[3:7]) if len(sys.argv) > 3 else (1, 32, 8, 128)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    q = torch.randn(batch, heads_q, 1, dim).to(dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, dim).to(dtype)
    v = torch.randn_like(k)
    out = fusedattn.attention(q, k, v, backend="cpu")
    digest = hashlib.sha1(out.float().numpy().tobytes()).hexdigest()[:12]
    kv_bytes = 2 * k.numel() * k.element_size()
    calls = max(5, int(2e9 / kv_bytes))
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(calls):
            fusedattn.attention(q, k, v, backend="cpu")
        rounds.append((time.process_time() - start) / calls * 1e3)
    ms = statistics.median(rounds)
    shape = f"B{batch} H{heads_q}:{heads_kv} D{dim}"
    print(json.dumps({"dtype": dtype_name, "shape": shape, "seqlen_k": seqlen_k, "cpu_ms": round(ms, 4),
                      "gb_per_s": round(kv_bytes / ms / 1e6, 2), "out_sha1": digest}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
