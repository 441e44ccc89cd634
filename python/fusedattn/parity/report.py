"""Reports of a parity run: a terminal table (worst cases first), JSON and JUnit XML."""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from .outcomes import ERROR, FAIL, SKIP, Outcome
from .runner import ParityResult

try:  # rich is optional: plain text otherwise
    import rich.box
    import rich.console
    import rich.table
except ImportError:  # pragma: no cover - exercised only without rich
    rich = None


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def _row(outcome: Outcome) -> list[str]:
    worst = outcome.worst_check
    if worst is None:
        tensor = error = bound = relative = "-"
    else:
        tensor, error, bound = worst.name, _number(worst.max_error), _number(worst.bound)
        relative = f"{_number(worst.relative_error)}/{_number(worst.relative_bound)}"
    return [
        outcome.status.upper(),
        outcome.case.id,
        outcome.backend,
        tensor,
        error,
        bound,
        relative,
        _number(outcome.severity),
        outcome.case.describe(),
    ]


_HEADERS = ["status", "case", "backend", "worst", "max err", "bound", "rel err/bound", "ratio", "case description"]
_NARROW_COLUMNS = (0, 1, 2, 3, 7, 8)


def _table_rows(result: ParityResult, limit: int) -> list[Outcome]:
    """Every failure, then the closest calls among the passes, up to limit rows."""
    ordered = result.worst_first()
    failures = [o for o in ordered if o.failed]
    return failures + [o for o in ordered if not o.failed][: max(0, limit - len(failures))]


def _skip_summary(result: ParityResult) -> list[str]:
    reasons = Counter((o.backend, o.reason) for o in result.outcomes if o.status == SKIP)
    return [f"  {backend}: {count} x {reason}" for (backend, reason), count in reasons.most_common()]


def print_report(result: ParityResult, stream: TextIO | None = None, limit: int = 20) -> None:
    """The table (failures, then the passes closest to their bounds), skips, reproducers
    and a one-line verdict."""
    stream = stream or sys.stdout
    rows = _table_rows(result, limit)
    title = f"fusedattn parity on {result.options['device']} (ratio = error / bound; a pass needs ratio <= 1)"
    if rich is not None:
        width = None if stream.isatty() else 200
        console = rich.console.Console(file=stream, width=width, highlight=False)
        # A narrow terminal keeps the ratio and drops the raw numbers (all in --json).
        columns = range(len(_HEADERS)) if console.width >= 140 else _NARROW_COLUMNS
        table = rich.table.Table(title=title, title_justify="left", box=rich.box.SIMPLE_HEAD)
        for index in columns:
            last = index == len(_HEADERS) - 1
            table.add_column(_HEADERS[index], overflow="fold", no_wrap=not last, min_width=24 if last else None)
        styles = {FAIL: "bold red", ERROR: "bold red"}
        for outcome in rows:
            cells = _row(outcome)
            table.add_row(*(cells[i] for i in columns), style=styles.get(outcome.status))
        console.print(table)
    else:
        lines = [_HEADERS] + [_row(o) for o in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADERS) - 1)]
        print(title, file=stream)
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1], file=stream)
    shown = len(rows)
    if shown < len(result.checked):
        print(
            f"({len(result.checked) - shown} more passing runs not shown; --show N or --json PATH for all)", file=stream
        )
    if result.not_run:
        print("backends not run:", file=stream)
        for name, reason in result.not_run.items():
            print(f"  {name}: {reason}", file=stream)
    skips = _skip_summary(result)
    if skips:
        print("skipped (backend: count x reason):", file=stream)
        for line in skips:
            print(line, file=stream)
    for outcome in result.failures:
        print(f"FAILED {outcome.case.id} on {outcome.backend}: {outcome.reason}", file=stream)
        print(f"  reproduce: {result.reproducer(outcome)}", file=stream)
    counts = result.counts()
    backends = ", ".join(result.options["backends"]) or "none"
    verdict = "PASSED" if result.passed else "FAILED"
    if not result.checked:
        verdict = "FAILED (nothing was checked)"
    print(
        f"{verdict}: {result.options['cases']} cases x backends [{backends}]: {counts['pass']} passed, "
        f"{counts['fail']} failed, {counts['error']} errors, {counts['skip']} skipped in {result.seconds:.1f}s",
        file=stream,
    )


# ---- JSON -------------------------------------------------------------------------------
def _strict_json(value: Any) -> Any:
    """Non-finite floats as the strings "nan", "inf", "-inf" (JSON has no literal for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_json(result: ParityResult, path: str | Path) -> None:
    """Every case's errors, the options and the environment, as strict JSON."""
    document = _strict_json(result.as_dict())
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


# ---- JUnit XML --------------------------------------------------------------------------
def _details(result: ParityResult, outcome: Outcome) -> str:
    lines = [outcome.case.describe(), f"reproduce: {result.reproducer(outcome)}"]
    for check in outcome.checks:
        verdict = "ok  " if check.passed else "FAIL"
        lines.append(
            f"{verdict} {check.name}: max error {_number(check.max_error)} (bound {_number(check.bound)}, "
            f"reference error {_number(check.reference_error)}), relative {_number(check.relative_error)} "
            f"(bound {_number(check.relative_bound)}) {check.reason}".rstrip()
        )
    return "\n".join(lines)


def write_junit(result: ParityResult, path: str | Path) -> None:
    """One <testsuite> per backend and one <testcase> per case, for CI test reports."""
    root = ElementTree.Element("testsuites", name="fusedattn parity", time=f"{result.seconds:.3f}")
    by_backend: dict[str, list[Outcome]] = {}
    for outcome in result.outcomes:
        by_backend.setdefault(outcome.backend, []).append(outcome)
    totals = Counter()
    for backend, outcomes in by_backend.items():
        counts = Counter(o.status for o in outcomes)
        suite = ElementTree.SubElement(
            root,
            "testsuite",
            name=f"fusedattn.parity.{backend}",
            tests=str(len(outcomes)),
            failures=str(counts[FAIL]),
            errors=str(counts[ERROR]),
            skipped=str(counts[SKIP]),
            time=f"{sum(o.seconds for o in outcomes):.3f}",
        )
        properties = ElementTree.SubElement(suite, "properties")
        for key in ("device", "device_name", "torch", "triton", "fusedattn", "git_commit", "oracle"):
            value = result.environment.get(key)
            ElementTree.SubElement(properties, "property", name=key, value="" if value is None else str(value))
        ElementTree.SubElement(properties, "property", name="seed", value=str(result.options["seed"]))
        for outcome in outcomes:
            testcase = ElementTree.SubElement(
                suite,
                "testcase",
                classname=f"fusedattn.parity.{backend}",
                name=f"{outcome.case.id} {outcome.case.describe()}",
                time=f"{outcome.seconds:.3f}",
            )
            if outcome.status == FAIL:
                failure = ElementTree.SubElement(testcase, "failure", message=outcome.reason, type="ParityMismatch")
                failure.text = _details(result, outcome)
            elif outcome.status == ERROR:
                error = ElementTree.SubElement(testcase, "error", message=outcome.reason, type="BackendError")
                error.text = _details(result, outcome)
            elif outcome.status == SKIP:
                ElementTree.SubElement(testcase, "skipped", message=outcome.reason)
        totals.update(counts)
    root.set("tests", str(len(result.outcomes)))
    root.set("failures", str(totals[FAIL]))
    root.set("errors", str(totals[ERROR]))
    root.set("skipped", str(totals[SKIP]))
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
