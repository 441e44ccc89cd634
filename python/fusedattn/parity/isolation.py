"""Running the grid in a worker process, so a kernel that crashes the process (a segfault,
a heap corruption abort) becomes one failed case with a reproducer instead of the end of
the run.

The parent writes a job file (device, seed, size profile, the (case, backend) items) and
starts ``python -m fusedattn.parity.worker JOB RESULTS``. The worker appends one JSON
line per finished item to RESULTS. When it dies, the first item without a line is the one
that killed it: the parent records it as an error and starts a new worker on the rest.
Backends must be discoverable by fusedattn.dispatch in the worker (a backend registered
at run time in the parent process is not).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..testing import TensorCheck
from .cases import Case, SizeProfile
from .outcomes import ERROR, Outcome

WORKER_COMMAND: list[str] = [sys.executable, "-m", "fusedattn.parity.worker"]
"""How the parent starts a worker; JOB and RESULTS paths are appended."""

READY = "ready"
_POLL_SECONDS = 0.2


def outcome_line(outcome: Outcome) -> str:
    return json.dumps(
        {
            "index": outcome.case.index,
            "backend": outcome.backend,
            "status": outcome.status,
            "reason": outcome.reason,
            "seconds": outcome.seconds,
            "features": list(outcome.features),
            "checks": [asdict(check) for check in outcome.checks],
        }
    )


def _outcome_from_line(record: dict[str, Any], case: Case) -> Outcome:
    return Outcome(
        case=case,
        backend=record["backend"],
        status=record["status"],
        checks=[TensorCheck(**check) for check in record["checks"]],
        reason=record["reason"],
        seconds=record["seconds"],
        features=tuple(record["features"]),
    )


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def run_isolated(
    cases: Sequence[Case],
    backends: Sequence[str],
    device: torch.device,
    profile: SizeProfile,
    seed: int,
    *,
    grad: bool,
    oracle_device: torch.device | None,
    progress: Callable[[int, int, Case], None] | None = None,
    timeout: float | None = None,
) -> list[Outcome]:
    """Outcomes of every (case, backend), computed in worker processes (see module doc).
    An item running longer than timeout seconds is killed and recorded as an error."""

    by_index = {case.index: case for case in cases}
    pending = [(case.index, name) for case in cases for name in backends]
    outcomes: list[Outcome] = []
    cases_done = 0

    def record(outcome: Outcome) -> None:
        nonlocal cases_done
        outcomes.append(outcome)
        if outcome.backend == backends[-1]:
            cases_done += 1
            if progress is not None:
                progress(cases_done, len(cases), outcome.case)

    with tempfile.TemporaryDirectory(prefix="fusedattn-parity-") as folder:
        job_path, results_path = Path(folder) / "job.json", Path(folder) / "results.jsonl"
        while pending:
            job = {
                "device": str(device),
                "seed": seed,
                "profile": profile.name,
                "grad": grad,
                "oracle_device": None if oracle_device is None else str(oracle_device),
                "items": pending,
            }
            job_path.write_text(json.dumps(job))
            results_path.write_text("")
            worker = subprocess.Popen([*WORKER_COMMAND, str(job_path), str(results_path)], stdout=subprocess.DEVNULL)
            read_lines, ready, timed_out = 0, False, False
            item_started = time.monotonic()
            while True:
                finished = worker.poll() is not None
                # Only complete lines: the last one may still be being written (or, after a
                # crash, never finished).
                complete = results_path.read_text().split("\n")[:-1]
                for line in complete[read_lines:]:
                    if line == READY:
                        ready, item_started = True, time.monotonic()
                        continue
                    item = json.loads(line)
                    record(_outcome_from_line(item, by_index[item["index"]]))
                    pending.pop(0)
                    item_started = time.monotonic()
                read_lines = len(complete)
                if finished:
                    break
                if ready and timeout is not None and time.monotonic() - item_started > timeout:
                    worker.kill()
                    worker.wait()
                    timed_out = True
                    break
                time.sleep(_POLL_SECONDS)
            if not pending:
                break
            death = _death(worker.returncode)
            if not ready:
                # The worker died before running anything: every remaining item would too.
                reason = f"the parity worker process failed to start ({death}); see its messages above"
                for index, name in pending:
                    record(Outcome(by_index[index], name, ERROR, reason=reason))
                break
            index, name = pending.pop(0)
            if timed_out:
                reason = f"killed after running for more than {timeout:g} s (--timeout)"
            else:
                reason = f"the process running this case died ({death}): a crash in the backend"
            record(Outcome(by_index[index], name, ERROR, reason=reason))
    return outcomes
