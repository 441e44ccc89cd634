"""The C++ CPU backend against the float64 reference, feature by feature.

Every check goes through fusedattn.testing.assert_backend_matches: outputs are poisoned
with NaN before the kernels run and out, lse, dq, dk, dv are compared with the oracle.
"""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn import semantics
from fusedattn.backends.base import poisoned_outputs
from fusedattn.backends.cpu import BACKEND
from fusedattn.backends.reference import reference_attention
from fusedattn.testing import FEATURE_CASES, assert_backend_matches, feature_case
from fusedattn.validation import validate_attention

available, why = BACKEND.availability()
pytestmark = pytest.mark.skipif(not available, reason=f"cpu backend unavailable: {why}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=17, seqlen_k=33, dim=40, dim_v=None, dtype=torch.float32):
    """Random dense q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(batch, heads_q, seqlen_q, dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, dim_v, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(FEATURE_CASES), ids=list(FEATURE_CASES))
def test_features(case: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(dtype=dtype)
    assert_backend_matches("cpu", q, k, v, **feature_case(case, q, k))


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k"),
    [(1, 1), (1, 7), (7, 1), (7, 17), (17, 7), (127, 127), (1, 127), (127, 17)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_awkward_lengths(seqlen_q: int, seqlen_k: int, causal: bool) -> None:
    q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, dim=24)
    assert_backend_matches("cpu", q, k, v, causal=causal)


@pytest.mark.parametrize("dim", [1, 16, 40, 80, 96, 112, 192, 256])
def test_head_dims(dim: int) -> None:
    q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=1, seqlen_q=9, seqlen_k=70, dim=dim)
    assert_backend_matches("cpu", q, k, v, causal=True)


@pytest.mark.parametrize(("dim", "dim_v"), [(64, 32), (16, 80), (40, 256), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_value_head_dim(dim: int, dim_v: int, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=2, seqlen_q=19, seqlen_k=45, dim=dim, dim_v=dim_v, dtype=dtype)
    assert_backend_matches("cpu", q, k, v, causal=True)


@pytest.mark.parametrize(("heads_q", "heads_kv"), [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3)])
def test_gqa(heads_q: int, heads_kv: int) -> None:
    q, k, v = make_qkv(batch=2, heads_q=heads_q, heads_kv=heads_kv, seqlen_q=21, seqlen_k=30, dim=32)
    assert_backend_matches("cpu", q, k, v, causal=True, dropout_p=0.1)


def test_non_contiguous_inputs() -> None:
    # (B, S, H, D) storage viewed as (B, H, S, D), and a strided feature dimension.
    q = torch.randn(2, 13, 4, 32).transpose(1, 2)
    k = torch.randn(2, 29, 2, 64)[..., ::2].transpose(1, 2)
    v = torch.randn(2, 2, 48, 29).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = (torch.rand(2, 4, 29, 13) > 0.2).transpose(-1, -2)  # non-contiguous key stride
    assert_backend_matches("cpu", q, k, v, attn_mask=mask, causal=True)


def test_fully_masked_rows() -> None:
    q, k, v = make_qkv(batch=2, heads_q=2, heads_kv=1, seqlen_q=10, seqlen_k=10, dim=16)
    mask = torch.ones(2, 2, 10, 10, dtype=torch.bool)
    mask[0, :, 3] = False
    mask[1, 1] = False  # a whole head
    assert_backend_matches("cpu", q, k, v, attn_mask=mask)
    # Key length 0 masks every row of that batch; a window can leave rows with no key.
    assert_backend_matches("cpu", q, k, v, key_lengths=torch.tensor([0, 4], dtype=torch.int32))
    q2, k2, v2 = make_qkv(batch=1, heads_q=2, heads_kv=2, seqlen_q=12, seqlen_k=5, dim=16)
    assert_backend_matches("cpu", q2, k2, v2, causal=True)  # bottom-right: first rows see nothing
    assert_backend_matches("cpu", q2, k2, v2, window=(0, 0), causal_alignment="top_left")
    mask_add = torch.zeros(1, 1, 12, 5)
    mask_add[..., 2, :] = float("-inf")
    assert_backend_matches("cpu", q2, k2, v2, attn_mask=mask_add)
    with poisoned_outputs():
        out, lse = BACKEND.forward(validate_attention(q2, k2, v2, attn_mask=mask_add))
    assert torch.all(out[:, :, 2] == 0) and torch.all(torch.isneginf(lse[:, :, 2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("causal", [False, True])
def test_boolean_masks_hiding_whole_key_tiles(dtype: torch.dtype, causal: bool) -> None:
    # Tiles of 128 keys that a boolean mask hides from every row of a 64-row block are
    # skipped: key padding (its tail tiles), a per-row mask hiding a tile from the first
    # block only, a middle tile hidden for one head, and whole rows hidden; prefill (70 rows:
    # two blocks) and decode (one row, GQA), alone and with key lengths.
    q, k, v = make_qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=70, seqlen_k=400, dim=32, dtype=dtype)
    padding = (torch.arange(400)[None, :] < torch.tensor([130, 300])[:, None])[:, None, None, :]
    assert_backend_matches("cpu", q, k, v, attn_mask=padding, causal=causal)
    assert_backend_matches("cpu", q, k, v, attn_mask=padding, causal=causal, key_lengths=torch.tensor([390, 200]))
    # Broadcast over rows: with causal, row 0 sees keys up to 330 only (hidden here), row 69
    # the keys after them too, in the same tile.
    gap = torch.ones(1, 1, 1, 400, dtype=torch.bool)
    gap[..., 200:331] = False
    assert_backend_matches("cpu", q, k, v, attn_mask=gap, causal=causal)
    per_row = torch.rand(2, 4, 70, 400) > 0.3
    per_row[:, :, :64, 128:256] = False  # hidden from the first row block, not from the second
    per_row[0, 2, :, 256:384] = False  # a middle tile hidden for one head
    per_row[1, 3, 5] = False  # a fully masked row
    assert_backend_matches("cpu", q, k, v, attn_mask=per_row, causal=causal)
    decode_q = q[:, :, -1:]
    assert_backend_matches("cpu", decode_q, k, v, attn_mask=padding, causal=causal)
    assert_backend_matches("cpu", decode_q, k, v, attn_mask=per_row[:, :, -1:], causal=causal)
    # One query row against many tiles: the decode path splits the keys across threads.
    long_k, long_v = (torch.randn(1, 2, 4000, 32, dtype=dtype) for _ in range(2))
    long_padding = (torch.arange(4000) < 1000)[None, None, None, :]
    assert_backend_matches("cpu", decode_q[:1], long_k, long_v, attn_mask=long_padding, causal=causal)


def _varlen(lengths_q, lengths_k, heads_q=4, heads_kv=2, dim=32, dim_v=None, dtype=torch.float32):
    dim_v = dim if dim_v is None else dim_v
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads_q, dim, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), heads_kv, dim, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), heads_kv, dim_v, dtype=dtype)
    varlen = {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "max_seqlen_q": max(lengths_q),
        "max_seqlen_k": max(lengths_k),
    }
    return q, k, v, varlen


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": True},
        {"causal": True, "causal_alignment": "top_left", "window": (3, None)},
        {"alibi_slopes": "per_batch", "softcap": 2.0},
        {"dropout_p": 0.25, "causal": True},
    ],
    ids=["plain", "causal", "window_top_left", "alibi_softcap", "dropout"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_varlen(options: dict, dtype: torch.dtype) -> None:
    lengths_q, lengths_k = [5, 1, 0, 70, 9], [5, 12, 3, 90, 2]
    q, k, v, varlen = _varlen(lengths_q, lengths_k, dtype=dtype)
    options = dict(options)
    if options.get("alibi_slopes") == "per_batch":
        options["alibi_slopes"] = torch.rand(len(lengths_q), q.shape[1]) * 0.5
    assert_backend_matches("cpu", q, k, v, **varlen, **options)


def test_varlen_value_head_dim_gqa() -> None:
    q, k, v, varlen = _varlen([3, 40], [50, 40], heads_q=6, heads_kv=2, dim=48, dim_v=20)
    assert_backend_matches("cpu", q, k, v, **varlen, causal=True)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_reference_mask(dropout_p: float) -> None:
    # In float32 one differing keep bit moves the output far beyond this tolerance.
    q, k, v = make_qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=20, seqlen_k=150, dim=16)
    call = validate_attention(q, k, v, dropout_p=dropout_p, dropout_seed=987654321987)
    out, lse = BACKEND.forward(call)
    ref_out, ref_lse, _ = reference_attention(call, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    # A different seed gives a different output.
    other, _ = BACKEND.forward(validate_attention(q, k, v, dropout_p=dropout_p, dropout_seed=5))
    assert not torch.allclose(other, out)


def test_dropout_everything_dropped() -> None:
    q, k, v = make_qkv(seqlen_q=5, seqlen_k=9, dim=8)
    assert_backend_matches("cpu", q, k, v, dropout_p=1.0)


@pytest.mark.parametrize("heads_kv", [1, 8], ids=["one_kv_head", "eight_kv_heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_split_keys(heads_kv: int, dtype: torch.dtype) -> None:
    # One query over many keys: the forward splits the keys and merges partial results,
    # and the backward spreads key blocks of one KV head over threads.
    q, k, v = make_qkv(batch=1, heads_q=8, heads_kv=heads_kv, seqlen_q=1, seqlen_k=1100, dim=64, dtype=dtype)
    lengths = {"key_lengths": torch.tensor([700], dtype=torch.int32)}
    assert_backend_matches("cpu", q, k, v, **lengths)
    assert_backend_matches("cpu", q, k, v, window=(300, None), dropout_p=0.2, alibi_slopes=torch.rand(8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_reads_key_rows_in_place(dtype: torch.dtype) -> None:
    # Decoding with a GQA group of 4 and D=128 reads K/V rows in place (all 4 rows of a
    # group per K/V vector, bfloat16 pair products on AVX512-BF16), also with an odd tile
    # tail (the last pair of V rows is padded) and with Dv larger than D.
    q, k, v = make_qkv(batch=1, heads_q=8, heads_kv=2, seqlen_q=1, seqlen_k=201, dim=128, dtype=dtype)
    assert_backend_matches("cpu", q, k, v)
    assert_backend_matches("cpu", q, k, v, softcap=4.0, key_lengths=torch.tensor([131], dtype=torch.int32))
    q, k, v = make_qkv(batch=2, heads_q=6, heads_kv=1, seqlen_q=1, seqlen_k=77, dim=32, dim_v=192, dtype=dtype)
    assert_backend_matches("cpu", q, k, v)


def test_sliding_window_long() -> None:
    q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=1, seqlen_q=300, seqlen_k=300, dim=32)
    assert_backend_matches("cpu", q, k, v, causal=True, window=(40, None))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16"])
def test_every_instruction_set_variant(isa: str, cpu_variant) -> None:
    cpu_variant(isa)
    for dtype in DTYPES:
        q, k, v = make_qkv(batch=1, heads_q=4, heads_kv=2, seqlen_q=70, seqlen_k=75, dim=40, dim_v=24, dtype=dtype)
        assert_backend_matches("cpu", q, k, v, causal=True, softcap=5.0, alibi_slopes=torch.rand(4), dropout_p=0.1)
        # Decoding shapes (two rows per KV head) take the dot-product path.
        q, k, v = make_qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=300, dim=32, dim_v=48, dtype=dtype)
        assert_backend_matches("cpu", q, k, v, key_lengths=torch.tensor([300, 41], dtype=torch.int32))
        q, k, v = make_qkv(batch=1, heads_q=2, heads_kv=2, seqlen_q=1, seqlen_k=77, dim=20, dtype=dtype)
        assert_backend_matches("cpu", q, k, v, window=(30, None), softcap=3.0)
        # (B, S, H, D) storage: V rows read in place at a token stride (float32), K tiles
        # transposed a register block at a time; masks at key stride 1 applied as selects.
        q, k, v = (torch.randn(1, 70, 2, 48, dtype=dtype).transpose(1, 2) for _ in range(3))
        assert_backend_matches("cpu", q, k, v, attn_mask=torch.rand(1, 2, 70, 70) > 0.4)
        assert_backend_matches("cpu", q, k, v, attn_mask=torch.randn(1, 1, 70, 70, dtype=dtype), causal=True)


def test_dispatch_prefers_cpu_backend() -> None:
    import fusedattn

    q, k, v = make_qkv()
    out_auto = fusedattn.attention(q, k, v, causal=True)
    out_cpu = fusedattn.attention(q, k, v, causal=True, backend="cpu")
    torch.testing.assert_close(out_auto, out_cpu, rtol=0, atol=0)


def test_dropout_threshold_encoding() -> None:
    # The native op takes floor(p * 2**32) as an int; p = 1 reaches 2**32 exactly.
    assert semantics.dropout_threshold(1.0) == 2**32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(dtype):
    from special_values import assert_hidden_nan_row_has_zero_gradient, assert_minus_infinite_scores_mask_the_row

    assert_hidden_nan_row_has_zero_gradient("cpu", "cpu", dtype)
    assert_minus_infinite_scores_mask_the_row("cpu", "cpu", dtype)


def test_huge_scale_gradients_within_the_flash_backward_bound():
    # scale 1000: logits in the thousands and dq, dk that cancel. D = rowsum(dO * O) from the
    # returned output leaves an error the autograd reference does not have (its errors
    # cancel); testing.flash_backward_bounds bounds it. Found by the fuzz campaign.
    from fusedattn.testing import check_backend

    q, k, v = make_qkv(2, 1, 1, 33, 33, 32)
    for check in check_backend("cpu", q, k, v, scale=1000.0):
        assert check.passed, check


def test_flash_backward_bound_is_negligible_at_usual_scales():
    from fusedattn.testing import ABSOLUTE_FLOOR, flash_backward_bounds

    for dtype in (torch.float32, torch.float16):
        q, k, v = make_qkv(dtype=dtype)
        call = validate_attention(q, k, v, causal=True)
        out = fusedattn.attention(q, k, v, causal=True, backend="cpu")
        grad_out = torch.randn_like(out)
        _, _, low = reference_attention(call, dtype, grad_out)
        reference_out, reference_lse, exact = reference_attention(call, torch.float64, grad_out)
        bounds = flash_backward_bounds(call, grad_out, out, reference_out, reference_lse, exact)
        for bound, low_grad, exact_grad in zip(bounds, low, exact):
            # Below the rest of the rule: the bound loosens nothing at these scales.
            floor = ABSOLUTE_FLOOR[dtype] * max(1.0, float(exact_grad.abs().max()))
            assert 0 < bound < max(2 * float((low_grad.double() - exact_grad).abs().max()), floor)


def test_huge_scale_varlen_gradients_within_the_flash_backward_bound():
    from fusedattn.testing import check_backend

    q, k, v = (torch.randn(40, 2, 16) for _ in range(3))
    offsets = torch.tensor([0, 15, 40], dtype=torch.int32)
    checks = check_backend("cpu", q, k, v, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=25,
                           max_seqlen_k=25, scale=300.0, causal=True)  # fmt: skip
    assert all(check.passed for check in checks), checks


@pytest.mark.parametrize("dims", [(512, 512), (576, 512)], ids=["d512", "mla576-512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_large_head_dims(dims, dtype):
    # Gemma 4's global layers (512) and DeepSeek's absorbed MLA decode (576 / 512, one KV head).
    dim, dim_v = dims
    q, k, v = make_qkv(batch=1, heads_q=4, heads_kv=1, seqlen_q=9, seqlen_k=21, dim=dim, dim_v=dim_v, dtype=dtype)
    assert_backend_matches("cpu", q, k, v, causal=True, sinks=torch.randn(4))
    assert_backend_matches("cpu", q[:, :, :1], k, v, window=(8, None))  # decode


@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(4, 3), (2, 300)])
def test_row_without_keys_is_zero_with_sinks_and_a_nan_value(seqlen_q: int, seqlen_k: int) -> None:
    # Row 0 sees no key (bottom-right causal with Sq > Sk, or key length 0) while its block
    # computes tiles holding a NaN value: its output is 0 and its lse the sink, with or
    # without sinks (docs/semantics.md, "Fully masked rows").
    q, k, v = make_qkv(batch=1, heads_q=1, heads_kv=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, dim=16)
    v[0, 0, seqlen_k - 1, 0] = float("nan")
    options = {"causal": True} if seqlen_q > seqlen_k else {"key_lengths": torch.tensor([0], dtype=torch.int32)}
    for sinks in (None, torch.tensor([0.5])):
        out, lse = fusedattn.attention(q, k, v, sinks=sinks, return_lse=True, backend="cpu", **options)
        assert torch.equal(out[0, 0, 0], torch.zeros(16))
        assert float(lse[0, 0, 0]) == (float("-inf") if sinks is None else 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "case",
    ["causal_bottom_right", "causal_top_left", "window", "window_left_only_causal", "key_lengths", "bool_mask",
     "everything"],
)  # fmt: skip
def test_row_groups_stop_at_their_last_visible_key(case: str, dtype: torch.dtype) -> None:
    # Prefill blocks whose rows' visible keys end inside a key tile (the causal diagonal,
    # windows, key lengths) skip the products past each row group's last visible key: rows
    # across several tiles and row groups, Sq < Sk and Sq > Sk.
    for seqlen_q, seqlen_k in ((200, 300), (300, 170)):
        q, k, v = make_qkv(batch=2, heads_q=4, heads_kv=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, dim=64, dtype=dtype)
        assert_backend_matches("cpu", q, k, v, **feature_case(case, q, k))


@pytest.mark.parametrize("cache", [torch.bfloat16, torch.int8, torch.float8_e4m3fn], ids=str)
def test_bfloat16_probabilities_keep_the_row_sums_accurate(cache: torch.dtype) -> None:
    # bfloat16 probabilities (the bfloat16 prefill; the decode step from an 8-bit cache)
    # come from a shorter exp polynomial (relative error below 3.1e-6): the log-sum-exp,
    # which sums them in float32, stays within 1e-5 of float64 (the scores' own float32
    # rounding is about 1e-6 here; a cubic polynomial's 7.5e-5 would fail).
    seqlen_q = 200 if cache == torch.bfloat16 else 1
    q, k, v = make_qkv(batch=1, heads_q=8, heads_kv=2, seqlen_q=seqlen_q, seqlen_k=700, dim=64, dtype=torch.bfloat16)
    q = q * 4  # scores spread over about [-20, 20]: exp over many binades
    scales = {}
    if cache != torch.bfloat16:
        k, k_descale = fusedattn.quantize_kv(k, cache)
        v, v_descale = fusedattn.quantize_kv(v, cache)
        scales = {"k_descale": k_descale, "v_descale": v_descale}
    _, lse = fusedattn.attention(q, k, v, return_lse=True, backend="cpu", **scales)
    _, expected, _ = reference_attention(validate_attention(q, k, v, **scales), compute_dtype=torch.float64)
    assert torch.isfinite(lse).all()
    assert float((lse.double() - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("dim", "dim_v"), [(16, 16), (48, 144), (80, 208), (128, 128), (96, 192)])
def test_one_row_decode_every_head_dim(dim: int, dim_v: int, dtype: torch.dtype) -> None:
    # One query row per KV head (no GQA) decodes with K and V read in place: the scores
    # sum even and odd 16-float chunks of the head dim in two chains (a lone last chunk
    # joins the first), and P.V covers 8 output vectors at a time, then 4, then 1. Tiles
    # of at most 32 keys ask for no V rows ahead; longer ones do.
    for seqlen_k in (16, 45, 300):
        q, k, v = make_qkv(
            batch=2, heads_q=3, heads_kv=3, seqlen_q=1, seqlen_k=seqlen_k, dim=dim, dim_v=dim_v, dtype=dtype
        )
        assert_backend_matches("cpu", q, k, v)
        assert_backend_matches("cpu", q, k, v, key_lengths=torch.tensor([seqlen_k, seqlen_k // 2], dtype=torch.int32))
