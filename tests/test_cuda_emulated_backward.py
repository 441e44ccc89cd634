"""The fp16/bf16 backward of csrc/cuda (attention_backward_mma.cuh: mma.sync, ldmatrix,
cp.async double buffering, dQ by atomics, GQA partials) on the CPU emulation, against the
float64 reference (fusedattn.testing: outputs poisoned first, every element checked).

tests/test_cuda_backend.py runs most feature cases in fp32 (the FMA kernel); here every
case runs the mma kernel in half precision with GQA, at D 32 and again above D 128 (two
warps per 16 keys, one per half of the head dim), then the shapes its tiles make special:
each head-dim bucket's tile (64, 32 and 16 queries per step), head dims below their bucket
and Dv != D, partial query and key tiles, more queries than keys, rows that are not 16-byte
aligned (plain loads instead of cp.async), packed varlen batches.
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch
from fusedattn.testing import FEATURE_CASES, assert_backend_matches, feature_case, undeclared_features


@pytest.fixture(scope="module")
def emulated():
    with cuda_emulation.registered_backend() as name:
        yield name


def _inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v=None, dtype=torch.float16):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_every_feature_on_the_mma_backward(emulated, case):
    # fp16 and bf16 in turn; 2 query heads on 1 KV head (the partials and the group sum);
    # 97 keys: a partial second key block; 70 queries: a partial second query tile.
    dtype = (torch.float16, torch.bfloat16)[list(FEATURE_CASES).index(case) % 2]
    q, k, v = _inputs(2, 2, 1, 70, 97, 32, dtype=dtype)
    options = feature_case(case, q, k)
    if missing := undeclared_features(emulated, q, k, options):
        pytest.skip(f"the cuda backend does not declare {sorted(missing)}")
    assert_backend_matches(emulated, q, k, v, **options)


# Above D 128 two warps share each 16 keys (one per half of the head dim) and add their
# partial S^T, dP^T through shared memory: every case again, over the buckets 160, 192, 224
# and 256, with D below its bucket and Dv != D in both directions.
WIDE_HEAD_DIMS = [(256, 256), (160, 160), (192, 200), (256, 136), (144, 224), (200, 200)]


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_every_feature_on_the_split_head_dim_backward(emulated, case):
    # 80 keys: a partial second key block; 37 queries: three query tiles of 16, the last partial.
    index = list(FEATURE_CASES).index(case)
    dtype = (torch.float16, torch.bfloat16)[index % 2]
    head_dim, head_dim_v = WIDE_HEAD_DIMS[index % len(WIDE_HEAD_DIMS)]
    q, k, v = _inputs(1, 2, 1, 37, 80, head_dim, head_dim_v, dtype=dtype)
    options = feature_case(case, q, k)
    if missing := undeclared_features(emulated, q, k, options):
        pytest.skip(f"the cuda backend does not declare {sorted(missing)}")
    assert_backend_matches(emulated, q, k, v, **options)


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "head_dim", "head_dim_v", "dtype", "options"),
    [
        (130, 67, 64, 64, torch.float16, {"causal": True}),  # 64 queries per step, 3 tiles
        (97, 70, 40, 40, torch.bfloat16, {"causal": True}),  # D 40 in the 64 bucket; Sq > Sk
        (45, 131, 96, 72, torch.float16, {"window": (20, 5)}),  # 32 queries per step; Dv < D
        (37, 80, 128, 128, torch.bfloat16, {"causal": True, "dropout_p": 0.2}),  # 16 per step
        (21, 66, 128, 32, torch.float16, {"softcap": 5.0}),  # Dv 32 in the 128 bucket
        (33, 40, 8, 24, torch.bfloat16, {}),  # D 8 (the 32 bucket), Dv > D
        (97, 70, 256, 256, torch.bfloat16, {"causal": True, "dropout_p": 0.2}),  # two warps per 16 keys; Sq > Sk
        (21, 131, 160, 96, torch.float16, {"window": (20, 5)}),  # three key blocks; Dv < D
    ],
)
def test_every_tile_shape(emulated, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype, options):
    q, k, v = _inputs(1, 2, 2, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype=dtype)
    assert_backend_matches(emulated, q, k, v, **options)


@pytest.mark.parametrize("head_dim", [35, 170])
def test_rows_without_16_byte_alignment(emulated, head_dim):
    # D 35 (170): rows 70 (340) bytes apart, so the tiles are read by plain loads, not cp.async.
    odd = torch.randn(1, 2, 50, 3 * head_dim, dtype=torch.float16)[..., :head_dim]
    assert_backend_matches(emulated, odd, odd.flip(2), odd, window=(20, 20))


def test_packed_varlen_batch(emulated):
    lengths_q = [5, 0, 33, 70, 1]
    lengths_k = [9, 12, 33, 80, 1]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 64, dtype=torch.bfloat16)
    k = torch.randn(sum(lengths_k), 2, 64, dtype=torch.bfloat16)
    v = torch.randn(sum(lengths_k), 2, 48, dtype=torch.bfloat16)
    assert_backend_matches(
        emulated, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k), causal=True, alibi_slopes=torch.rand(len(lengths_q), 4),
    )  # fmt: skip
