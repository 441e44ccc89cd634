"""The CPU decode of bfloat16 queries from an 8-bit cache, on every instruction-set variant:
on AVX512-BF16 each K/V tile becomes bfloat16 rows (csrc/cpu/attention_kernel/decode.inc,
bfloat16_vector), elsewhere float32 rows. Both conversions must be exact for every byte."""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn._native import build_info, native
from fusedattn.backends.cpu import selected_isa
from fusedattn.testing import assert_backend_matches

pytestmark = pytest.mark.skipif(native() is None, reason="fusedattn._C is not built")

KV_DTYPES = [torch.int8, torch.float8_e4m3fn]
ISAS = ["generic", "avx2", "avx512", "avx512bf16"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    variants = [s.split()[0] for s in build_info().get("simd", []) if "runtime" in s]
    if request.param not in variants:
        pytest.skip(f"{request.param} variant not compiled")
    monkeypatch.setenv("FUSEDATTN_CPU_ISA", request.param)
    try:
        assert selected_isa() == request.param
    except RuntimeError as error:  # this CPU lacks the instructions
        pytest.skip(str(error))
    return request.param


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_every_byte_is_read_exactly(isa, kv_dtype):
    # Query row 8b + h of sequence b attends only key 8b + h (one-hot scores, the others
    # exp(-5600) = 0), so its output is that key's V row exactly; V holds every byte value
    # 16 times. NaN bytes (e4m3fn S.1111.111) make their column NaN in every row (0 * NaN),
    # as in the reference: the comparison is exact, NaN included.
    batch, heads_q, heads_kv, seqlen_k, dim = 8, 8, 1, 64, 64
    top = 0x7E if kv_dtype == torch.float8_e4m3fn else 0x7F  # 448 and 127
    key_bytes = torch.zeros(batch, heads_kv, seqlen_k, dim, dtype=torch.uint8)
    key_bytes[:, :, torch.arange(seqlen_k), torch.arange(seqlen_k)] = top
    value_bytes = torch.arange(seqlen_k * dim).remainder(256).to(torch.uint8).reshape(1, 1, seqlen_k, dim)
    value_bytes = value_bytes.expand(batch, heads_kv, seqlen_k, dim).contiguous()
    k, v = key_bytes.view(kv_dtype), value_bytes.view(kv_dtype)
    q = torch.zeros(batch, heads_q, 1, dim, dtype=torch.bfloat16)
    for b in range(batch):
        for h in range(heads_q):
            q[b, h, 0, 8 * b + h] = 100.0
    out = fusedattn.attention(q, k, v, backend="cpu")
    expected = fusedattn.attention(q.double(), k, v, backend="reference").to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    finite_columns = ~expected.isnan().any(dim=(0, 1, 2))
    assert finite_columns.sum() >= dim - 2  # only the NaN bytes' columns are NaN


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("heads_q", "heads_kv", "seqlen_q", "dim", "options"),
    [
        (32, 8, 1, 128, {}),  # the shape, scaled down: 4 rows per KV head
        (8, 1, 1, 64, {"window": (100, None), "softcap": 2.0}),  # 8 rows, a window
        (2, 2, 1, 96, {"causal": True}),  # dim 96: not a multiple of 64, float32 rows
        (4, 2, 3, 64, {"causal": True, "key_lengths": True}),  # 6 rows, short sequences
    ],
)
def test_decode_matches_the_float64_oracle(isa, kv_dtype, heads_q, heads_kv, seqlen_q, dim, options):
    torch.manual_seed(0)
    seqlen_k = 333
    q = torch.randn(2, heads_q, seqlen_q, dim, dtype=torch.bfloat16)
    k = torch.randn(2, heads_kv, seqlen_k, dim, dtype=torch.bfloat16) * 2
    v = torch.randn(2, heads_kv, seqlen_k, dim, dtype=torch.bfloat16)
    if options.get("key_lengths"):
        options = {**options, "key_lengths": torch.tensor([seqlen_k, 40], dtype=torch.int32)}
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    assert_backend_matches("cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, **options)
