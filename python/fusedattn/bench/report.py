"""Benchmark reports: the JSON document (schema below, prose in docs/benchmarks.md), the
environment fingerprint, and its renderings: per-case table, CSV, markdown (opening with the
summary, bench/summary.py); the PNG charts are bench/plots.py's.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..fingerprint import cpu_model, git_commit, run_text
from .plots import write_plots
from .providers import BASELINE, Provider, all_providers
from .run import STATUSES, BenchSettings
from .summary import summarize, summary_markdown

SCHEMA_VERSION = "fusedattn-bench/1"

# ---- schema ------------------------------------------------------------------------
_NUMBER = {"type": "number"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING = {"type": "string"}

TIMING_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "mean_ms", "repeats", "warmup_calls",
                 "samples_ms"],
    "properties": {
        "median_ms": _NUMBER, "q1_ms": _NUMBER, "q3_ms": _NUMBER, "iqr_ms": {"type": "number", "minimum": 0},
        "min_ms": _NUMBER, "mean_ms": _NUMBER, "repeats": {"type": "integer", "minimum": 1},
        "warmup_calls": {"type": "integer", "minimum": 1}, "samples_ms": {"type": "array", "items": _NUMBER},
        "rounds": {"type": "integer", "minimum": 1},  # optional: older reports lack it
    },
}  # fmt: skip

CASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["mode", "batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim", "head_dim_v", "dtype",
                 "causal", "window", "softcap", "alibi", "mask", "varlen_seqlens", "group"],
    "properties": {
        "mode": {"enum": ["fwd", "bwd", "fwd_bwd"]},
        "batch": {"type": "integer", "minimum": 1}, "heads_q": {"type": "integer", "minimum": 1},
        "heads_kv": {"type": "integer", "minimum": 1}, "seqlen_q": {"type": "integer", "minimum": 1},
        "seqlen_k": {"type": "integer", "minimum": 1}, "head_dim": {"type": "integer", "minimum": 1},
        "head_dim_v": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["float16", "bfloat16", "float32", "float64"]},
        "causal": {"type": "boolean"},
        "window": {"type": ["array", "null"], "items": {"type": ["integer", "null"]}},
        "softcap": _NUMBER_OR_NULL, "alibi": {"type": "boolean"}, "mask": {"enum": [None, "bool", "additive"]},
        "varlen_seqlens": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 1}},
        "group": _STRING,
    },
}  # fmt: skip

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["case_id", "provider", "status", "reason", "note", "case", "flops", "timing", "tflops",
                 "tokens_per_s", "gb_per_s", "peak_memory_bytes", "memory_method", "check", "speedup_vs_sdpa",
                 "wall_s"],
    "properties": {
        "case_id": _STRING, "provider": _STRING, "status": {"enum": list(STATUSES)}, "reason": _STRING,
        "note": _STRING, "case": CASE_SCHEMA, "flops": {"type": "number", "minimum": 0}, "timing": TIMING_SCHEMA,
        "tflops": _NUMBER_OR_NULL, "tokens_per_s": _NUMBER_OR_NULL, "gb_per_s": _NUMBER_OR_NULL,
        "peak_memory_bytes": {"type": ["integer", "null"], "minimum": 0}, "memory_method": _STRING,
        "check": {
            "type": ["object", "null"],
            "required": ["passed", "reason", "tensors"],
            "properties": {"passed": {"type": "boolean"}, "reason": _STRING,
                           "tensors": {"type": "array", "items": {"type": "object",
                                       "required": ["name", "passed", "max_error", "bound"]}}},
        },
        "speedup_vs_sdpa": _NUMBER_OR_NULL, "wall_s": _NUMBER,
        "compile_s": _NUMBER_OR_NULL,  # torch.compile's first calls, outside the timings
    },
}  # fmt: skip

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fusedattn bench report",
    "type": "object",
    "required": ["schema", "created", "preset", "command", "settings", "environment", "providers", "results"],
    "properties": {
        "schema": {"enum": [SCHEMA_VERSION]},
        "created": _STRING,
        "preset": {"type": ["string", "null"]},
        "command": {"type": "array", "items": _STRING},
        "settings": {
            "type": "object",
            "required": ["device", "warmup_s", "min_time_s", "min_repeats", "max_repeats", "flush_l2", "check",
                         "check_rows", "measure_memory", "seed", "flop_convention"],
        },
        "environment": {
            "type": "object",
            "required": ["date", "device", "device_name", "gpu", "gpu_driver", "cuda", "cudnn", "torch", "triton",
                         "fusedattn", "python", "platform", "cpu_model", "cpu_cores", "cpu_cores_available",
                         "torch_threads", "commit", "commit_dirty"],
        },
        "providers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "kind", "description", "available", "reason", "selected"],
            },
        },
        # Optional (older reports lack it): the run's own matmul and copy ceilings (bench/ceilings.py).
        "ceilings": {
            "type": ["object", "null"],
            "required": ["matmul_tflops", "copy_gb_per_s", "method"],
            "properties": {"matmul_tflops": {"type": "object"}, "copy_gb_per_s": _NUMBER_OR_NULL, "method": _STRING},
        },
        "results": {"type": "array", "items": RESULT_SCHEMA},
    },
}  # fmt: skip

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}  # fmt: skip


def _type_matches(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _JSON_TYPES[name])


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of value against the JSON Schema subset used here (type, enum, required,
    properties, items, minimum); [] when it conforms."""
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: expected one of {schema['enum']}, got {value!r}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_matches(value, name) for name in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__}"]
    if "minimum" in schema and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema["minimum"]:
            errors.append(f"{path}: expected >= {schema['minimum']}, got {value}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required key {name!r}")
        for name, subschema in schema.get("properties", {}).items():
            if name in value:
                errors += schema_errors(value[name], subschema, f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def validate_report(report: Any) -> list[str]:
    """Schema errors of a report document ([] when valid)."""
    return schema_errors(report, REPORT_SCHEMA)


def load_report(path: str | Path) -> dict[str, Any]:
    """A report from JSON; ValueError naming the problem when it is not a valid report."""
    try:
        with open(path) as handle:
            report = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON: {error}") from None
    errors = validate_report(report)
    if errors:
        shown = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        raise ValueError(f"{path}: not a fusedattn bench report ({SCHEMA_VERSION}): {shown}")
    return report


# ---- environment fingerprint -------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: device, driver, CUDA, library versions, CPU, threads, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    gpu = None
    driver = None
    cudnn = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        gpu = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_bytes": properties.total_memory,
            "multiprocessors": properties.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
        driver = run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = driver.splitlines()[0] if driver else None
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        from .._native import build_info

        build = build_info()
    except Exception:  # a missing extension must not stop a report
        build = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": gpu["name"] if gpu else cpu_model(),
        "gpu": gpu,
        "gpu_driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch": torch.__version__,
        "triton": triton_version,
        "fusedattn": __version__,
        "fusedattn_build": build,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "commit": commit,
        "commit_dirty": dirty,
    }


