"""`fusedattn bench`: run a preset (or --shapes, or a TOML grid) and write the report;
`fusedattn bench compare` gates regressions; `fusedattn bench list` shows presets and providers.

Exit status: 0 on success; 1 when a fusedattn backend's output failed the correctness
check or raised (run), or when a matched result regressed (compare); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cases import MODES, PRESETS, Case, dtype_name, expand_grids, load_grid_file, parse_shapes, preset_grids
from .ceilings import measure_ceilings
from .compare import parse_threshold, run_compare
from .measure import TimingSettings
from .providers import Provider, all_providers, select_providers
from .report import build_report, format_table, write_outputs
from .run import BenchSettings, run_benchmark
from .summary import format_summary, summarize

EXIT_USAGE = 2


def _argument_type(convert):
    """An argparse type from a converter raising ValueError (argparse reports it, exit 2)."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = convert.__name__
    return parse


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"expected a comma-separated list of {MODES}, got {text!r}")
    return modes


def _positive_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fusedattn bench` and its `compare` and `list` forms (see docs/benchmarks.md)."""
    parser.description = (
        "Benchmark fusedattn's backends against torch SDPA, a naive eager implementation and "
        "(when installed) flash-attn and xformers: latency, TFLOP/s, tokens/s, peak memory. "
        "Run without arguments for the quick preset on the best device present; it ends with a summary "
        "(speedup against SDPA per workload and dtype, slower cases, share of the machine's measured "
        "ceilings) and writes report.md, results.json, results.csv and charts."
    )
    grid = parser.add_argument_group("what to run")
    grid.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                      help="case grid (default quick); see `fusedattn bench list`")  # fmt: skip
    grid.add_argument("--shapes", type=_argument_type(parse_shapes), metavar="SPEC",
                      help="comma-separated BxHxSxD or BxHxSqxSkxD (H may be Hq:Hkv, D may be D:Dv) instead of a "
                           "preset, e.g. 4x16x1024x64,1x32:8x1x8192x128")  # fmt: skip
    grid.add_argument("--config", metavar="GRID.toml", help="TOML grid file instead of a preset (docs/benchmarks.md)")
    grid.add_argument("--modes", type=_argument_type(_modes), metavar="LIST",
                      help="fwd,bwd,fwd_bwd: replace every grid's modes (default for --shapes: fwd)")  # fmt: skip
    grid.add_argument("--dtype", type=_argument_type(dtype_name),
                      help="replace every grid's dtype (default bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    grid.add_argument("--causal", choices=["no", "yes", "both"],
                      help="replace every grid's causal setting (default for --shapes: no)")  # fmt: skip
    grid.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="auto (default): cuda when available, else cpu")  # fmt: skip
    grid.add_argument("--providers", metavar="LIST",
                      help="comma-separated provider names or globs (fusedattn:*, sdpa*, naive, flash-attn, xformers);"
                           " default: every available one meant for the device")  # fmt: skip
    measure = parser.add_argument_group("how to measure")
    measure.add_argument(
        "--warmup",
        type=_argument_type(_positive_float),
        default=None,
        metavar="SECONDS",
        help="untimed calls for at least this long, at least one (default 0.1 CPU, 0.05 GPU)",
    )
    measure.add_argument(
        "--min-time",
        type=_argument_type(_positive_float),
        default=None,
        metavar="SECONDS",
        help="time calls for at least this long per pair (default 0.2 CPU, 0.1 GPU)",
    )
    measure.add_argument("--min-repeats", type=_argument_type(_positive_int), default=3, metavar="N")
    measure.add_argument("--max-repeats", type=_argument_type(_positive_int), default=100, metavar="N")
    measure.add_argument("--rounds", type=_argument_type(_positive_int), default=1, metavar="N",
                         help="time each case's providers in N alternating rounds (A B, B A, ...) whose calls"
                              " are pooled, so that a burst of load falls on all of them (default 1: each"
                              " provider's calls in one block)")  # fmt: skip
    measure.add_argument("--no-l2-flush", action="store_true", help="GPU: do not flush the L2 cache between calls")
    measure.add_argument("--no-check", action="store_true", help="skip the check against the float64 reference")
    measure.add_argument("--check-rows", type=_argument_type(_positive_int), default=64, metavar="N",
                         help="query rows per checked sequence (default 64)")  # fmt: skip
    measure.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    measure.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="report folder (default bench-out/<UTC timestamp>)")
    output.add_argument("--no-plots", action="store_true", help="no PNG charts")
    output.add_argument(
        "--details",
        action="store_true",
        help="also print one table per case before the summary (report.md always has them)",
    )
    measure.add_argument(
        "--no-ceilings",
        dest="ceilings",
        action="store_false",
        help="skip measuring the matmul rate and copy bandwidth (about 2 s)",
    )
    output.add_argument("--list", action="store_true", help="print the cases and providers, run nothing")
    commands = parser.add_subparsers(dest="bench_command", metavar="{compare,list,models}")
    compare = commands.add_parser("compare", help="compare two results.json files (two machines or commits); "
                                  "exit 1 on a regression",
                                  description="Print and plot new/base time per matched (case, provider); exit 1 "
                                  "when any got slower than the threshold or stopped being ok.")  # fmt: skip
    compare.add_argument("base", metavar="BASE.json")
    compare.add_argument("new", metavar="NEW.json")
    compare.add_argument(
        "--fail-above",
        default="5%",
        type=_argument_type(lambda t: (parse_threshold(t), t)[1]),
        metavar="PERCENT",
        help="slowdown that fails the gate, e.g. 5%% (default) or 2.5",
    )
    compare.add_argument("--metric", choices=["median_ms", "min_ms", "mean_ms"], default="median_ms")
    compare.add_argument(
        "--plot",
        metavar="PNG",
        default="",
        help="where to draw the per-case ratio chart (default: compare.png next to NEW.json)",
    )
    compare.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="draw no chart")
    commands.add_parser("list", help="presets (with case counts) and providers (with availability)")
    models = commands.add_parser(
        "models", help="whole transformers models (prefill and decode tokens/s) with fusedattn, sdpa and eager",
        description="Small Llama-, Qwen- and Gemma-shaped models built from configs (no download); CPU.",
    )  # fmt: skip
    models.add_argument("--models", default="llama,qwen,gemma,gemma3", type=_argument_type(_model_names))
    models.add_argument("--contexts", default="512,2048", type=_argument_type(_int_list),
                        help="prefill lengths (default 512,2048)")  # fmt: skip
    models.add_argument("--dtype", default="float32", type=_argument_type(dtype_name))
    models.add_argument("--decode-steps", type=_argument_type(_positive_int), default=16)
    models.add_argument("--repeats", type=_argument_type(_positive_int), default=3)
    models.add_argument("--out", metavar="DIR", help="write results.json here")


def _model_names(text: str) -> list[str]:
    from .models import MODELS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ValueError(f"expected a comma-separated list of {sorted(MODELS)}, got {text!r}")
    return names


def _int_list(text: str) -> list[int]:
    return [_positive_int(part.strip()) for part in text.split(",") if part.strip()]


def _run_models(args: argparse.Namespace) -> int:
    import importlib.util
    import json

    from ..fingerprint import cpu_model, git_commit
    from .models import format_models_table, run_models

    if importlib.util.find_spec("transformers") is None:
        print("fusedattn bench models: error: transformers is not installed (pip install transformers)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    started = time.perf_counter()
    results = run_models(args.models, args.contexts, getattr(torch, args.dtype), args.decode_steps, args.repeats)
    print(format_models_table(results))
    print(f"{len(results)} result(s) in {time.perf_counter() - started:.0f}s")
    if args.out:
        import transformers

        commit, dirty = git_commit()
        document = dict(
            command="fusedattn bench models " + " ".join(sys.argv[3:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            machine=dict(cpu=cpu_model(), threads=torch.get_num_threads()),
            versions=dict(torch=torch.__version__, transformers=transformers.__version__, commit=commit, dirty=dirty),
            results=results,
        )
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {folder / 'results.json'}")
    bad = [r for r in results if r["implementation"] == "fusedattn" and r["status"] in ("wrong", "error")]
    return 1 if bad else 0


def resolve_device(name: str) -> torch.device:
    """The torch device named by --device ("auto": cuda when present, else cpu); ValueError if unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases the arguments ask for (ValueError on bad grids)."""
    overrides: dict[str, Any] = {}
    if args.modes:
        overrides["mode"] = args.modes
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.causal:
        overrides["causal"] = {"no": False, "yes": True, "both": [False, True]}[args.causal]
    if args.shapes is not None and args.config is not None:
        raise ValueError("--shapes and --config: expected at most one of them")
    if args.shapes is not None:
        defaults = {"mode": "fwd", "dtype": dtype_name("bfloat16" if device.type == "cuda" else "float32")}
        grids = [{**defaults, **grid} for grid in args.shapes]
    elif args.config is not None:
        grids = load_grid_file(args.config)
        grids = [{"dtype": "bfloat16" if device.type == "cuda" else "float32", **grid} for grid in grids]
    else:
        grids = preset_grids(args.preset, device.type)
    return expand_grids(grids, overrides)


class Progress:
    """A progress bar while the run goes (rich's when installed, a plain one otherwise), on a
    terminal only: redirected output (logs, CI) stays quiet until the summary."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.interactive:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import Progress as RichProgress
            except ImportError:  # rich is optional (the bench extra): the plain bar below
                return self
            self._rich = RichProgress(
                BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.description}"), console=Console(file=self.stream), transient=True,
            )  # fmt: skip
            self._rich.start()
            self._task = self._rich.add_task("", total=None)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.interactive:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()

    def __call__(self, done: int, total: int, case: Case, provider: Provider, result: dict[str, Any] | None) -> None:
        if not self.interactive:
            return
        label = f"{provider.name}  {case.group}  {case.case_id}"
        if self._rich is not None:
            self._rich.update(self._task, total=total, completed=done, description=label[:90])
            return
        width = 24
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.started
        text = f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {elapsed:5.0f}s  {label}"
        self.stream.write(text[:160].ljust(160))
        self.stream.flush()


def _list(device: torch.device) -> int:
    print(f"presets (cases on {device.type}):")
    for name, (_, description) in PRESETS.items():
        count = len(expand_grids(preset_grids(name, device.type)))
        print(f"  {name:12} {count:3} cases  {description}")
    print("providers:")
    for provider in all_providers():
        available, reason = provider.availability(device)
        default = "default" if available and device.type in provider.default_devices else ""
        state = "available" if available else f"unavailable: {reason}"
        print(f"  {provider.name:20} {state:32} {default:8} {provider.description}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run `fusedattn bench`; returns the exit code (0 done, 1 a compare regression, 2 bad arguments)."""
    if args.bench_command == "compare":
        return run_compare(args.base, args.new, args.fail_above, args.metric, args.plot)
    if args.bench_command == "models":
        return _run_models(args)
    try:
        device = resolve_device(args.device)
        if args.bench_command == "list":
            return _list(device)
        cases = build_cases(args, device)
        patterns = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        providers = select_providers(device, patterns)
    except (OSError, ValueError) as error:
        print(f"fusedattn bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        for case in cases:
            print(f"{case.group:14} {case.case_id}")
        print("providers: " + ", ".join(p.name for p in providers))
        return 0
    on_gpu = device.type == "cuda"
    timing = TimingSettings(
        warmup_s=args.warmup if args.warmup is not None else (0.05 if on_gpu else 0.1),
        min_time_s=args.min_time if args.min_time is not None else (0.1 if on_gpu else 0.2),
        min_repeats=args.min_repeats,
        max_repeats=max(args.max_repeats, args.min_repeats),
        flush_l2=not args.no_l2_flush,
        rounds=args.rounds,
    )
    settings = BenchSettings(device=device.type, timing=timing, check=not args.no_check, check_rows=args.check_rows,
                             measure_memory=not args.no_memory, seed=args.seed)  # fmt: skip
    preset = None if args.shapes is not None or args.config is not None else args.preset
    print(f"fusedattn bench: {len(cases)} case(s) x {len(providers)} provider(s) on {device.type} "
          f"({torch.get_num_threads()} torch threads): {', '.join(p.name for p in providers)}", flush=True)  # fmt: skip
    started = time.perf_counter()
    with Progress() as progress:
        # The ceilings come from this run, on this machine, so the summary's fractions are comparable.
        ceilings = measure_ceilings([case.dtype for case in cases], device) if args.ceilings else None
        results = run_benchmark(cases, providers, settings, progress=progress)
    report = build_report(results, settings, providers, preset=preset, ceilings=ceilings)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(args.out) if args.out else Path("bench-out") / stamp
    paths = write_outputs(report, folder, plots=not args.no_plots)
    if args.details:
        print()
        print(format_table(results))
    counts: dict[str, int] = {}
    for result in results:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    print()
    print(format_summary(summarize(report)))
    print()
    print(f"{len(results)} result(s) in {time.perf_counter() - started:.0f}s: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))  # fmt: skip
    charts = [p.name for p in paths.values() if p.suffix == ".png"]
    print(f"report written to {folder}/: report.md (summary, charts, every case), results.json, results.csv"
          + (f"; charts: {', '.join(charts)}" if charts else ""))  # fmt: skip
    bad = [r for r in results if r["provider"].startswith("fusedattn:") and r["status"] in ("wrong", "error")]
    if bad:
        for result in bad:
            print(f"FAIL: {result['provider']} on {result['case_id']}: {result['status']}: {result['reason']}")
        return 1
    return 0
