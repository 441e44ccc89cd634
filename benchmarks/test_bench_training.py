"""Key training cases: forward+backward and backward alone, causal, with and without GQA."""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from bench_support import DEVICE, key_cases, run_benchmark_case  # noqa: E402

if DEVICE.type == "cuda":
    GRIDS = [
        dict(group="train", mode=["bwd", "fwd_bwd"], tokens=16384, seqlen=[2048, 8192], model_dim=2048,
             head_dim=[64, 128], causal=True, dtype="bfloat16"),
        dict(group="train-gqa", mode="fwd_bwd", tokens=16384, seqlen=4096, heads_q=32, heads_kv=8, head_dim=128,
             causal=True, dtype="bfloat16"),
    ]  # fmt: skip
else:
    GRIDS = [
        dict(group="train", mode=["bwd", "fwd_bwd"], tokens=1024, seqlen=512, model_dim=512, head_dim=64,
             causal=True),
        dict(group="train-gqa", mode="fwd_bwd", batch=1, seqlen=512, heads_q=8, heads_kv=2, head_dim=64, causal=True),
    ]  # fmt: skip

CASES = key_cases(GRIDS)


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_training(benchmark, case, provider_name):
    run_benchmark_case(benchmark, case, provider_name)
