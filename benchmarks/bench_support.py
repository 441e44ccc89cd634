"""Helpers of the pytest-benchmark suite (see conftest.py)."""

from __future__ import annotations

import pytest
import torch
from fusedattn.bench.cases import Case, expand_grid
from fusedattn.bench.measure import case_flops
from fusedattn.bench.providers import Skip, make_inputs, select_providers
from fusedattn.bench.run import prepare_timed_call

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = select_providers(DEVICE)


def key_cases(grids: list[dict]) -> list[Case]:
    cases: list[Case] = []
    for grid in grids:
        cases += expand_grid(grid)
    return cases


def run_benchmark_case(benchmark, case: Case, provider_name: str) -> None:
    """Check, then time one (case, provider) pair with pytest-benchmark; skip with the reason."""
    provider = next(p for p in PROVIDERS if p.name == provider_name)
    inputs = make_inputs(case, DEVICE)
    try:
        timed, prepared, check = prepare_timed_call(case, provider, inputs)
    except Skip as skip:
        pytest.skip(str(skip))
    assert check["passed"], f"{provider_name} on {case.case_id}: {check['reason']}"
    call = timed
    if DEVICE.type == "cuda":

        def call() -> None:
            timed()
            torch.cuda.synchronize()

    benchmark.group = case.case_id
    benchmark.extra_info.update(case=case.as_dict(), flops=case_flops(case), device=str(DEVICE))
    with prepared.context():
        benchmark(call)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["tflops_median"] = case_flops(case) / median / 1e12
    benchmark.extra_info["tokens_per_s_median"] = case.query_tokens / median
