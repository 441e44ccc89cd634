"""`fusedattn info`: versions, devices, compiled build facts, and every backend's state."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from . import __version__
from ._native import build_info, native_error
from .dispatch import availability, import_errors, registry


def collect() -> dict[str, object]:
    """Everything `fusedattn info` prints, as a dict (also used by reports)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    backends = {}
    for name, backend in registry().items():
        available, reason = availability(backend)
        backends[name] = {
            "available": available,
            "reason": reason,
            "devices": sorted(backend.capabilities.devices),
            "description": backend.description,
        }
    for name, error in import_errors().items():
        backends[name] = {"available": False, "reason": f"failed to import: {error}"}
    return {
        "fusedattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "devices": devices,
        "build": build_info() or {"error": native_error()},
        "backends": backends,
    }


FEATURE_LABELS = {
    "causal_bottom_right": "causal, bottom-right aligned",
    "causal_top_left": "causal, top-left aligned",
    "gqa": "grouped-query / multi-query",
    "bool_mask": "boolean mask",
    "additive_mask": "additive mask",
    "key_lengths": "key lengths (padding)",
    "varlen": "varlen (cu_seqlens)",
    "window": "sliding window",
    "alibi": "ALiBi",
    "softcap": "softcap",
    "dropout": "dropout (bit-exact mask)",
    "value_head_dim": "Dv != D",
    "sinks": "attention sinks (gpt-oss)",
    "paged_kv": "paged KV cache (block table; forward)",
    "sequence_block": "block of a longer sequence (query_start / key_start)",
    "quantized_kv": "8-bit K/V (float8_e4m3fn, int8; forward)",
    "backward": "backward",
}
# Rows for the option tensors a backend differentiates (semantics.DIFFERENTIABLE_OPTIONS).
GRADIENT_LABELS = {
    "attn_mask": "gradient of an additive mask",
    "alibi_slopes": "gradient of ALiBi slopes",
    "sinks": "gradient of sinks",
}


def capability_table() -> str:
    """The README's feature-by-backend table, generated from the declared capabilities."""
    backends = registry()
    names = list(backends)
    lines = ["| feature | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for feature, label in FEATURE_LABELS.items():
        marks = ["yes" if feature in backends[n].capabilities.features else "no" for n in names]
        lines.append(f"| {label} | " + " | ".join(marks) + " |")
    for option, label in GRADIENT_LABELS.items():
        marks = ["yes" if option in backends[n].capabilities.differentiable_options else "no" for n in names]
        lines.append(f"| {label} | " + " | ".join(marks) + " |")
    devices = [", ".join(sorted(backends[n].capabilities.devices - {"meta", "mps", "xpu"})) for n in names]
    lines.append("| devices | " + " | ".join(devices) + " |")
    dtype_names = []
    for n in names:
        dtypes = backends[n].capabilities.dtypes
        dtype_names.append(", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str)))
    lines.append("| dtypes | " + " | ".join(dtype_names) + " |")
    lines.append("| head dims | " + " | ".join(f"1..{backends[n].capabilities.max_head_dim}" for n in names) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--table", action="store_true", help="print the markdown feature-by-backend table")


def main(args: argparse.Namespace) -> int:
    if args.table:
        print(capability_table())
        return 0
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    for key, value in facts.items():
        if key in ("build", "backends"):
            continue
        print(f"{key:12} {value}")
    print("build")
    for key, value in facts["build"].items():
        print(f"  {key:18} {value}")
    print("backends")
    for name, state in facts["backends"].items():
        mark = "available" if state["available"] else f"unavailable: {state['reason']}"
        print(f"  {name:10} {mark}")
    return 0
