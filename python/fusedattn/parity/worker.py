"""Entry point of a parity worker process: ``python -m fusedattn.parity.worker JOB RESULTS``
(see fusedattn.parity.isolation). A module of its own, so that running it does not
re-execute a module the package already imported, and so that isolation (the parent's
side) never imports the runner."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..dispatch import registry
from .cases import PROFILES, make_case
from .isolation import READY, outcome_line
from .runner import run_case


def worker_main(argv: Sequence[str]) -> int:
    """Run the items of a job file, appending one JSON line per finished item."""
    job_path, results_path = argv
    job = json.loads(Path(job_path).read_text())
    device = torch.device(job["device"])
    oracle_device = None if job["oracle_device"] is None else torch.device(job["oracle_device"])
    profile = PROFILES[job["profile"]]
    backends = registry()
    with open(results_path, "a", buffering=1) as results:
        results.write(READY + "\n")
        for index, name in job["items"]:
            case = make_case(index, job["seed"], profile)
            (outcome,) = run_case(case, [backends[name]], device, grad=job["grad"], oracle_device=oracle_device)
            results.write(outcome_line(outcome) + "\n")
            results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
