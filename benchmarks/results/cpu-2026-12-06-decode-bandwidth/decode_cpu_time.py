"""One thread's CPU time of a decode step, for A/B of kernel builds on a shared machine.

B1, 32 query heads over 8 KV heads, Sq 1, Sk 32768, D 128 (the issue 18 shape); bf16
queries over a bf16, int8 or float8_e4m3fn cache (per-token scales), or fp32 throughout.
Each build is a directory holding a `fusedattn` package (with its `_C`); the builds run in
turn, in fresh processes, `rounds` times, and each process reports the median
`time.process_time` of 20 calls. Prints one JSON line per round and cache:

    python decode_cpu_time.py --builds base=/tmp/old new=python --rounds 3 >> decode_cpu_time.jsonl

CPU time rather than wall time: with other processes on the machine's two cores, the
two-thread wall time of a call measures the other processes as much as the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
import fusedattn
torch.set_num_threads(1)
torch.manual_seed(0)
cache = sys.argv[1]
dtype = torch.float32 if cache == "float32" else torch.bfloat16
q = torch.randn(1, 32, 1, 128, dtype=dtype)
k = torch.randn(1, 8, 32768, 128, dtype=dtype)
v = torch.randn(1, 8, 32768, 128, dtype=dtype)
extra = {}
if cache in ("int8", "float8_e4m3fn"):
    k, extra["k_descale"] = fusedattn.quantize_kv(k, getattr(torch, cache))
    v, extra["v_descale"] = fusedattn.quantize_kv(v, getattr(torch, cache))
call = lambda: fusedattn.attention(q, k, v, backend="cpu", **extra)
call()
times = []
for _ in range(20):
    start = time.process_time()
    call()
    times.append(time.process_time() - start)
cache_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
ms = statistics.median(times) * 1e3
print(json.dumps({"cpu_ms": round(ms, 2), "gb_per_s_one_thread": round(cache_bytes / ms / 1e6, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", nargs="+", required=True, help="name=directory holding the fusedattn package")
    parser.add_argument("--caches", nargs="+", default=["bfloat16", "int8", "float8_e4m3fn"])
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    builds = dict(entry.split("=", 1) for entry in arguments.builds)
    for round_index in range(arguments.rounds):
        for cache in arguments.caches:
            line = {"round": round_index, "cache": cache, "shape": "B1 H32:8 Sq1 Sk32768 D128", "threads": 1}
            for name, directory in builds.items():
                environment = {**os.environ, "PYTHONPATH": os.path.abspath(directory), "OMP_NUM_THREADS": "1"}
                result = subprocess.run(
                    [sys.executable, "-c", CHILD, cache], env=environment, capture_output=True, text=True, check=True
                )
                line[name] = json.loads(result.stdout.strip().splitlines()[-1])
            line["load_average"] = os.getloadavg()[0]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
