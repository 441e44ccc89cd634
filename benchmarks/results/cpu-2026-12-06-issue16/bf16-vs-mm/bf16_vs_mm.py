"""Issue 16's bf16 goal: the forward's FLOP rate at S >= 2048, D 128 against torch's bf16
GEMM rate, one thread's CPU time (time.process_time), alternated in one process.

Cases: B1 H8 S2048 and S4096 D128 bf16, non-causal (and causal, counted at its visible
pairs). For each, three timings alternate, 5 rounds, medians:
  ours: the CPU backend's forward (fusedattn.backends.cpu.forward);
  gemms: torch.bmm of the same GEMM shapes in bf16: S = Q K^T (H x S x D by H x D x S) and
         O = P V (H x S x S by H x S x D), P precomputed (no softmax);
  mm: torch.mm of two 2048 x 2048 bf16 matrices (cpu_vs_sdpa.py's ceiling).
One JSON line per run (append to bf16_vs_mm.jsonl):

    OMP_NUM_THREADS=1 .venv/bin/python bf16_vs_mm.py >> bf16_vs_mm.jsonl
"""

import json
import statistics
import time

import fusedattn
import torch
from fusedattn.backends import cpu
from fusedattn.validation import validate_attention

torch.set_num_threads(1)
torch.manual_seed(0)
ROUNDS = 5


def seconds_per_call(function, budget_s: float = 0.4) -> float:
    start = time.process_time()
    function()
    once = time.process_time() - start
    calls = max(1, int(budget_s / max(once, 1e-6)))
    start = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - start) / calls


result = {
    "tree": fusedattn.__file__.split("/")[2],
    "clock": "process_time, 1 thread",
    "load_before": open("/proc/loadavg").read().split()[0],
    "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
square = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
mm_flops = 2 * 2048**3
for seqlen in (2048, 4096):
    heads, dim = 8, 128
    q, k, v = (torch.randn(1, heads, seqlen, dim).bfloat16() for _ in range(3))
    keys_transposed = k[0].transpose(1, 2).contiguous()
    probabilities = torch.rand(heads, seqlen, seqlen).bfloat16()
    dense_flops = 4 * heads * seqlen * seqlen * dim

    def gemms(q=q, v=v, keys_transposed=keys_transposed, probabilities=probabilities):
        return torch.bmm(q[0], keys_transposed), torch.bmm(probabilities, v[0])

    for causal in (False, True):
        call = validate_attention(q, k, v, causal=causal)
        pairs = seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen
        flops = 4 * heads * pairs * dim
        rates = {"ours": [], "gemms": [], "mm": []}
        for _ in range(ROUNDS):
            rates["ours"].append(flops / seconds_per_call(lambda call=call: cpu.forward(call)) / 1e9)
            rates["gemms"].append(dense_flops / seconds_per_call(gemms) / 1e9)
            rates["mm"].append(mm_flops / seconds_per_call(lambda: torch.mm(*square)) / 1e9)
        median = {name: statistics.median(values) for name, values in rates.items()}
        result[f"B1 H8 S{seqlen} D128" + (" causal" if causal else "")] = {
            "ours_gflops": round(median["ours"], 1),
            "gemms_gflops": round(median["gemms"], 1),
            "mm_gflops": round(median["mm"], 1),
            "ours_over_gemms": round(median["ours"] / median["gemms"], 3),
            "ours_over_mm": round(median["ours"] / median["mm"], 3),
            "rounds": {name: [round(value, 1) for value in values] for name, values in rates.items()},
        }
result["load_after"] = open("/proc/loadavg").read().split()[0]
print(json.dumps(result))