def build_report(
    results: list[dict[str, Any]],
    settings: BenchSettings,
    providers: list[Provider] | None = None,
    preset: str | None = None,
    command: list[str] | None = None,
    ceilings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document of a run (validate_report(report) == []); ceilings: measure_ceilings()'s block."""
    device = torch.device(settings.device)
    timing = settings.timing
    # Every known provider is listed (so an unavailable one shows why), with the ones run marked.
    selected = {provider.name for provider in providers or []}
    listed = list(providers or []) + [p for p in all_providers() if p.name not in selected]
    provider_rows = []
    for provider in listed:
        available, reason = provider.availability(device)
        provider_rows.append({"name": provider.name, "kind": provider.kind, "description": provider.description,
                              "available": available, "reason": reason, "selected": provider.name in selected})  # fmt: skip
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "command": list(command if command is not None else _command_line()),
        "settings": {
            "device": settings.device,
            "warmup_s": timing.warmup_s,
            "min_time_s": timing.min_time_s,
            "min_repeats": timing.min_repeats,
            "max_repeats": timing.max_repeats,
            "flush_l2": timing.flush_l2 and device.type == "cuda",
            "rounds": timing.rounds,
            "check": settings.check,
            "check_rows": settings.check_rows,
            "measure_memory": settings.measure_memory,
            "seed": settings.seed,
            "flop_convention": "fwd 2*(D+Dv) per visible (query, key) pair and query head; bwd 2.5x; fwd_bwd 3.5x",
            "baseline": BASELINE,
        },
        "environment": environment(device),
        "providers": provider_rows,
        "ceilings": _finite(ceilings),
        "results": _finite(results),
    }


def _command_line() -> list[str]:
    """sys.argv, with `python -m fusedattn` or `fusedattn` in place of the script path."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    head = ["python", "-m", "fusedattn"] if program == "__main__.py" else [program or "fusedattn"]
    return head + sys.argv[1:]


def _finite(value: Any) -> Any:
    """value with every non-finite float replaced by None: JSON has no inf or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


# ---- renderings ----------------------------------------------------------------------
def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 10**6:
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.2e}"


