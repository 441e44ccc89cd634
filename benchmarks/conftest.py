"""Shared pieces of the pytest-benchmark suite (`pytest benchmarks/ --benchmark-json out.json`).

The suite times the key cases of `fusedattn bench` with pytest-benchmark, on CUDA when
present and otherwise on CPU. It is kept out of `tests/` and `make test`: it is slow and
measures, where the tests only check. Every benchmarked call is first checked against
the float64 reference, so a wrong kernel fails instead of being timed.
"""

from __future__ import annotations

import pytest
from bench_support import PROVIDERS


@pytest.fixture(params=[p.name for p in PROVIDERS])
def provider_name(request) -> str:
    """Every provider available on the benchmark device (fusedattn backends, SDPA, naive, ...)."""
    return request.param
