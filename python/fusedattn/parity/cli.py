"""`fusedattn parity`: check every backend against the float64 reference on a seeded grid.

Exit codes: 0 every check passed, 1 a check failed (or nothing was checked), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cases import FOCUS, PROFILES
from .report import print_report, write_json, write_junit
from .runner import DEFAULT_CASES, plan, run

BAD_ARGUMENTS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fusedattn parity` (see docs/parity.md)."""
    parser.add_argument(
        "--cases", type=int, default=DEFAULT_CASES, metavar="N", help="number of cases (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="grid seed (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        metavar="NAME",
        help="backend to check; repeat or comma separate (default: every available backend for the device)",
    )
    parser.add_argument(
        "--dtype", dest="dtypes", action="append", metavar="DTYPE", help="keep cases of fp16, bf16, fp32"
    )
    parser.add_argument(
        "--features",
        action="append",
        metavar="NAMES",
        help="keep cases that use all these features (comma separated names of semantics.FEATURES)",
    )
    parser.add_argument(
        "--grad", action=argparse.BooleanOptionalAction, default=True, help="also check dq, dk, dv (default: on)"
    )
    parser.add_argument("--case", dest="case_ids", action="append", metavar="ID", help="run exactly this case (c0042)")
    parser.add_argument(
        "--sizes",
        choices=("auto", *PROFILES),
        default="auto",
        help="case sizes: small (CPU) or full (GPU, sequences up to 4k); auto picks by device",
    )
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run the cases in a worker process: a backend that crashes the process fails its case instead of the run",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="fail a case that runs longer than this on one backend (a hung kernel); implies --isolate",
    )
    parser.add_argument("--json", metavar="PATH", help="write every case's errors and the environment as JSON")
    parser.add_argument("--junit", metavar="PATH", help="write JUnit XML for CI test reports")
    parser.add_argument("--show", type=int, default=20, metavar="N", help="table rows (default %(default)s)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = f"case focus cycle: {', '.join(FOCUS)}. Exit codes: 0 all passed, 1 a failure, 2 bad arguments."


class _PlainProgress:
    """A progress line every tenth of the run, for logs (no terminal control codes)."""

    def __init__(self) -> None:
        self.reported = -1

    def __call__(self, done: int, total: int, case) -> None:
        tenth = done * 10 // total
        if tenth != self.reported:
            self.reported = tenth
            print(f"parity: {done}/{total} cases ({100 * done // total}%)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _RichProgress:
    def __init__(self) -> None:
        import rich.progress

        self.bar = rich.progress.Progress(
            rich.progress.TextColumn("parity"),
            rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(),
            rich.progress.TextColumn("{task.description}"),
            rich.progress.TimeElapsedColumn(),
            transient=True,
        )
        self.task = None
        self.bar.start()

    def __call__(self, done: int, total: int, case) -> None:
        if self.task is None:
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done, description=case.id)

    def close(self) -> None:
        self.bar.stop()


def _progress(enabled: bool):
    if not enabled:
        return None
    if sys.stderr.isatty():
        try:
            return _RichProgress()
        except ImportError:
            pass
    return _PlainProgress()


def _check_output_path(option: str, path: str | None) -> str | None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        return f"{option}: the folder of {path!r} does not exist"
    return None


def main(args: argparse.Namespace) -> int:
    """Run `fusedattn parity`; returns the exit code: 0 all passed, 1 a failure, 2 bad arguments."""
    for problem in (_check_output_path("--json", args.json), _check_output_path("--junit", args.junit)):
        if problem:
            print(f"fusedattn parity: error: {problem}", file=sys.stderr)
            return BAD_ARGUMENTS
    if args.show < 0:
        print(f"fusedattn parity: error: --show: expected N >= 0, got {args.show}", file=sys.stderr)
        return BAD_ARGUMENTS
    options = dict(
        cases=args.cases,
        seed=args.seed,
        device=args.device,
        dtypes=args.dtypes,
        features=args.features,
        grad=args.grad,
        case_ids=args.case_ids,
        sizes=args.sizes,
    )
    try:
        if args.list:
            _, _, cases = plan(**options)
            for case in cases:
                print(f"{case.id}  {case.describe()}  [{', '.join(sorted(case.features(args.grad)))}]")
            return 0
        progress = _progress(not args.no_progress)
        try:
            result = run(
                backends=args.backends, progress=progress, isolate=args.isolate, timeout=args.timeout, **options
            )
        finally:
            if progress is not None:
                progress.close()
    except ValueError as error:
        print(f"fusedattn parity: error: {error}", file=sys.stderr)
        return BAD_ARGUMENTS
    print_report(result, limit=args.show)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.junit:
        write_junit(result, args.junit)
        print(f"wrote {args.junit}")
    return result.exit_code
