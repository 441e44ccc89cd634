"""`fusedattn bench compare BASE.json NEW.json --fail-above 5%`: two runs side by side (two
machines, two commits) and the regression gate.

Results are matched on (case_id, provider). It prints the per-case time ratio, a per-provider
summary (geometric mean of the speed ratio, and each run's speedup against SDPA) and draws
compare.png. A matched pair is a regression when the new median time is more than the
threshold above the base's, or when the base was "ok" and the new result is not (wrong
output, error, oom). Pairs present in one report only are listed but never fail the gate.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .summary import geomean

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2


def parse_threshold(text: str) -> float:
    """ "5%", "5" or "2.5%" -> 0.05 / 0.025 (a fraction); ValueError for anything else."""
    value = str(text).strip().removesuffix("%").strip()
    try:
        percent = float(value)
    except ValueError:
        raise ValueError(f"--fail-above: expected a percentage such as 5% or 2.5, got {text!r}") from None
    if not percent >= 0 or percent == float("inf"):
        raise ValueError(f"--fail-above: expected a finite percentage >= 0, got {text!r}")
    return percent / 100.0


@dataclass(frozen=True)
class Comparison:
    """One matched (case_id, provider) pair."""

    case_id: str
    provider: str
    base_ms: float | None
    new_ms: float | None
    base_status: str
    new_status: str
    ratio: float | None  # new / base median time; > 1 is slower
    regressed: bool
    reason: str


def compare_reports(
    base: dict[str, Any], new: dict[str, Any], threshold: float, metric: str = "median_ms"
) -> tuple[list[Comparison], list[str]]:
    """(matched pairs, keys "case_id [provider]" found in only one report)."""
    base_results = {(r["case_id"], r["provider"]): r for r in base["results"]}
    new_results = {(r["case_id"], r["provider"]): r for r in new["results"]}
    comparisons = []
    for key, new_result in new_results.items():
        base_result = base_results.get(key)
        if base_result is None:
            continue
        base_ms = base_result["timing"][metric] if base_result["timing"] else None
        new_ms = new_result["timing"][metric] if new_result["timing"] else None
        ratio = new_ms / base_ms if base_ms and new_ms is not None else None
        regressed, reason = False, ""
        if base_result["status"] == "ok" and new_result["status"] != "ok":
            regressed, reason = True, f"was ok, now {new_result['status']}: {new_result['reason']}"
        elif base_result["status"] == "ok" and ratio is not None and ratio > 1.0 + threshold:
            regressed, reason = True, f"{(ratio - 1) * 100:.1f}% slower (limit {threshold * 100:g}%)"
        comparisons.append(Comparison(key[0], key[1], base_ms, new_ms, base_result["status"], new_result["status"],
                                      ratio, regressed, reason))  # fmt: skip
    unmatched = sorted(f"{c} [{p}]" for c, p in set(base_results) ^ set(new_results))
    return comparisons, unmatched


def format_comparison(comparisons: list[Comparison], unmatched: list[str]) -> str:
    """The comparison table: one line per matched pair, then the unmatched keys."""
    lines = [f"{'ratio':>7}  {'base ms':>10}  {'new ms':>10}  {'provider':<20}  case"]
    # Pairs skipped in both runs (Triton on a CPU, SDPA on softcap) say nothing: counted, not listed.
    skipped = [c for c in comparisons if c.base_status == c.new_status == "skipped"]
    for c in comparisons:
        if c.base_status == c.new_status == "skipped":
            continue
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        base = "-" if c.base_ms is None else f"{c.base_ms:.4g}"
        new = "-" if c.new_ms is None else f"{c.new_ms:.4g}"
        status = "" if c.base_status == c.new_status == "ok" else f"  [{c.base_status} -> {c.new_status}]"
        flag = f"  REGRESSION: {c.reason}" if c.regressed else ""
        lines.append(f"{ratio:>7}  {base:>10}  {new:>10}  {c.provider:<20}  {c.case_id}{status}{flag}")
    if skipped:
        lines.append(f"{len(skipped)} pair(s) skipped in both runs (not listed)")
    if unmatched:
        lines.append(f"{len(unmatched)} result(s) in one report only (not compared):")
        lines += [f"  {key}" for key in unmatched[:20]]
        if len(unmatched) > 20:
            lines.append(f"  ... and {len(unmatched) - 20} more")
    return "\n".join(lines)


def run_label(report: dict[str, Any]) -> str:
    """Which run a report is: machine, commit and date."""
    env = report.get("environment", {})
    commit = env.get("commit") or "unknown commit"
    commit = commit[:10] + ("+dirty" if env.get("commit_dirty") else "")
    return f"{env.get('device_name') or env.get('device')} @ {commit}, {str(report.get('created', ''))[:16]}"


def provider_summary(comparisons: list[Comparison], base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Per provider: geometric mean and range of the speed ratio (base time / new time, > 1 = NEW
    faster) and, for fusedattn's providers, each run's geometric-mean speedup against SDPA."""
    lines = []
    providers = sorted({c.provider for c in comparisons}, key=lambda n: (not n.startswith("fusedattn:"), n))
    for provider in providers:
        speeds = [1 / c.ratio for c in comparisons if c.provider == provider and c.ratio
                  and c.base_status == c.new_status == "ok"]  # fmt: skip
        if not speeds:
            continue
        text = (f"  {provider:<20} NEW is {geomean(speeds):.2f}x BASE's speed (geomean of {len(speeds)}; "
                f"{min(speeds):.2f}x to {max(speeds):.2f}x)")  # fmt: skip
        if provider.startswith("fusedattn:"):
            text += f"; vs SDPA: {_speedup(base, provider)} on BASE, {_speedup(new, provider)} on NEW"
        lines.append(text)
    return lines


