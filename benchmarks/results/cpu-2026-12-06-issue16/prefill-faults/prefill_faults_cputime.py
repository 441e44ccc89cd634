"""CPU time (user + system) and minor page faults per call of fusedattn.attention (the
repeated-call plan, as the grid's timed calls) and torch SDPA, alternated in one process,
for the prefill cases that issue 16's grid had below SDPA. `fixed` sets glibc's mmap
threshold to 128 KiB as the grid's peak-memory measurement does (python/fusedattn/bench/
measure.py: every block above it is mapped and unmapped per call); `default` leaves
glibc's adaptive threshold. Median of 5 rounds of about 0.2 s of calls each. One JSON
line per run; `tree` names the checkout (alternate PYTHONPATHs for an A/B).

    OMP_NUM_THREADS=1 .venv/bin/python prefill_faults_cputime.py fixed|default >> prefill_faults_cputime.jsonl
"""

import ctypes
import json
import resource
import statistics
import sys
import time

import fusedattn
import torch

mode = sys.argv[1] if len(sys.argv) > 1 else "fixed"
if mode == "fixed":
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, as measure.py
torch.manual_seed(0)
CASES = [  # batch, heads, seqlen, dim, dtype, causal
    (16, 4, 128, 128, torch.float32, False),
    (16, 4, 128, 64, torch.bfloat16, False),
    (16, 32, 128, 128, torch.float32, False),
    (16, 32, 128, 128, torch.float32, True),
    (16, 32, 128, 128, torch.bfloat16, False),
    (16, 32, 128, 128, torch.bfloat16, True),
    (4, 4, 512, 128, torch.float32, False),
]
result = {
    "tree": fusedattn.__file__.split("/")[2],
    "malloc": mode,
    "threads": torch.get_num_threads(),
    "load_before": open("/proc/loadavg").read().split()[0],
    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}


def per_call(function, calls):
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        function()
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / calls * 1e3
    system = (after.ru_stime - before.ru_stime) / calls * 1e3
    return user + system, system, (after.ru_minflt - before.ru_minflt) / calls


for batch, heads, seqlen, dim, dtype, causal in CASES:
    q, k, v = (torch.randn(batch, heads, seqlen, dim).to(dtype) for _ in range(3))

    def ours(q=q, k=k, v=v, causal=causal):
        return fusedattn.attention(q, k, v, causal=causal, backend="cpu")

    def sdpa(q=q, k=k, v=v, causal=causal):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    for function in (ours, ours, sdpa, sdpa):
        function()
    start = time.process_time()
    ours()
    calls = max(2, int(0.2 / max(time.process_time() - start, 1e-6)))
    rounds = {"ours": [], "sdpa": []}
    for _ in range(5):
        for name, function in (("ours", ours), ("sdpa", sdpa)):
            rounds[name].append(per_call(function, calls))
    entry = {}
    for name, values in rounds.items():
        cpu, system, faults = (statistics.median(column) for column in zip(*values))
        entry[f"{name}_cpu_ms"], entry[f"{name}_sys_ms"], entry[f"{name}_faults"] = (
            round(cpu, 3),
            round(system, 3),
            round(faults),
        )
    entry["speedup"] = round(entry["sdpa_cpu_ms"] / entry["ours_cpu_ms"], 3)
    name = f"B{batch} H{heads} S{seqlen} D{dim} {str(dtype)[6:]}" + (" causal" if causal else "")
    result[name] = entry
result["load_after"] = open("/proc/loadavg").read().split()[0]
print(json.dumps(result))
