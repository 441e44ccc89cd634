"""A decode step from an 8-bit KV cache against the same step from a bf16 cache (issue 18).

B1, 32 query heads over 8 KV heads, Sq 1, Sk 32768, D 128, bf16 queries; int8 and
float8_e4m3fn caches with per-token scales. The calls alternate (three rounds, median of
five calls each) and the copy bandwidth is measured in the same run (a 512 MiB copy).
Prints one JSON line.

    .venv/bin/python quantized_decode.py >> quantized_decode.jsonl
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import fusedattn
import torch


def milliseconds(function, calls: int = 5) -> float:
    function()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    batch, heads_q, heads_kv, seqlen_k, dim = 1, 32, 8, 32768, 128
    q = torch.randn(batch, heads_q, 1, dim, dtype=torch.bfloat16)
    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=torch.bfloat16)
    v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=torch.bfloat16)
    caches = {"bfloat16": (k, v, {})}
    for dtype in (torch.int8, torch.float8_e4m3fn):
        key_cache, k_descale = fusedattn.quantize_kv(k, dtype)
        value_cache, v_descale = fusedattn.quantize_kv(v, dtype)
        caches[str(dtype).removeprefix("torch.")] = (
            key_cache,
            value_cache,
            {"k_descale": k_descale, "v_descale": v_descale},
        )
    source = torch.ones(128 * 1024 * 1024)
    target = torch.empty_like(source)
    times: dict[str, list[float]] = {name: [] for name in caches}
    copies = []
    for _ in range(3):
        for name, (key_cache, value_cache, scales) in caches.items():
            call = functools.partial(fusedattn.attention, q, key_cache, value_cache, backend="cpu", **scales)
            times[name].append(milliseconds(call))
        copies.append(milliseconds(lambda: target.copy_(source), calls=3))
    copy_gb_per_s = 2 * source.numel() * 4 / (statistics.median(copies) / 1e3) / 1e9
    result = {
        "shape": "B1 H32:8 Sq1 Sk32768 D128, bf16 q",
        "threads": torch.get_num_threads(),
        "copy_gb_per_s": round(copy_gb_per_s, 1),
    }
    for name, (key_cache, value_cache, _) in caches.items():
        ms = statistics.median(times[name])
        cache_bytes = key_cache.numel() * key_cache.element_size() + value_cache.numel() * value_cache.element_size()
        result[name] = {
            "ms": round(ms, 3),
            "gb_per_s": round(cache_bytes / (ms / 1e3) / 1e9, 1),
            "fraction_of_copy": round(cache_bytes / (ms / 1e3) / 1e9 / copy_gb_per_s, 3),
            "speedup_vs_bfloat16": round(statistics.median(times["bfloat16"]) / ms, 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
