"""Calls whose K/V storage is longer than their key_lengths (a cache allocated for the
longest sequence), timed on the CPU backend: ms per call, median of rounds.

Run with PYTHONPATH pointing at the package copy to time (A/B): `python padded_calls.py LABEL`.
"""

import functools
import statistics
import sys
import time

import fusedattn
import torch

CASES = [
    # name, (B, Hq, Hkv, Sq, Sk capacity, D), key_lengths, dtype, causal
    ("decode B1 H8:1 cap 32768 len 8192 bf16", (1, 8, 1, 1, 32768, 128), [8192], torch.bfloat16, False),
    (
        "decode B4 H32:8 cap 4096 lens 4096,1024,512,100 fp32",
        (4, 32, 8, 1, 4096, 128),
        [4096, 1024, 512, 100],
        torch.float32,
        False,
    ),
    ("decode B1 H32:8 cap 32768 len 4096 bf16", (1, 32, 8, 1, 32768, 128), [4096], torch.bfloat16, False),
    ("prefill B4 H8 Sq512 cap 2048 lens 512 fp32", (4, 8, 8, 512, 2048, 64), [512, 512, 512, 512], torch.float32, True),
]


def main() -> None:
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    for name, (batch, heads_q, heads_kv, seqlen_q, capacity, dim), lengths, dtype, causal in CASES:
        q = torch.randn(batch, heads_q, seqlen_q, dim, dtype=dtype)
        k = torch.randn(batch, heads_kv, capacity, dim, dtype=dtype)
        v = torch.randn(batch, heads_kv, capacity, dim, dtype=dtype)
        key_lengths = torch.tensor(lengths, dtype=torch.int32)

        call = functools.partial(fusedattn.attention, q, k, v, key_lengths=key_lengths, causal=causal, backend="cpu")

        for _ in range(3):
            call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        repeats = max(3, int(0.3 / max(once, 1e-6)))
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            samples.append((time.perf_counter() - start) / repeats * 1e3)
        print(f"{label}\t{name}\t{statistics.median(samples):.4f} ms\t{' '.join(f'{s:.4f}' for s in samples)}")


if __name__ == "__main__":
    main()
