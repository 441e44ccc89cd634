"""The one-screen answer of a run: what fusedattn buys on this machine.

Per provider, workload (prefill, decode, training) and dtype: the geometric mean and range of
the speedup against SDPA (and against FlexAttention when it ran), the cases where the provider
is slower, and the fraction of the machine's ceiling it reaches (TFLOP/s over the matmul rate
for prefill and training, GB/s over the copy bandwidth for decode; the ceilings are measured in
the same run, bench/ceilings.py). The terminal prints it last; report.md opens with it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .providers import BASELINE

WORKLOADS: tuple[str, ...] = ("prefill", "decode", "training")
NOISY = 0.25  # IQR / median above which a timing is called noisy (a busy machine, not the kernel)
FLEX = "flex_attention"
EAGER = "naive"
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def workload(case: dict[str, Any]) -> str:
    """prefill (a forward over whole sequences), decode (a forward of <= 16 new queries against a
    longer KV cache) or training (any case with a backward)."""
    if case["mode"] != "fwd":
        return "training"
    if case["varlen_seqlens"] is None and case["seqlen_q"] <= 16 < case["seqlen_k"]:
        return "decode"
    return "prefill"


def geomean(values: list[float]) -> float:
    """Geometric mean of positive values (the mean that treats 2x and 0.5x as opposites)."""
    return math.exp(statistics.fmean(math.log(v) for v in values))


def ceiling_fraction(result: dict[str, Any], ceilings: dict[str, Any] | None) -> float | None:
    """The share of the machine's ceiling a result reaches: GB/s over the copy bandwidth for
    decode (memory-bound), TFLOP/s over the dtype's matmul rate otherwise; None when unknown."""
    if not ceilings or result["status"] != "ok":
        return None
    case = result["case"]
    if workload(case) == "decode":
        copy = ceilings.get("copy_gb_per_s")
        return result["gb_per_s"] / copy if copy and result.get("gb_per_s") else None
    rate = (ceilings.get("matmul_tflops") or {}).get(case["dtype"])
    return result["tflops"] / rate if rate and result.get("tflops") else None


@dataclass
class Row:
    """One line of the summary table: a provider on one workload and dtype."""

    provider: str
    workload: str
    dtype: str
    speedups: list[float] = field(default_factory=list)
    slower: list[tuple[str, float]] = field(default_factory=list)
    ceiling: list[float] = field(default_factory=list)
    baseline_ceiling: list[float] = field(default_factory=list)
    vs_flex: list[float] = field(default_factory=list)

    @property
    def geomean(self) -> float | None:
        return geomean(self.speedups) if self.speedups else None


@dataclass
class Summary:
    """Everything the summary prints, computed from a report alone (so old results.json work too)."""

    device_name: str
    threads: int | None
    ceilings: dict[str, Any] | None
    rows: list[Row]
    headlines: list[str]
    slower: list[tuple[str, str, float]]  # (provider, case_id, speedup)
    failed: list[tuple[str, str, str]]  # (provider, case_id, status) of fusedattn results not ok
    noisy: int = 0  # ok timings whose interquartile range exceeds NOISY of their median
    timed: int = 0


def _provider_order(report: dict[str, Any]) -> list[str]:
    """fusedattn's providers first, then FlexAttention and the rest, in the report's order."""
    names = list(dict.fromkeys(r["provider"] for r in report["results"]))
    return sorted(names, key=lambda name: (not name.startswith("fusedattn:"), name != FLEX, names.index(name)))


def _is_compared(provider: str) -> bool:
    """Providers that get a row: everything except SDPA itself and its forced backends."""
    return provider != BASELINE and not provider.startswith(BASELINE + ":")


