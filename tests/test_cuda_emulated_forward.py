"""The fp16/bf16 forward of csrc/cuda (attention_forward_mma.cuh: mma.sync, ldmatrix,
cp.async, split-KV) on the CPU emulation, against the float64 reference.

tests/test_cuda_backend.py runs most feature cases in fp32 (the FMA kernel); here every case
runs in fp16 on the mma kernel, then the shapes its tiles make special: query and key
counts that leave partial tiles (cp.async zero-fills the rows past the end), head dims
below their bucket (zero-filled columns), and decode calls that the launcher splits over
keys (checked to be split, and to match). Forward only: tests/test_cuda_emulated_backward.py
does the same for the fp16/bf16 backward.
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch
from fusedattn.testing import FEATURE_CASES, check_backend, feature_case, undeclared_features


@pytest.fixture(scope="module")
def emulated():
    with cuda_emulation.registered_backend() as name:
        yield name


def assert_forward_matches(backend, q, k, v, **options):
    """out and lse of the backend against the float64 reference (fusedattn.testing)."""
    failures = [c for c in check_backend(backend, q, k, v, grad=False, **options) if not c.passed]
    assert not failures, "; ".join(f"{c.name}: {c.reason}" for c in failures)


def _splits_of_last_launch() -> int:
    return int(torch.ops.fusedattn_cuda_emulation.forward_splits_of_last_launch())


def _inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v=None, dtype=torch.float16):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_every_feature_on_the_mma_kernel(emulated, case):
    q, k, v = _inputs(2, 2, 1, 70, 97, 32)
    options = feature_case(case, q, k)
    if missing := undeclared_features(emulated, q, k, options):
        pytest.skip(f"the cuda backend does not declare {sorted(missing)}")
    assert_forward_matches(emulated, q, k, v, **options)
    assert _splits_of_last_launch() == 1  # 4 blocks, 2 key tiles: no split


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "head_dim", "head_dim_v", "dtype"),
    [
        (130, 67, 64, 64, torch.float16),  # a second query tile of 2 rows, a key tile of 3
        (129, 200, 40, 40, torch.bfloat16),  # D 40 in the 64 bucket: 24 zero-filled columns
        (17, 131, 96, 72, torch.float16),  # Dv < D, both below the 96 bucket
        (5, 33, 200, 200, torch.bfloat16),  # the 224 bucket (32-key tiles)
    ],
)
def test_partial_tiles_are_zero_filled(emulated, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype):
    q, k, v = _inputs(1, 2, 1, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype=dtype)
    assert_forward_matches(emulated, q, k, v, causal=True)


@pytest.mark.parametrize(
    ("seqlen_k", "splits", "options"),
    [
        (700, 5, {}),  # 11 key tiles of 64 for 2 blocks on 132 SMs: 5 splits of 2 or 3 tiles
        (300, 2, {"causal": True, "key_lengths": "random"}),
        (300, 2, {"window": (200, 0), "sinks": "per_head", "softcap": 4.0}),
        (300, 2, {"alibi_slopes": "per_head", "dropout_p": 0.1}),
    ],
    ids=["plain", "causal-key_lengths", "window-sinks-softcap", "alibi-dropout"],
)
def test_decode_is_split_over_keys_and_matches(emulated, seqlen_k, splits, options):
    q, k, v = _inputs(1, 2, 1, 1, seqlen_k, 64)
    resolved = dict(options)
    if options.get("key_lengths") == "random":
        resolved["key_lengths"] = torch.tensor([60], dtype=torch.int32)  # one key tile: split 1 sees none
    for name in ("alibi_slopes", "sinks"):
        if options.get(name) == "per_head":
            resolved[name] = torch.rand(2)
    assert_forward_matches(emulated, q, k, v, **resolved)
    assert _splits_of_last_launch() == splits


def test_split_decode_with_a_varlen_batch(emulated):
    lengths_k = [1, 0, 500, 900]
    cu_q = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(4, 2, 64, dtype=torch.bfloat16)
    k = torch.randn(sum(lengths_k), 1, 64, dtype=torch.bfloat16)
    v = torch.randn(sum(lengths_k), 1, 64, dtype=torch.bfloat16)
    assert_forward_matches(
        emulated, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=900,
    )  # fmt: skip
    assert _splits_of_last_launch() > 1
