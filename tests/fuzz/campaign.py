"""The hypothesis-driven loop: entry points in turn, chunks of examples, until the deadline.

Each chunk is one hypothesis run of one entry point's strategy (seeded from the campaign
seed and the chunk number, no example database). The test body classifies every case and
records the figures. The first case of a new failure (a crash or wrong result whose
signature was not seen before) is raised to hypothesis, which shrinks it: the smallest
case with the same signature is kept as the failure's minimal example. Shrinking gets at
most SHRINK_SECONDS per failure.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from . import compat, compiled, dense, module
from .case import Case
from .oracle import OUTCOMES, Outcome, classify

STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Case]]] = {
    "attention": dense.attention_cases,
    "attention_varlen": dense.varlen_cases,
    "scaled_dot_product_attention": dense.sdpa_cases,
    "flash_attn_func": compat.flash_attn_func_cases,
    "flash_attn_varlen_func": compat.varlen_cases,
    "flash_attn_varlen_func[paged]": compat.paged_varlen_cases,
    "flash_attn_with_kvcache": compat.kvcache_cases,
    "flash_attn_with_kvcache[paged]": compat.paged_kvcache_cases,
    "MultiheadAttention": module.multihead_cases,
}
ENTRIES = tuple(STRATEGIES)
CHUNK_EXAMPLES = 25
SHRINK_SECONDS = 60.0


class FailureFound(Exception):
    """Raised inside the hypothesis test so that it shrinks a new failure."""


@dataclass
class Failure:
    signature: str
    entry: str
    kind: str
    reason: str
    example: str
    compiled: bool
    count: int = 1
    minimal: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Figures:
    """Everything the campaign counts; merged across worker processes by the runner."""

    tried: Counter[str] = field(default_factory=Counter)
    compiled: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # "entry|kind"
    refused: Counter[str] = field(default_factory=Counter)  # "entry|argument"
    paths: set[str] = field(default_factory=set)
    failures: dict[str, Failure] = field(default_factory=dict)

    def record(self, case: Case, compiled_run: bool, outcome: Outcome) -> None:
        self.tried[case.entry] += 1
        self.compiled[case.entry] += compiled_run
        self.outcomes[f"{case.entry}|{outcome.kind}"] += 1
        if outcome.kind == "refused":
            self.refused[f"{case.entry}|{outcome.argument}"] += 1
        mode = "compiled" if compiled_run else "eager"
        self.paths.add("|".join((case.entry, case.backend, mode, case.feature_key(), outcome.kind,
                                 outcome.argument or "-")))  # fmt: skip
        if outcome.kind in ("crash", "wrong"):
            signature = outcome.signature(case)
            if signature in self.failures:
                self.failures[signature].count += 1
            else:
                self.failures[signature] = Failure(signature, case.entry, outcome.kind, outcome.reason,
                                                   case.describe(), compiled_run)  # fmt: skip
                _save_case(case, signature)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tried": dict(self.tried),
            "compiled": dict(self.compiled),
            "outcomes": dict(self.outcomes),
            "refused": dict(self.refused),
            "paths": sorted(self.paths),
            "failures": [f.as_dict() for f in self.failures.values()],
        }

    @classmethod
    def merged(cls, snapshots: list[dict[str, Any]]) -> Figures:
        figures = cls()
        for snapshot in snapshots:
            figures.tried.update(snapshot["tried"])
            figures.compiled.update(snapshot["compiled"])
            figures.outcomes.update(snapshot["outcomes"])
            figures.refused.update(snapshot["refused"])
            figures.paths.update(snapshot["paths"])
            for failure in snapshot["failures"]:
                known = figures.failures.get(failure["signature"])
                if known is None:
                    figures.failures[failure["signature"]] = Failure(**failure)
                else:
                    known.count += failure["count"]
                    known.minimal = known.minimal or failure["minimal"]
        return figures

    def outcome_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(OUTCOMES, 0)
        for key, count in self.outcomes.items():
            totals[key.rsplit("|", 1)[1]] += count
        return totals


def _save_case(case: Case, signature: str) -> None:
    """With FUSEDATTN_FUZZ_SAVE=DIR, the first case of each failure is saved there
    (torch.load it and call case["function"] on case["args"], case["kwargs"] to replay)."""
    directory = os.environ.get("FUSEDATTN_FUZZ_SAVE")
    if not directory:
        return
    path = Path(directory) / f"{hashlib.sha1(signature.encode()).hexdigest()[:12]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"entry": case.entry, "signature": signature, "description": case.describe(), "args": _detached(case.args),
                "kwargs": _detached(case.kwargs), "backend": case.backend}, path)  # fmt: skip


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


Listener = Callable[[str, dict[str, Any]], None]
"""(event, data): "start" before a case runs (for the hang and crash watch), "done" after it."""


def run_chunk(
    entry: str,
    chunk_seed: int,
    figures: Figures,
    *,
    deadline: float,
    compiled_fraction: float,
    examples: int = CHUNK_EXAMPLES,
    listener: Listener | None = None,
    shrink: bool = True,
) -> None:
    """One hypothesis run of entry's strategy; outcomes go into figures."""
    state: dict[str, Any] = {"signature": None, "until": 0.0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=(Phase.generate, Phase.shrink) if shrink else (Phase.generate,))  # fmt: skip
    @hypothesis_seed(chunk_seed)
    @given(case=STRATEGIES[entry](), compile_draw=st.integers(0, 999))
    def body(case: Case, compile_draw: int) -> None:
        shrinking = state["signature"] is not None
        if shrinking and time.monotonic() > state["until"]:
            return
        if not shrinking and time.monotonic() > deadline:
            return
        # Every n-th case is compiled: a drawn number would be skewed towards 0 by hypothesis.
        state["count"] = state.get("count", 0) + 1
        every = round(1 / compiled_fraction) if compiled_fraction > 0 else 0
        compiled_run = case.compilable and every > 0 and (state["count"] + compile_draw) % every == 0
        if listener is not None:
            listener("start", {"entry": entry, "case": case.describe(), "compiled": compiled_run})
        outcome = classify(case, compiled_run)
        if listener is not None:
            listener("done", {})
        if shrinking:
            if outcome.kind in ("crash", "wrong") and outcome.signature(case) == state["signature"]:
                figures.failures[state["signature"]].minimal = case.describe()
                raise FailureFound(state["signature"])
            return
        figures.record(case, compiled_run, outcome)
        if shrink and outcome.kind in ("crash", "wrong"):
            failure = figures.failures[outcome.signature(case)]
            if failure.count == 1:
                failure.minimal = case.describe()
                state.update(signature=failure.signature, until=time.monotonic() + SHRINK_SECONDS)
                raise FailureFound(failure.signature)

    try:
        body()
    except FailureFound:
        pass
    except Exception as error:  # noqa: BLE001  (hypothesis' Flaky after a shrink cut short, and the like)
        if state["signature"] is None:
            raise
        del error


def run_campaign(
    seconds: float,
    seed: int,
    entries: tuple[str, ...] = ENTRIES,
    *,
    compiled_fraction: float = 0.05,
    listener: Listener | None = None,
    on_chunk: Callable[[Figures], None] | None = None,
    shrink: bool = True,
    max_chunks: int | None = None,
) -> Figures:
    """Chunks of every entry point in turn until seconds have passed (or max_chunks ran)."""
    compiled.configure()
    figures = Figures()
    deadline = time.monotonic() + seconds
    chunk = 0
    while time.monotonic() < deadline and (max_chunks is None or chunk < max_chunks):
        entry = entries[chunk % len(entries)]
        run_chunk(entry, seed * 100_003 + chunk, figures, deadline=deadline, compiled_fraction=compiled_fraction,
                  listener=listener, shrink=shrink)  # fmt: skip
        chunk += 1
        if on_chunk is not None:
            on_chunk(figures)
    return figures
