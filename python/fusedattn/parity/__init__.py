"""Numerical parity harness: every backend against the float64 reference, on a seeded
grid of cases covering every feature (``fusedattn parity``; docs/parity.md).

    result = fusedattn.parity.run(cases=60, device="cpu")
    assert result.passed, [result.reproducer(o) for o in result.failures]
"""

from .cases import FOCUS, Case, make_case, make_inputs, select_cases
from .report import print_report, write_json, write_junit
from .runner import DEFAULT_CASES, KNOWN_LIMITATIONS, Outcome, ParityResult, plan, run

__all__ = [
    "DEFAULT_CASES",
    "FOCUS",
    "KNOWN_LIMITATIONS",
    "Case",
    "Outcome",
    "ParityResult",
    "make_case",
    "make_inputs",
    "plan",
    "print_report",
    "run",
    "select_cases",
    "write_json",
    "write_junit",
]
