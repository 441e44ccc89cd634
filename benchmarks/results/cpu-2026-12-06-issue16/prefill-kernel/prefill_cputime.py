"""One thread's CPU time (time.process_time) of the fp32 (or bf16) prefill cases of
benchmarks/grids/cpu-every-size.toml: fusedattn's CPU backend and torch SDPA alternated in
one process, median of 5 rounds of N calls each (N for about 0.2 s of fusedattn work).
Steadier than the grid's wall time while other processes load the machine. One JSON line
per run; `tree` names the checkout (alternate PYTHONPATHs for an A/B).

    OMP_NUM_THREADS=1 .venv/bin/python prefill_cputime.py [float32|bfloat16] >> prefill_cputime.jsonl
"""

import json
import statistics
import sys
import time

import fusedattn
import torch
from fusedattn.backends import cpu
from fusedattn.validation import validate_attention

torch.set_num_threads(1)
torch.manual_seed(0)
dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
result = {"tree": fusedattn.__file__.split("/")[2], "clock": "process_time, 1 thread", "dtype": str(dtype)[6:]}
for seqlen in (128, 512, 2048):
    for heads in (4, 32):
        for dim in (64, 128):
            for causal in (False, True):
                batch = 2048 // seqlen
                q, k, v = (torch.randn(batch, heads, seqlen, dim, dtype=dtype) for _ in range(3))
                call = validate_attention(q, k, v, causal=causal)

                def ours(call=call):
                    return cpu.forward(call)

                def sdpa(q=q, k=k, v=v, causal=causal):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                ours()
                sdpa()
                start = time.process_time()
                ours()
                calls = max(1, int(0.2 / max(time.process_time() - start, 1e-6)))
                times = {"ours": [], "sdpa": []}
                for _ in range(5):
                    for name, function in (("ours", ours), ("sdpa", sdpa)):
                        start = time.process_time()
                        for _ in range(calls):
                            function()
                        times[name].append((time.process_time() - start) / calls * 1e3)
                mine, theirs = statistics.median(times["ours"]), statistics.median(times["sdpa"])
                name = f"B{batch} H{heads} S{seqlen} D{dim}" + (" causal" if causal else "")
                result[name] = {"ms": round(mine, 3), "sdpa_ms": round(theirs, 3), "speedup": round(theirs / mine, 3)}
print(json.dumps(result))
