"""The CPU decode of bfloat16 queries from an 8-bit cache, on every instruction-set variant:
on AVX512-BF16 K and V rows become bfloat16 in registers (decode_converted in
csrc/cpu/attention_kernel/decode_step.inc: byte tables looked up by vpermi2b where the CPU
has AVX512-VBMI, else int8 through float32 and float8 through bfloat16_vector in
decode.inc), elsewhere float32 rows. Every conversion must be exact for every byte."""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn._native import build_info, native
from fusedattn.backends.cpu import selected_isa
from fusedattn.testing import assert_backend_matches, paged_case, quantize_test_cache

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


@pytest.fixture(params=[True, False], ids=["byte-tables", "no-byte-tables"])
def byte_tables(request, isa, monkeypatch):
    """Whether the avx512bf16 decode may use its byte tables (FUSEDATTN_CPU_BYTE_TABLES=0
    turns them off; a CPU without AVX512-VBMI never uses them): both paths on one machine."""
    if not request.param:
        if isa != "avx512bf16":
            pytest.skip("only the avx512bf16 variant has byte tables")
        monkeypatch.setenv("FUSEDATTN_CPU_BYTE_TABLES", "0")
    return request.param


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_every_byte_is_read_exactly(isa, byte_tables, kv_dtype):
    # Query row 8b + h of sequence b attends only key 8b + h (one-hot scores, the others
    # exp(-5600) = 0), so its output is that key's V row exactly; V holds every byte value
    # 16 times. NaN bytes (e4m3fn S.1111.111) make their column NaN in every row (0 * NaN),
    # as in the reference: the comparison is exact, NaN included. The one-hot queries put
    # every head-dim position through the queries' pair layout of each conversion.
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
def test_decode_matches_the_float64_oracle(isa, byte_tables, kv_dtype, heads_q, heads_kv, seqlen_q, dim, options):
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


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(("heads_q", "heads_kv", "seqlen_q"), [(32, 8, 1), (4, 2, 3), (3, 3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_boolean_masks(isa, byte_tables, kv_dtype, heads_q, heads_kv, seqlen_q, causal):
    # Key padding whose tail hides whole 128-key tiles (skipped), a per-row mask that hides
    # one head's middle tile, a broadcast gap that the first query row cannot see past under
    # causal but the last one can, and a fully masked row.
    torch.manual_seed(2)
    seqlen_k = 400
    q = torch.randn(2, heads_q, seqlen_q, 64, dtype=torch.bfloat16)
    k = torch.randn(2, heads_kv, seqlen_k, 64, dtype=torch.bfloat16)
    v = torch.randn(2, heads_kv, seqlen_k, 64, dtype=torch.bfloat16)
    padding = (torch.arange(seqlen_k)[None, :] < torch.tensor([130, 300])[:, None])[:, None, None, :]
    per_row = torch.rand(2, heads_q, seqlen_q, seqlen_k) > 0.3
    per_row[0, 0, :, 128:256] = False
    per_row[1, -1, 0] = False
    gap = torch.ones(1, 1, 1, seqlen_k, dtype=torch.bool)
    gap[..., 200 : seqlen_k - seqlen_q + 1] = False
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    for mask in (padding, per_row, gap):
        assert_backend_matches(
            "cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, attn_mask=mask, causal=causal
        )


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("heads_q", "heads_kv", "seqlen_q", "options"),
    [
        (3, 3, 1, {}),  # 1 row per KV head: 16 keys per fold
        (4, 2, 1, {"dropout_p": 0.3}),  # 2 rows: 8 keys per fold
        (6, 2, 1, {"alibi_slopes": "per_head"}),  # 3 rows: 8 keys per group, folds of 2 rows and 1
        (4, 1, 2, {"causal": True}),  # 8 rows: two passes of 4 rows (8 keys, two folds each)
    ],
)
def test_every_row_count_of_the_converted_decode(isa, byte_tables, kv_dtype, heads_q, heads_kv, seqlen_q, options):
    # 333 keys: a last tile of 13 keys, not a whole group of 4, 8 or 16.
    torch.manual_seed(1)
    q = torch.randn(2, heads_q, seqlen_q, 64, dtype=torch.bfloat16)
    k = torch.randn(2, heads_kv, 333, 64, dtype=torch.bfloat16)
    v = torch.randn(2, heads_kv, 333, 64, dtype=torch.bfloat16)
    if options.get("alibi_slopes") == "per_head":
        options = {**options, "alibi_slopes": torch.rand(heads_q)}
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    assert_backend_matches("cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, **options)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_key_splits_across_threads(isa, kv_dtype):
    # One sequence and one KV head on two threads: the keys are split (partials merged by
    # their log-sum-exp); a NaN key makes its row NaN whichever split holds it.
    torch.manual_seed(2)
    q = torch.randn(1, 4, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 1500, 128, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 1500, 128, dtype=torch.bfloat16)
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_backend_matches("cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale)
        k_descale = k_descale.clone()
        k_descale.view(-1)[1400] = float("nan")
        out = fusedattn.attention(q, key_cache, value_cache, backend="cpu", k_descale=k_descale, v_descale=v_descale)
        assert out.isnan().all()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_paged_cache_and_wider_values(isa, kv_dtype):
    # Rows read through a block table (block size 24: tiles cross blocks), and Dv 192 > D 32.
    generator = torch.Generator().manual_seed(3)
    (q, key_cache, value_cache), arguments = paged_case(
        (1, 2, 1), (150, 61, 1), block_size=24, heads_q=8, heads_kv=2, head_dim=32, head_dim_v=192,
        dtype=torch.bfloat16, generator=generator,
    )  # fmt: skip
    key_cache, k_descale = quantize_test_cache(key_cache, kv_dtype)
    value_cache, v_descale = quantize_test_cache(value_cache, kv_dtype)
    out = fusedattn.attention_paged(
        q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, backend="cpu", causal=True, **arguments
    )
    expected = fusedattn.attention_paged(
        q.double(), key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, backend="reference",
        causal=True, **arguments,
    )  # fmt: skip
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
