"""python grid_summary.py DIR: fusedattn:cpu against SDPA in a bench report.

Prints the cases below 1.0x SDPA (the Sq 1, Sk 16 ones need 0.9x only), then per group the
lowest and median speedup.
"""

import collections
import json
import sys

data = json.load(open(sys.argv[1] + "/results.json"))
ours = [r for r in data["results"] if r["provider"] == "fusedattn:cpu"]
failed = [r for r in ours if r["status"] != "ok" or not (r["check"] or {}).get("passed", True)]
below, groups, smallest = [], collections.defaultdict(list), []
for result in ours:
    speedup = result["speedup_vs_sdpa"]
    if speedup is None:
        continue
    case = result["case"]
    kind = "decode" if case["seqlen_q"] == 1 else "prefill"
    groups[kind, case["dtype"]].append(speedup)
    if case["seqlen_q"] == 1 and case["seqlen_k"] == 16:
        smallest.append(speedup)
    if speedup < 1.0:
        below.append(
            f"{case['dtype']} B{case['batch']} H{case['heads_q']}:{case['heads_kv']} Sq{case['seqlen_q']} "
            f"Sk{case['seqlen_k']} D{case['head_dim']} causal={case['causal']} {speedup:.3f}x "
            f"ours {result['timing']['median_ms']:.4f} ms"
        )
print(sys.argv[1], "cases", len(ours), "not ok/check failed", len(failed), "below 1.0x", len(below))
for line in below:
    print("  ", line)
for (kind, dtype), values in sorted(groups.items()):
    print("  ", kind, dtype, f"min {min(values):.2f}x median {sorted(values)[len(values) // 2]:.2f}x n {len(values)}")
print("   Sk16 decodes min", f"{min(smallest):.2f}x")
