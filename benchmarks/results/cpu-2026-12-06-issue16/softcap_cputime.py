"""Softcap's cost on the CPU forward as one thread's CPU time (time.process_time), which
other processes on the machine disturb less than wall time: B4 H8 S1024 D64 causal, fp32 and
bf16, plain and softcapped calls alternated, median of 5 each. CAP (argv[1], default 30)
sets where the scores fall: with q, k ~ N(0, 1) the scaled scores are about N(0, 1), so
cap 30 puts nearly every |score / cap| under 1/8 (tanh's series alone), cap 2 and 8 most
16-lane vectors past it. One JSON line; `tree` names the checkout (alternate PYTHONPATHs).

    .venv/bin/python softcap_cputime.py [CAP] >> softcap_cputime.jsonl
"""

import json
import statistics
import sys
import time

import fusedattn
import torch
from fusedattn.backends import cpu
from fusedattn.validation import validate_attention

CAP = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
torch.set_num_threads(1)
torch.manual_seed(0)
res = {"tree": fusedattn.__file__.split("/")[2], "clock": "process_time, 1 thread", "cap": CAP}
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(4, 8, 1024, 64, dtype=dtype) for _ in range(3))
    calls = {
        "plain": validate_attention(q, k, v, causal=True),
        "capped": validate_attention(q, k, v, causal=True, softcap=CAP),
    }
    t = {n: [] for n in calls}
    for c in calls.values():
        cpu.forward(c)
    for _ in range(5):
        for n, c in calls.items():
            s = time.process_time()
            cpu.forward(c)
            t[n].append(time.process_time() - s)
    p = statistics.median(t["plain"])
    c = statistics.median(t["capped"])
    name = str(dtype)[6:]
    res.update(
        {
            f"{name}_plain_ms": round(p * 1e3, 2),
            f"{name}_softcap_ms": round(c * 1e3, 2),
            f"{name}_ratio": round(c / p, 3),
        }
    )
print(json.dumps(res))