def summarize(report: dict[str, Any]) -> Summary:
    """The summary of a report (a results.json document)."""
    results = report["results"]
    ceilings = report.get("ceilings")
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        by_case.setdefault(result["case_id"], {})[result["provider"]] = result
    rows: dict[tuple[str, str, str], Row] = {}
    slower: list[tuple[str, str, float]] = []
    failed: list[tuple[str, str, str]] = []
    unmatched: dict[str, int] = {}  # ok cases SDPA could not run (softcap): no speedup to count
    order = _provider_order(report)
    for provider in order:
        if not _is_compared(provider):
            continue
        for case_id, providers in by_case.items():
            result = providers.get(provider)
            if result is None:
                continue
            if provider.startswith("fusedattn:") and result["status"] in ("wrong", "oom", "error"):
                failed.append((provider, case_id, result["status"]))
            if result["status"] != "ok":
                continue
            case = result["case"]
            key = (provider, workload(case), case["dtype"])
            row = rows.setdefault(key, Row(*key))
            fraction = ceiling_fraction(result, ceilings)
            if fraction is not None:
                row.ceiling.append(fraction)
            baseline = providers.get(BASELINE)
            if baseline is None or baseline["status"] != "ok":
                unmatched[provider] = unmatched.get(provider, 0) + 1
            else:
                speedup = baseline["timing"]["median_ms"] / result["timing"]["median_ms"]
                row.speedups.append(speedup)
                base_fraction = ceiling_fraction(baseline, ceilings)
                if base_fraction is not None:
                    row.baseline_ceiling.append(base_fraction)
                if speedup < 1.0:
                    row.slower.append((case_id, speedup))
                    if provider.startswith("fusedattn:"):
                        slower.append((provider, case_id, speedup))
            flex = providers.get(FLEX)
            if provider != FLEX and flex is not None and flex["status"] == "ok":
                row.vs_flex.append(flex["timing"]["median_ms"] / result["timing"]["median_ms"])
    ordered = sorted(rows.values(), key=lambda r: (order.index(r.provider), WORKLOADS.index(r.workload), r.dtype))
    # fusedattn's providers first; the hand-written eager baseline gets a line, not table rows
    # (it is there to show what fusing saves, and its rows would push the table off the screen).
    headlines = [_headline(provider, [r for r in ordered if r.provider == provider], unmatched.get(provider, 0))
                 for provider in order if provider.startswith("fusedattn:") or provider == EAGER]  # fmt: skip
    ordered = [row for row in ordered if row.provider != EAGER]
    env = report.get("environment", {})
    timings = [r["timing"] for r in results if r["status"] == "ok" and r["timing"]]
    return Summary(
        device_name=str(env.get("device_name") or env.get("device") or "this machine"),
        threads=env.get("torch_threads") if env.get("device") == "cpu" else None,
        ceilings=ceilings,
        rows=ordered,
        headlines=[h for h in headlines if h],
        slower=sorted(slower, key=lambda item: item[2]),
        failed=failed,
        noisy=sum(1 for t in timings if t["median_ms"] > 0 and t["iqr_ms"] / t["median_ms"] > NOISY),
        timed=len(timings),
    )


def _headline(provider: str, rows: list[Row], unmatched: int = 0) -> str:
    """ "fusedattn:cpu is 0.64x to 27.1x SDPA (geomean 1.31x): faster in 19 of 23 cases, slower in 4"."""
    speedups = [s for row in rows for s in row.speedups]
    if not speedups:
        return f"{provider}: no case where both it and SDPA ran ok" if rows else ""
    slower = sum(1 for s in speedups if s < 1.0)
    text = (f"{provider} is {min(speedups):.2f}x to {max(speedups):.2f}x SDPA (geomean {geomean(speedups):.2f}x): "
            f"faster in {len(speedups) - slower} of {len(speedups)} cases")  # fmt: skip
    text += f", slower in {slower}" if slower else ""
    if unmatched:
        text += f" (+{unmatched} SDPA cannot run)"
    flex = [s for row in rows for s in row.vs_flex]
    if flex:
        text += f"; {geomean(flex):.2f}x FlexAttention (geomean of {len(flex)})"
    return text


# ---- rendering ---------------------------------------------------------------------
def _percent(values: list[float]) -> str:
    """Median share of the ceiling, as a percentage ("-" when not measured)."""
    return "-" if not values else f"{100 * statistics.median(values):.0f}%"


def _ceiling_line(summary: Summary) -> str:
    ceilings = summary.ceilings
    if not ceilings:
        return "Ceilings: not measured in this run (an older report)."
    rates = ", ".join(f"{_rate(value)} {SHORT_DTYPES.get(dtype, dtype)}"
                      for dtype, value in sorted((ceilings.get("matmul_tflops") or {}).items()))  # fmt: skip
    copy = ceilings.get("copy_gb_per_s")
    copy_text = "-" if copy is None else f"{copy:.1f} GB/s"
    return (f"Ceilings measured in this run: torch.mm {rates or '-'}; copy {copy_text}. "
            "% ceiling: median TFLOP/s / matmul rate (prefill, training) or GB/s / copy bandwidth (decode).")  # fmt: skip


