"""python mask_softcap_summary.py DIR: a cpu-masks-softcap.toml report: the mask cases against
SDPA given the same mask, and each softcap case over the same call without softcap."""

import json
import sys

data = json.load(open(sys.argv[1] + "/results.json"))
ours = [r for r in data["results"] if r["provider"] == "fusedattn:cpu"]
plain = {
    (r["case"]["dtype"], r["case"]["head_dim"], r["case"]["causal"]): r["timing"]["median_ms"]
    for r in ours
    if r["case"]["group"] == "plain"
}
print(sys.argv[1])
print("masks: ours against SDPA given the same mask")
speedups = []
for result in ours:
    case = result["case"]
    if case["group"].startswith("mask"):
        speedups.append(result["speedup_vs_sdpa"])
        print(
            f"  {case['dtype']:9} {case['group']:11} B{case['batch']} H{case['heads_q']}:{case['heads_kv']} "
            f"Sq{case['seqlen_q']} Sk{case['seqlen_k']} D{case['head_dim']} causal={int(case['causal'])} "
            f"{case['mask']:8} {result['timing']['median_ms']:9.3f} ms  {result['speedup_vs_sdpa']:.2f}x  {result['status']}"
        )
print(f"mask lowest {min(speedups):.3f}x")
print("softcap: ours with softcap / ours without")
ratios = []
for result in ours:
    case = result["case"]
    if case["group"] == "softcap":
        base = plain[case["dtype"], case["head_dim"], case["causal"]]
        ratios.append(result["timing"]["median_ms"] / base)
        print(
            f"  {case['dtype']:9} D{case['head_dim']} causal={int(case['causal'])} cap {case['softcap']:4g} "
            f"{result['timing']['median_ms']:8.2f} ms / {base:8.2f} = {ratios[-1]:.3f}  {result['status']}"
        )
print(f"softcap highest {max(ratios):.3f}")
