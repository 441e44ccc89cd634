"""Key inference cases: prefill (causal or not, d64/d128), decode against a long KV cache,
packed documents and a sliding window. Forward only."""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from bench_support import DEVICE, key_cases, run_benchmark_case  # noqa: E402

if DEVICE.type == "cuda":
    GRIDS = [
        dict(group="prefill", tokens=16384, seqlen=[2048, 8192], model_dim=2048, head_dim=[64, 128],
             causal=[False, True], dtype="bfloat16"),
        dict(group="decode", batch=8, heads_q=32, heads_kv=8, seqlen_q=1, seqlen_k=16384, head_dim=128, causal=True,
             dtype="bfloat16"),
        dict(group="varlen", varlen={"documents": 16, "tokens": 16384}, heads=16, head_dim=128, causal=True,
             dtype="bfloat16"),
        dict(group="window", batch=4, heads=16, seqlen=8192, head_dim=128, causal=True, window=[1023, 0],
             dtype="bfloat16"),
    ]  # fmt: skip
else:
    GRIDS = [
        dict(group="prefill", tokens=2048, seqlen=1024, model_dim=512, head_dim=[64, 128], causal=[False, True]),
        dict(group="decode", batch=2, heads_q=16, heads_kv=4, seqlen_q=1, seqlen_k=8192, head_dim=128, causal=True),
        dict(group="varlen", varlen={"documents": 6, "tokens": 2048}, heads=8, head_dim=64, causal=True),
        dict(group="window", batch=1, heads=8, seqlen=2048, head_dim=64, causal=True, window=[255, 0]),
    ]  # fmt: skip

CASES = key_cases(GRIDS)


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_inference(benchmark, case, provider_name):
    run_benchmark_case(benchmark, case, provider_name)
