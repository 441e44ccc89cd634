"""`fusedattn bench`: latency, throughput and peak memory of fusedattn against torch SDPA,
a naive eager implementation and the optional libraries (docs/benchmarks.md).

Python API::

    from fusedattn import bench
    cases = bench.preset_cases("quick", "cpu")
    results = bench.run_benchmark(cases, bench.select_providers(torch.device("cpu")), bench.BenchSettings())
    ceilings = bench.measure_ceilings(["float32", "bfloat16"], torch.device("cpu"))
    report = bench.build_report(results, bench.BenchSettings(), ceilings=ceilings)
    print(bench.format_summary(bench.summarize(report)))
    bench.write_outputs(report, "bench-out/mine")      # results.json, report.md, the charts
"""

from .cases import PRESETS, Case, expand_grid, expand_grids, load_grid_file, parse_shapes, preset_cases
from .ceilings import measure_ceilings
from .compare import compare_reports
from .measure import TimingSettings, case_flops, forward_flops, unmasked_pairs
from .providers import Provider, Skip, all_providers, select_providers
from .report import REPORT_SCHEMA, build_report, load_report, validate_report, write_outputs
from .run import BenchSettings, run_benchmark
from .summary import format_summary, summarize

__all__ = [
    "PRESETS", "Case", "expand_grid", "expand_grids", "load_grid_file", "parse_shapes", "preset_cases",
    "compare_reports", "TimingSettings", "case_flops", "forward_flops", "unmasked_pairs", "Provider", "Skip",
    "all_providers", "select_providers", "REPORT_SCHEMA", "build_report", "load_report", "validate_report",
    "write_outputs", "BenchSettings", "run_benchmark", "measure_ceilings", "summarize", "format_summary",
]  # fmt: skip