def _rate(tflops: float) -> str:
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:.3g} GFLOP/s"


def table_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """The summary table as header and cells (shared by the terminal and markdown renderings)."""
    flex = any(row.vs_flex for row in summary.rows)
    header = ["provider", "workload", "dtype", "cases", "vs SDPA geomean", "range", "slower", "% ceiling",
              "SDPA % ceiling"] + (["vs flex"] if flex else [])  # fmt: skip
    cells = []
    for row in summary.rows:
        if row.speedups:
            mean, span = f"{row.geomean:.2f}x", f"{min(row.speedups):.2f}x-{max(row.speedups):.2f}x"
        else:
            mean = span = "-"
        line = [row.provider, row.workload, SHORT_DTYPES.get(row.dtype, row.dtype), str(len(row.speedups)), mean,
                span, str(len(row.slower)), _percent(row.ceiling), _percent(row.baseline_ceiling)]  # fmt: skip
        if flex:
            line.append(f"{geomean(row.vs_flex):.2f}x" if row.vs_flex else "-")
        cells.append(line)
    return header, cells


def _short_case(case_id: str) -> str:
    return case_id.replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")


def format_summary(summary: Summary, slower_limit: int = 8) -> str:
    """The plain-text summary: headline, table, slower cases, ceilings (fits one screen)."""
    where = summary.device_name + (f", {summary.threads} threads" if summary.threads else "")
    lines = [f"Summary: what fusedattn gains over torch SDPA on {where}"]
    lines += [f"  {h}" for h in summary.headlines] or ["  no fusedattn result to compare"]
    header, cells = table_rows(summary)
    if cells:
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
        left = {0, 1, 2}
        fmt = [lambda text, i=i: text.ljust(widths[i]) if i in left else text.rjust(widths[i])
               for i in range(len(header))]  # fmt: skip
        lines.append("")
        lines.append("  " + "  ".join(fmt[i](h) for i, h in enumerate(header)))
        lines += ["  " + "  ".join(fmt[i](c) for i, c in enumerate(row)) for row in cells]
    if summary.slower:
        lines += ["", "Slower than SDPA:"]
        for provider, case_id, speedup in summary.slower[:slower_limit]:
            lines.append(f"  {speedup:.2f}x  {provider}  {_short_case(case_id)}")
        if len(summary.slower) > slower_limit:
            lines.append(f"  ... and {len(summary.slower) - slower_limit} more (report.md)")
    if summary.failed:
        lines += ["", f"Not measured: {len(summary.failed)} fusedattn result(s) wrong or failed:"]
        lines += [
            f"  {status:6} {provider}  {_short_case(case_id)}" for provider, case_id, status in summary.failed[:5]
        ]
    lines += ["", _ceiling_line(summary)]
    if summary.noisy:
        lines.append(_noise_line(summary))
    return "\n".join(lines)


def _noise_line(summary: Summary) -> str:
    return (
        f"Noise: {summary.noisy} of {summary.timed} timings spread by more than {NOISY:.0%} of their median "
        "(interquartile range): other load on the machine; rerun when it is idle before trusting single cases."
    )


def summary_markdown(summary: Summary) -> str:
    """The same summary as markdown (the top of report.md)."""
    where = summary.device_name + (f", {summary.threads} threads" if summary.threads else "")
    lines = [f"## Summary: fusedattn against torch SDPA on {where}", ""]
    lines += [f"- {h}" for h in summary.headlines] or ["- no fusedattn result to compare"]
    header, cells = table_rows(summary)
    if cells:
        lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    if summary.slower:
        lines += ["", "Slower than SDPA:", ""]
        lines += [f"- {speedup:.2f}x {provider} `{case_id}`" for provider, case_id, speedup in summary.slower]
    if summary.failed:
        lines += ["", "Wrong or failed (no timing counted):", ""]
        lines += [f"- {status} {provider} `{case_id}`" for provider, case_id, status in summary.failed]
    lines += ["", _ceiling_line(summary)]
    if summary.noisy:
        lines += ["", _noise_line(summary)]
    return "\n".join(lines + [""])
