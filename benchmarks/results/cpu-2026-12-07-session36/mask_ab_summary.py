"""python mask_ab_summary.py BASE_DIR NEW_DIR: fusedattn:cpu median times of the mask cases of
two cpu-masks-softcap.toml reports, new over base, and each one's speedup against SDPA."""

import json
import sys


def load(path: str) -> dict:
    data = json.load(open(path + "/results.json"))
    return {r["case_id"]: r for r in data["results"] if r["provider"] == "fusedattn:cpu"}


base, new = load(sys.argv[1]), load(sys.argv[2])
for case_id, result in new.items():
    case = result["case"]
    if not case["group"].startswith("mask"):
        continue
    before = base[case_id]
    new_ms, base_ms = result["timing"]["median_ms"], before["timing"]["median_ms"]
    print(
        f"{case['dtype']:9} B{case['batch']} H{case['heads_q']}:{case['heads_kv']} Sq{case['seqlen_q']} "
        f"Sk{case['seqlen_k']} D{case['head_dim']} c={int(case['causal'])} {case['mask']:8} "
        f"base {base_ms:8.3f} ({before['speedup_vs_sdpa']:.2f}x) new {new_ms:8.3f} ({result['speedup_vs_sdpa']:.2f}x) "
        f"new/base {new_ms / base_ms:.3f}"
    )
