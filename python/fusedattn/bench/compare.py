"""`fusedattn bench compare BASE.json NEW.json --fail-above 5%`: the regression gate.

Results are matched on (case_id, provider). A matched pair is a regression when the new
median time is more than the threshold above the base's, or when the base was "ok" and
the new result is not (wrong output, error, oom). Pairs present in one report only are
listed but never fail the gate.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

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
    for c in comparisons:
        ratio = "-" if c.ratio is None else f"{c.ratio:.3f}"
        base = "-" if c.base_ms is None else f"{c.base_ms:.4g}"
        new = "-" if c.new_ms is None else f"{c.new_ms:.4g}"
        status = "" if c.base_status == c.new_status == "ok" else f"  [{c.base_status} -> {c.new_status}]"
        flag = f"  REGRESSION: {c.reason}" if c.regressed else ""
        lines.append(f"{ratio:>7}  {base:>10}  {new:>10}  {c.provider:<20}  {c.case_id}{status}{flag}")
    if unmatched:
        lines.append(f"{len(unmatched)} result(s) in one report only (not compared):")
        lines += [f"  {key}" for key in unmatched[:20]]
        if len(unmatched) > 20:
            lines.append(f"  ... and {len(unmatched) - 20} more")
    return "\n".join(lines)


def run_compare(base_path: str, new_path: str, threshold_text: str, metric: str = "median_ms") -> int:
    """Print the comparison; 0 when nothing regressed, 1 on a regression, 2 on bad input."""
    from .report import load_report

    try:
        threshold = parse_threshold(threshold_text)
        base, new = load_report(base_path), load_report(new_path)
    except (OSError, ValueError) as error:
        print(f"fusedattn bench compare: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    comparisons, unmatched = compare_reports(base, new, threshold, metric)
    print(format_comparison(comparisons, unmatched))
    if not comparisons:
        print("fusedattn bench compare: error: no result matches between the two reports", file=sys.stderr)
        return EXIT_USAGE
    regressions = [c for c in comparisons if c.regressed]
    if regressions:
        print(f"FAIL: {len(regressions)} of {len(comparisons)} matched result(s) regressed "
              f"(more than {threshold * 100:g}% slower, or no longer ok)")  # fmt: skip
        return EXIT_REGRESSION
    print(f"PASS: {len(comparisons)} matched result(s), none more than {threshold * 100:g}% slower")
    return EXIT_OK
