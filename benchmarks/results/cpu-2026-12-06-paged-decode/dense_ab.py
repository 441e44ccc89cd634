"""Dense CPU calls before and after the per-tile row pointers (issue 15): one JSON line per run.

Run alternately against two trees, each with its own built _C:

    PYTHONPATH=/path/to/base/python .venv/bin/python dense_ab.py >> dense_ab.jsonl
    .venv/bin/python dense_ab.py >> dense_ab.jsonl

Each line holds the median milliseconds of 15 calls of backends.cpu.forward per shape and
the fusedattn package that ran.
"""

from __future__ import annotations

import json
import statistics
import time

import fusedattn
import torch
from fusedattn.backends import cpu
from fusedattn.validation import validate_attention

# name: (batch, query heads, KV heads, Sq, Sk, head dim, dtype, causal)
SHAPES = {
    "decode_bf16": (1, 32, 8, 1, 8192, 128, torch.bfloat16, False),
    "decode_f32": (1, 32, 8, 1, 8192, 128, torch.float32, False),
    "decode_f16": (1, 32, 8, 1, 4096, 128, torch.float16, False),
    "prefill_f32": (1, 8, 8, 1024, 1024, 64, torch.float32, True),
    "prefill_bf16": (1, 8, 8, 1024, 1024, 64, torch.bfloat16, True),
}


def median_milliseconds(call, rounds: int = 15) -> float:
    for _ in range(3):
        cpu.forward(call)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        cpu.forward(call)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    result = {"file": fusedattn.__file__}
    for name, (batch, heads_q, heads_kv, seqlen_q, seqlen_k, dim, dtype, causal) in SHAPES.items():
        q = torch.randn(batch, heads_q, seqlen_q, dim, dtype=dtype)
        k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
        v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
        result[name] = median_milliseconds(validate_attention(q, k, v, causal=causal))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
