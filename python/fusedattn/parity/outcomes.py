"""The outcome of one parity case on one backend: shared by the runner, the worker
processes (fusedattn.parity.isolation) and the report, so none of them imports another
for it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..testing import TensorCheck
from .cases import Case

PASS, FAIL, ERROR, SKIP = "pass", "fail", "error", "skip"


@dataclass
class Outcome:
    """One case run on one backend: its status and the check of every output tensor."""

    case: Case
    backend: str
    status: str  # pass, fail, error (the backend raised), skip (not eligible)
    checks: list[TensorCheck] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    features: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)

    @property
    def severity(self) -> float:
        """How close to (or past) its bound the worst tensor came: 1.0 is at the bound;
        inf for NaN, shape or -inf mismatches and errors."""
        if self.status == ERROR:
            return math.inf
        worst = 0.0
        for check in self.checks:
            worst = max(worst, _check_severity(check))
        return worst

    @property
    def worst_check(self) -> TensorCheck | None:
        return max(self.checks, key=_check_severity, default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.id,
            "backend": self.backend,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "severity": self.severity,
            "description": self.case.describe(),
            "features": list(self.features),
            "checks": [check.as_dict() for check in self.checks],
            "parameters": self.case.as_dict(),
        }


def _check_severity(check: TensorCheck) -> float:
    """max(error / bound, relative error / its bound); inf for NaN, -inf or shape mismatches."""
    if not (math.isfinite(check.max_error) and math.isfinite(check.relative_error)):
        return math.inf
    if check.bound > 0:
        ratio = check.max_error / check.bound
    else:
        ratio = math.inf if check.max_error > 0 else 0.0
    relative = check.relative_error / check.relative_bound if check.relative_bound > 0 else 0.0
    return max(ratio, relative)
