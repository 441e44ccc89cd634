"""`python -m tests.fuzz --seconds N [--seed S] [--json PATH] [--compiled-fraction F] [--entry NAME ...]`

The campaign runs in a child process (a worker) that reports each case before running it.
The parent watches: a worker that dies (a segfault, a sanitizer report, an abort) or runs
one case past --case-timeout is a crash of that case, and a new worker (another seed)
takes the remaining time. The parent prints progress and a summary, writes the JSON
figures and exits 1 when any crash or wrong result was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SANITIZER_EXIT_CODES = {86: "AddressSanitizer", 87: "UndefinedBehaviorSanitizer"}
STARTUP_SECONDS = 4.0
LIBRARY_VARIABLE = "FUSEDATTN_FUZZ_NATIVE_LIBRARY"  # a sanitized _C to load in workers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (default: from the clock)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--compiled-fraction", type=float, default=0.05,
                        help="share of cases run through torch.compile (default 0.05)")  # fmt: skip
    parser.add_argument("--entry", action="append", default=None, help="entry point(s) to fuzz (default: all)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="stop after this many chunks of examples: a fixed set of cases for a seed (CI)")  # fmt: skip
    parser.add_argument("--case-timeout", type=float, default=180.0, help="seconds before a case counts as hung")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink new failures")
    parser.add_argument("--in-process", action="store_true", help="no worker process (no segfault/hang watch)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _install_library_from_environment() -> None:
    library = os.environ.get(LIBRARY_VARIABLE)
    if library:
        from tests.sanitize.run_sanitized import install_extension

        install_extension(library)


def versions() -> dict[str, Any]:
    import fusedattn
    import hypothesis
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "hypothesis": hypothesis.__version__, "fusedattn": fusedattn.__version__}  # fmt: skip
    try:
        build = fusedattn._native.build_info()
        info["native"] = {key: build.get(key) for key in ("version", "sanitizers", "openmp", "isa") if key in build}
    except Exception as error:  # noqa: BLE001  (no native build: reported, not fatal)
        info["native"] = f"unavailable: {error}"
    return info


# ---- the worker -------------------------------------------------------------------------------
def _worker(arguments: argparse.Namespace) -> int:
    _install_library_from_environment()
    from .campaign import ENTRIES, Figures, run_campaign

    events = arguments.worker.open("a", buffering=1)

    def emit(event: str, data: dict[str, Any]) -> None:
        events.write(json.dumps({"event": event, "time": time.time(), **data}) + "\n")

    def snapshot(figures: Figures) -> None:
        emit("figures", {"figures": figures.as_dict()})

    figures = run_campaign(arguments.seconds, arguments.seed, tuple(arguments.entry or ENTRIES),
                           compiled_fraction=arguments.compiled_fraction, listener=emit, on_chunk=snapshot,
                           max_chunks=arguments.chunks,
                           shrink=not arguments.no_shrink)  # fmt: skip
    snapshot(figures)
    emit("finished", {})
    events.close()
    return 0


# ---- the supervisor ---------------------------------------------------------------------------
class Supervisor:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.snapshots: list[dict[str, Any]] = []
        self.deaths: list[dict[str, Any]] = []
        self.workers = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.arguments.seconds
        # A worker needs a few seconds to import torch; one is not started for less than that.
        while time.monotonic() < deadline - 15.0 or self.workers == 0:
            finished = self._one_worker(max(deadline - time.monotonic() - STARTUP_SECONDS, 1.0))
            if finished and self.arguments.chunks is not None:
                break  # the fixed set of chunks is done

    def _one_worker(self, seconds: float) -> bool:
        """Run one worker until it ends; True when it ended normally."""
        seed = self.arguments.seed + 7919 * self.workers
        self.workers += 1
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
            path = Path(handle.name)
        command = [sys.executable, "-m", "tests.fuzz", "--worker", str(path), "--seconds", f"{seconds:.1f}",
                   "--seed", str(seed), "--compiled-fraction", str(self.arguments.compiled_fraction)]  # fmt: skip
        for entry in self.arguments.entry or ():
            command += ["--entry", entry]
        if self.arguments.no_shrink:
            command.append("--no-shrink")
        if self.arguments.chunks is not None:
            command += ["--chunks", str(self.arguments.chunks)]
        process = subprocess.Popen(command, start_new_session=True)
        current: dict[str, Any] | None = None
        started = time.monotonic()
        last_progress = time.monotonic()
        snapshot: dict[str, Any] | None = None
        offset = 0
        hung = False
        while True:
            code = process.poll()
            with path.open() as stream:
                stream.seek(offset)
                for line in stream:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    event = json.loads(line)
                    if event["event"] == "start":
                        current, started = event, time.monotonic()
                    elif event["event"] == "done":
                        current = None
                    elif event["event"] == "figures":
                        snapshot = event["figures"]
            if code is not None:
                break
            if current is not None and time.monotonic() - started > self.arguments.case_timeout:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                hung = True
                break
            if time.monotonic() - last_progress > 30:
                self._progress(snapshot)
                last_progress = time.monotonic()
            time.sleep(0.2)
        if snapshot is not None:
            self.snapshots.append(snapshot)
        path.unlink(missing_ok=True)
        code = process.returncode
        if hung or code != 0:
            self._record_death(current, code, hung)
        return not hung and code == 0

    def _record_death(self, current: dict[str, Any] | None, code: int, hung: bool) -> None:
        if hung:
            reason = f"hang: one case ran past {self.arguments.case_timeout:.0f} s"
        elif code < 0:
            reason = f"process killed by signal {signal.Signals(-code).name}"
        else:
            reason = f"process exited with code {code} ({SANITIZER_EXIT_CODES.get(code, 'error')})"
        death = {"reason": reason, "entry": (current or {}).get("entry", "?"), "case": (current or {}).get("case"),
                 "compiled": (current or {}).get("compiled")}  # fmt: skip
        self.deaths.append(death)
        print(f"fuzz: CRASH {reason} during {death['entry']}: {death['case']}", file=sys.stderr, flush=True)

    def _progress(self, snapshot: dict[str, Any] | None) -> None:
        from .campaign import Figures

        figures = Figures.merged(self.snapshots + ([snapshot] if snapshot else []))
        totals = figures.outcome_totals()
        print(f"fuzz: {sum(figures.tried.values())} cases, " + ", ".join(f"{k} {v}" for k, v in totals.items())
              + f", {len(figures.paths)} paths", flush=True)  # fmt: skip


def summary(arguments: argparse.Namespace, figures: Any, deaths: list[dict[str, Any]], elapsed: float,
            workers: int) -> dict[str, Any]:  # fmt: skip
    crashes = [f.as_dict() for f in figures.failures.values() if f.kind == "crash"]
    crashes += [{"signature": f"{d['entry']}|crash|process|{d['reason']}", "kind": "crash", "count": 1, **d}
                for d in deaths]  # fmt: skip
    wrong = [f.as_dict() for f in figures.failures.values() if f.kind == "wrong"]
    per_entry = {entry: {"tried": n, "compiled": figures.compiled.get(entry, 0),
                         **{key.rsplit("|", 1)[1]: c for key, c in figures.outcomes.items() if key.startswith(entry + "|")}}
                 for entry, n in sorted(figures.tried.items())}  # fmt: skip
    paths_by_entry: dict[str, int] = {}
    for path in figures.paths:
        paths_by_entry[path.split("|", 1)[0]] = paths_by_entry.get(path.split("|", 1)[0], 0) + 1
    totals = figures.outcome_totals()
    totals["crash"] += len(deaths)
    return {
        "command": " ".join(["python -m tests.fuzz", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seed": arguments.seed,
        "seconds_requested": arguments.seconds,
        "seconds_run": round(elapsed, 1),
        "compiled_fraction": arguments.compiled_fraction,
        "workers": workers,
        "versions": versions(),
        "sanitized_library": os.environ.get(LIBRARY_VARIABLE),
        "inputs_tried": sum(figures.tried.values()),
        "outcomes": totals,
        "per_entry": per_entry,
        "paths_covered": len(figures.paths),
        "paths_by_entry": paths_by_entry,
        "refused_by_argument": dict(figures.refused.most_common()),
        "crashes": crashes,
        "wrong_results": wrong,
    }


def _print_summary(result: dict[str, Any]) -> None:
    print(f"fuzz: {result['inputs_tried']} inputs in {result['seconds_run']} s (seed {result['seed']}), "
          f"{result['paths_covered']} paths covered", flush=True)  # fmt: skip
    for entry, row in result["per_entry"].items():
        print(f"  {entry:32s} " + " ".join(f"{k}={v}" for k, v in row.items()))
    for name in ("crashes", "wrong_results"):
        for failure in result[name]:
            print(f"fuzz: {name[:-1] if name == 'crashes' else 'wrong'} x{failure.get('count', 1)}: "
                  f"{failure.get('reason')}\n    example: {failure.get('example') or failure.get('case')}"
                  + (f"\n    minimal: {failure['minimal']}" if failure.get("minimal") else ""))  # fmt: skip
    print(f"fuzz: crashes {len(result['crashes'])} distinct, wrong results {len(result['wrong_results'])} distinct")


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.seed is None:
        arguments.seed = int(time.time()) % 1_000_000
    if arguments.worker is not None:
        return _worker(arguments)
    from .campaign import ENTRIES, Figures, run_campaign

    unknown = set(arguments.entry or ()) - set(ENTRIES)
    if unknown:
        print(f"--entry: unknown {sorted(unknown)}; known: {list(ENTRIES)}", file=sys.stderr)
        return 2
    print(f"fuzz: {arguments.seconds:.0f} s, seed {arguments.seed}, compiled fraction "
          f"{arguments.compiled_fraction}, entries {arguments.entry or 'all'}", flush=True)  # fmt: skip
    started = time.monotonic()
    if arguments.in_process:
        _install_library_from_environment()
        figures = run_campaign(arguments.seconds, arguments.seed, tuple(arguments.entry or ENTRIES),
                               compiled_fraction=arguments.compiled_fraction, shrink=not arguments.no_shrink,
                               max_chunks=arguments.chunks)  # fmt: skip
        deaths, workers = [], 0
    else:
        supervisor = Supervisor(arguments)
        supervisor.run()
        figures, deaths, workers = Figures.merged(supervisor.snapshots), supervisor.deaths, supervisor.workers
    result = summary(arguments, figures, deaths, time.monotonic() - started, workers)
    _print_summary(result)
    if arguments.json is not None:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["crashes"] or result["wrong_results"] else 0