def _speedup(report: dict[str, Any], provider: str) -> str:
    """Geometric-mean speedup against SDPA, from the times (the stored ratios may be stale)."""
    ok = {(r["case_id"], r["provider"]): r["timing"]["median_ms"] for r in report["results"] if r["status"] == "ok"}
    values = [ok[(case_id, "sdpa")] / ms for (case_id, name), ms in ok.items()
              if name == provider and (case_id, "sdpa") in ok]  # fmt: skip
    return f"{geomean(values):.2f}x" if values else "-"


def _plot(comparisons: list[Comparison], base: dict[str, Any], new: dict[str, Any], threshold: float,
          path: Path) -> bool:  # fmt: skip
    from .plots import compare_chart

    cases = {r["case_id"]: r["case"] for r in base["results"]}
    rows = [(c.provider, cases[c.case_id], 1 / c.ratio) for c in comparisons
            if c.ratio and c.base_status == c.new_status == "ok" and c.provider != "naive"]  # fmt: skip
    return compare_chart(rows, run_label(base), run_label(new), threshold, path)


def run_compare(
    base_path: str, new_path: str, threshold_text: str, metric: str = "median_ms", plot: str | None = ""
) -> int:
    """Print the comparison (and draw it: plot is the PNG path, "" for compare.png next to NEW,
    None for none); 0 when nothing regressed, 1 on a regression, 2 on bad input."""
    from .report import load_report

    try:
        threshold = parse_threshold(threshold_text)
        base, new = load_report(base_path), load_report(new_path)
    except (OSError, ValueError) as error:
        print(f"fusedattn bench compare: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    comparisons, unmatched = compare_reports(base, new, threshold, metric)
    print(f"BASE: {base_path}  ({run_label(base)})")
    print(f"NEW:  {new_path}  ({run_label(new)})")
    print(format_comparison(comparisons, unmatched))
    if not comparisons:
        print("fusedattn bench compare: error: no result matches between the two reports", file=sys.stderr)
        return EXIT_USAGE
    summary = provider_summary(comparisons, base, new)
    if summary:
        print("Speed of NEW against BASE (base time / new time):")
        print("\n".join(summary))
    if plot is not None:
        path = Path(plot) if plot else Path(new_path).parent / "compare.png"
        try:
            if _plot(comparisons, base, new, threshold, path):
                print(f"chart written to {path}")
        except OSError as error:  # an unwritable folder must not change the gate's answer
            print(f"fusedattn bench compare: no chart: {error}", file=sys.stderr)
    if base.get("environment", {}).get("device_name") != new.get("environment", {}).get("device_name"):
        print("note: the two runs come from different machines; the gate below compares their times as they are")
    regressions = [c for c in comparisons if c.regressed]
    if regressions:
        print(f"FAIL: {len(regressions)} of {len(comparisons)} matched result(s) regressed "
              f"(more than {threshold * 100:g}% slower, or no longer ok)")  # fmt: skip
        return EXIT_REGRESSION
    print(f"PASS: {len(comparisons)} matched result(s), none more than {threshold * 100:g}% slower")
    return EXIT_OK