def _memory(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def result_row(result: dict[str, Any]) -> dict[str, str]:
    """The columns shown for one result in the terminal table and the markdown report."""
    timing = result["timing"]
    status = result["status"]
    if status in ("skipped", "oom", "error"):
        reason = result["reason"]
        return {"provider": result["provider"], "status": status, "median ms": "-", "IQR ms": "-", "TFLOP/s": "-",
                "tokens/s": "-", "peak MiB": "-", "vs SDPA": "-", "note": reason[:110]}  # fmt: skip
    speedup = result["speedup_vs_sdpa"]
    return {
        "provider": result["provider"],
        "status": status,
        "median ms": _number(timing["median_ms"], 4),
        "IQR ms": _number(timing["iqr_ms"], 2),
        "TFLOP/s": _number(result["tflops"]),
        "tokens/s": _number(result["tokens_per_s"]),
        "peak MiB": _memory(result["peak_memory_bytes"]),
        "vs SDPA": "-" if speedup is None else f"{speedup:.2f}x",
        "note": result["reason"][:110] if status == "wrong" else "",
    }


def _grouped(results: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    order: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        order.setdefault(result["case_id"], []).append(result)
    return list(order.items())


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table: one block per case, one row per provider, speedup against SDPA."""
    lines = []
    for case_id, rows in _grouped(results):
        group = rows[0]["case"]["group"]
        lines.append(f"{group}: {case_id}")
        table = [result_row(r) for r in rows]
        columns = list(table[0])
        widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in columns if c != "note"}
        header = "  " + "  ".join(c.ljust(widths[c]) if c in ("provider", "status") else c.rjust(widths[c])
                                  for c in widths)  # fmt: skip
        lines.append(header)
        for row in table:
            cells = [
                row[c].ljust(widths[c]) if c in ("provider", "status") else row[c].rjust(widths[c]) for c in widths
            ]
            lines.append("  " + "  ".join(cells) + (f"  {row['note']}" if row["note"] else ""))
        lines.append("")
    return "\n".join(lines)


CSV_COLUMNS = ["case_id", "provider", "status", "reason", "group", "mode", "dtype", "batch", "heads_q", "heads_kv",
               "seqlen_q", "seqlen_k", "head_dim", "head_dim_v", "causal", "window", "softcap", "alibi", "mask",
               "varlen_sequences", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "repeats", "flops", "tflops",
               "tokens_per_s", "gb_per_s", "peak_memory_bytes", "check_passed", "speedup_vs_sdpa"]  # fmt: skip


def write_csv(report: dict[str, Any], path: Path) -> None:
    """One CSV row per result, in CSV_COLUMNS order."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in report["results"]:
            case = result["case"]
            timing = result["timing"] or {}
            row = {name: result.get(name) for name in CSV_COLUMNS if name in result}
            row.update({name: case[name] for name in CSV_COLUMNS if name in case})
            row.update(
                {name: timing.get(name) for name in ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "repeats")}
            )
            row["window"] = "" if case["window"] is None else f"{case['window'][0]},{case['window'][1]}"
            row["varlen_sequences"] = "" if case["varlen_seqlens"] is None else len(case["varlen_seqlens"])
            row["check_passed"] = None if result["check"] is None else result["check"]["passed"]
            writer.writerow(row)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    """The markdown report: environment, settings, one table per case, plots."""
    env = report["environment"]
    lines = ["# fusedattn bench report", ""]
    lines.append(f"Preset `{report['preset']}`, created {report['created']}; command `{' '.join(report['command'])}`.")
    lines += ["", summary_markdown(summarize(report))]
    if plots:
        lines += ["## Charts", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    for key in ("device", "device_name", "gpu_driver", "cuda", "cudnn", "torch", "triton", "fusedattn", "python",
                "platform", "cpu_model", "cpu_cores", "cpu_cores_available", "torch_threads", "commit",
                "commit_dirty", "date"):  # fmt: skip
        lines.append(f"| {key} | {env.get(key)} |")
    settings = report["settings"]
    lines += ["", "## Settings", "", ", ".join(f"{k} = `{v}`" for k, v in settings.items()), ""]
    lines += ["## Results", "", "Speedups are SDPA's median time over the provider's. `wrong`: the output failed the "
              "check against the float64 reference (timed, but never counted as a speedup).", ""]  # fmt: skip
    for case_id, rows in _grouped(report["results"]):
        lines += [f"### {rows[0]['case']['group']}: `{case_id}`", ""]
        table = [result_row(r) for r in rows]
        columns = list(table[0])
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in table:
            lines.append("| " + " | ".join(row[c].replace("|", "/") for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], folder: str | Path, plots: bool = True) -> dict[str, Path]:
    """results.json, results.csv, report.md and the plots in folder (created); their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "csv": folder / "results.csv", "markdown": folder / "report.md"}
    with open(paths["json"], "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    write_csv(report, paths["csv"])
    plot_names = write_plots(report, folder) if plots else []
    paths["markdown"].write_text(markdown(report, plot_names))
    for name in plot_names:
        paths[name] = folder / name
    return paths
