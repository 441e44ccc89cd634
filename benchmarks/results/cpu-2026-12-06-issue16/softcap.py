"""The CPU forward with and without softcap (B4, H8, S1024, D64, causal; fp32 and bf16):
median of 7 calls each and their ratio. One JSON line per run; `tree` names the checkout.

    .venv/bin/python softcap.py >> softcap.jsonl
"""

from __future__ import annotations

import json
import statistics
import time

import fusedattn
import torch
from fusedattn.backends import cpu
from fusedattn.validation import validate_attention


def milliseconds(call) -> float:
    cpu.forward(call)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        cpu.forward(call)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    torch.manual_seed(0)
    result = {"tree": fusedattn.__file__.split("/")[2]}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        q, k, v = (torch.randn(4, 8, 1024, 64, dtype=dtype) for _ in range(3))
        plain = milliseconds(validate_attention(q, k, v, causal=True))
        capped = milliseconds(validate_attention(q, k, v, causal=True, softcap=30.0))
        result.update(
            {f"{name}_plain_ms": plain, f"{name}_softcap_ms": capped, f"{name}_ratio": round(capped / plain, 3)}
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
