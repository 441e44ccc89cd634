"""fusedattn.compat.flash_attn_with_kvcache over 8-bit KV caches (flash-attn 3's FP8 KV cache,
and int8): k_descale / v_descale (batch, num_heads_k), new tokens appended in the cache's
format, checked against the float64 reference over the dequantized caches."""

from __future__ import annotations

import pytest
import torch
from fusedattn import attention, compat

QUANTIZED_DTYPES = [torch.float8_e4m3fn, torch.int8]
LARGEST = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
BATCH, CAPACITY, HEADS_Q, HEADS_KV, DIM, BLOCK_SIZE = 3, 12, 4, 2, 8, 4


def _quantized(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, S, Hkv, D) / scale (B, Hkv), rounded to dtype (to nearest; int8 in [-127, 127])."""
    scaled = x.double() / scale.double()[:, None, :, None]
    if dtype == torch.int8:
        scaled = scaled.round()
    return scaled.clamp(-LARGEST[dtype], LARGEST[dtype]).to(dtype)


def _dequantized(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return values.double()
    return values.double() * scale.double()[:, None, :, None]


def _paged(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) cache -> its blocks in a shuffled paged cache, and the block table."""
    blocks_per_row = cache.shape[1] // BLOCK_SIZE
    order = torch.randperm(cache.shape[0] * blocks_per_row)
    paged = torch.empty_like(cache.reshape(-1, BLOCK_SIZE, *cache.shape[2:]))
    paged[order] = cache.reshape(-1, BLOCK_SIZE, *cache.shape[2:])
    return paged, order.view(cache.shape[0], blocks_per_row).to(torch.int32)


def _reference(q, keys, values, starts, ends, causal):
    """Per batch element b: the float64 reference over its keys starts[b] .. ends[b] - 1
    (bottom-right causal, as flash-attn); out (B, Sq, Hq, Dv), lse (B, Hq, Sq)."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        span = slice(int(starts[b]), int(ends[b]))
        out, lse = attention(
            q[b : b + 1].double().transpose(1, 2),
            keys[b : b + 1, span].transpose(1, 2),
            values[b : b + 1, span].transpose(1, 2),
            causal=causal,
            return_lse=True,
            backend="reference",
        )
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _case(dtype: torch.dtype, seqlen_new: int, generator: torch.Generator):
    """A logical (B, CAPACITY) 8-bit cache with its (B, Hkv) scales, and new tokens in q's
    dtype whose magnitudes fit in the cache's range with those scales."""
    k_float = torch.randn(BATCH, CAPACITY, HEADS_KV, DIM, generator=generator)
    v_float = torch.randn(BATCH, CAPACITY, HEADS_KV, DIM, generator=generator)
    k_new = torch.randn(BATCH, seqlen_new, HEADS_KV, DIM, generator=generator)
    v_new = torch.randn(BATCH, seqlen_new, HEADS_KV, DIM, generator=generator)
    largest = LARGEST[dtype]
    # Scales differ per batch element and head, and cover the new tokens too (no clamping).
    k_scale = (torch.cat([k_float, k_new], 1).abs().amax(dim=(1, 3)) / largest).float()
    v_scale = (torch.cat([v_float, v_new], 1).abs().amax(dim=(1, 3)) / largest).float()
    k_cache, v_cache = _quantized(k_float, k_scale, dtype), _quantized(v_float, v_scale, dtype)
    return k_cache, v_cache, k_scale, v_scale, k_new, v_new


@pytest.mark.parametrize("dtype", QUANTIZED_DTYPES, ids=["float8_e4m3fn", "int8"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "leftpad", "paged"])
@pytest.mark.parametrize("new_tokens", ["none", "in_q_dtype", "in_cache_dtype"])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (3, True)], ids=["decode", "causal"])
def test_quantized_cache_appends_and_attends(dtype, layout, new_tokens, seqlen_q, causal):
    generator = torch.Generator().manual_seed(18)
    q = torch.randn(BATCH, seqlen_q, HEADS_Q, DIM, generator=generator)
    k_cache, v_cache, k_scale, v_scale, k_new, v_new = _case(dtype, seqlen_q, generator)
    cache_seqlens = torch.tensor([4, 0, 7], dtype=torch.int32)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    appended = {}
    if new_tokens != "none":
        k_written, v_written = _quantized(k_new, k_scale, dtype), _quantized(v_new, v_scale, dtype)
        for b in range(BATCH):
            position = int(cache_seqlens[b])
            expected_k[b, position : position + seqlen_q] = k_written[b]
            expected_v[b, position : position + seqlen_q] = v_written[b]
        # flash-attn 3 takes k, v already in the cache's format; fusedattn also quantizes q's dtype.
        appended = dict(k=k_new, v=v_new) if new_tokens == "in_q_dtype" else dict(k=k_written, v=v_written)
    cache_k, cache_v, extra = k_cache, v_cache, {}
    if layout == "batch_idx":
        rows = torch.tensor([2, 0, 1], dtype=torch.int32)
        cache_k, cache_v = torch.empty_like(k_cache), torch.empty_like(v_cache)
        cache_k[rows.long()], cache_v[rows.long()] = k_cache, v_cache
        extra["cache_batch_idx"] = rows
    starts = torch.zeros(BATCH, dtype=torch.long)
    if layout == "leftpad":
        starts = torch.tensor([1, 0, 3])
        extra["cache_leftpad"] = starts.to(torch.int32)
    if layout == "paged":
        cache_k, table = _paged(k_cache)
        cache_v = torch.empty_like(cache_k)
        cache_v[table.flatten().long()] = v_cache.reshape(-1, BLOCK_SIZE, HEADS_KV, DIM)
        extra["block_table"] = table
    out, lse = compat.flash_attn_with_kvcache(
        q, cache_k, cache_v, **appended, cache_seqlens=cache_seqlens, causal=causal, return_softmax_lse=True,
        k_descale=k_scale, v_descale=v_scale, **extra,
    )  # fmt: skip
    ends = cache_seqlens.long() + (0 if new_tokens == "none" else seqlen_q)
    expected, expected_lse = _reference(
        q, _dequantized(expected_k, k_scale), _dequantized(expected_v, v_scale), starts, ends, causal
    )
    assert out.shape == (BATCH, seqlen_q, HEADS_Q, DIM) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)
    # The caches hold the new tokens, in their format, and nothing else changed.
    if layout == "batch_idx":
        written_k, written_v = cache_k[extra["cache_batch_idx"].long()], cache_v[extra["cache_batch_idx"].long()]
    elif layout == "paged":
        written_k = cache_k[extra["block_table"].long()].reshape(BATCH, CAPACITY, HEADS_KV, DIM)
        written_v = cache_v[extra["block_table"].long()].reshape(BATCH, CAPACITY, HEADS_KV, DIM)
    else:
        written_k, written_v = cache_k, cache_v
    assert written_k.dtype == dtype and torch.equal(written_k.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(written_v.view(torch.uint8), expected_v.view(torch.uint8))


@pytest.mark.parametrize("dtype", QUANTIZED_DTYPES, ids=["float8_e4m3fn", "int8"])
def test_appended_tokens_round_to_the_nearest_value_with_the_cache_scale(dtype):
    """Independent of the rounding formula: each written value dequantizes to within half a
    step of the new token (int8: half the scale; e4m3: 2^-4 of the value, above its
    smallest normal), and values beyond the format's range saturate."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(BATCH, 2, HEADS_Q, DIM, generator=generator)
    k_cache, v_cache, k_scale, v_scale, k_new, v_new = _case(dtype, 2, generator)
    k_new[0, 0, 0, 0] = 1e6  # far beyond LARGEST * k_scale: saturates
    compat.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=3, k_descale=k_scale,
                                   v_descale=v_scale)  # fmt: skip
    written = _dequantized(k_cache[:, 3:5], k_scale)
    assert float(written[0, 0, 0, 0]) == pytest.approx(LARGEST[dtype] * float(k_scale[0, 0]))
    exact, written = k_new.double().flatten()[1:], written.flatten()[1:]
    step = k_scale.double()[:, None, :, None].expand(k_new.shape).flatten()[1:]
    if dtype == torch.int8:
        bound = step / 2 * (1 + 1e-6)
    else:
        bound = torch.maximum(exact.abs() * 2.0**-4, step * 2.0**-10)  # subnormal steps are 2^-9
    assert bool(((written - exact).abs() <= bound).all())
    assert bool((_dequantized(v_cache[:, 3:5], v_scale) - v_new.double()).abs().max() > 0)  # v quantized too


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_missing_scales_are_one(layout):
    """As flash-attn 3: no k_descale / v_descale reads the 8-bit values as they are (the
    paged cache is then read in place), and one missing scale is 1."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(BATCH, 1, HEADS_Q, DIM, generator=generator)
    k_cache, v_cache, k_scale, _, k_new, v_new = _case(torch.int8, 1, generator)
    extra, cache_k, cache_v = {}, k_cache, v_cache
    if layout == "paged":
        cache_k, table = _paged(k_cache)
        cache_v = torch.empty_like(cache_k)
        cache_v[table.flatten().long()] = v_cache.reshape(-1, BLOCK_SIZE, HEADS_KV, DIM)
        extra["block_table"] = table
    starts, ends = torch.zeros(BATCH), torch.full((BATCH,), 9)
    out = compat.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=9, **extra)
    expected, _ = _reference(q, k_cache.double(), v_cache.double(), starts, ends, False)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    out = compat.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=9, k_descale=k_scale, **extra)
    expected, _ = _reference(q, _dequantized(k_cache, k_scale), v_cache.double(), starts, ends, False)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    # New tokens in q's dtype with no scale: rounded with scale 1.
    compat.flash_attn_with_kvcache(q, cache_k, cache_v, k=k_new * 50, v=v_new, cache_seqlens=9, **extra)
    if layout == "paged":
        cache_k = cache_k[extra["block_table"].long()].reshape(BATCH, CAPACITY, HEADS_KV, DIM)
    assert torch.equal(cache_k[:, 9:10], (k_new * 50).round().clamp(-127, 127).to(torch.int8))


def test_refusals_name_the_argument_and_leave_the_caches_untouched():
    q = torch.randn(2, 1, 4, 8)
    k_cache = torch.randn(2, 6, 2, 8).to(torch.float8_e4m3fn)
    v_cache = torch.randn(2, 6, 2, 8).to(torch.float8_e4m3fn)
    k_new, v_new = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    scales = torch.ones(2, 2)
    before = (k_cache.view(torch.uint8).clone(), v_cache.view(torch.uint8).clone())
    calls = [
        # flash-attn 3's FP8 queries: fusedattn computes in q's dtype.
        (TypeError, "q: float8_e4m3fn queries", dict(q=q.to(torch.float8_e4m3fn), k_descale=scales)),
        (TypeError, "q: expected float16, bfloat16, float32 or float64", dict(q=q.to(torch.int8))),
        (ValueError, "q_descale: expected None", dict(q_descale=scales, k_descale=scales)),
        (ValueError, "q_descale: expected None", dict(q_descale=scales)),
        (
            ValueError,
            r"k_descale: expected shape \(batch, num_heads_k\) = \(2, 2\)",
            dict(k_descale=torch.ones(2, 2, 6)),
        ),
        (ValueError, r"v_descale: expected shape", dict(v_descale=torch.ones(1, 2))),
        (TypeError, "v_descale: expected dtype torch.float32", dict(v_descale=scales.double())),
        (TypeError, "k_descale: expected a torch.Tensor", dict(k_descale=1.0)),
        (TypeError, "v_cache: expected the dtype of k_cache", dict(v_cache=v_cache.view(torch.int8))),
        (TypeError, r"k: expected the dtype of the cache \(torch.float8_e4m3fn", dict(k=k_new.half())),
        (TypeError, r"v: expected the dtype of the cache", dict(v=v_new.to(torch.int8))),
        (ValueError, "k, v: expected both", dict(v=None)),
        (ValueError, r"k: expected shape", dict(k=k_new[:, :, :1], v=v_new[:, :, :1])),
        (ValueError, "cache_seqlens", dict(cache_seqlens=6)),  # no room for the new token
    ]
    for error, message, changes in calls:
        arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k_new, v=v_new, cache_seqlens=2, k_descale=scales)
        arguments.update(changes)
        with pytest.raises(error, match=message):
            compat.flash_attn_with_kvcache(**arguments)
        assert torch.equal(k_cache.view(torch.uint8), before[0]) and torch.equal(v_cache.view(torch.uint8), before[1])
    # flash-attn's one-dtype rule is kept for caches that are not 8-bit.
    with pytest.raises(TypeError, match="k_cache: expected the dtype of q"):
        compat.flash_attn_with_kvcache(q, k_cache.half(), v_cache.half())
    with pytest.raises(TypeError, match="v_cache: expected the dtype of q"):
        compat.flash_attn_with_kvcache(q, k_cache.float(), v_cache)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("dtype", QUANTIZED_DTYPES, ids=["float8_e4m3fn", "int8"])
def test_half_precision_queries_and_new_tokens(q_dtype, dtype):
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, 2, HEADS_Q, DIM, generator=generator).to(q_dtype)
    k_cache, v_cache, k_scale, v_scale, k_new, v_new = _case(dtype, 2, generator)
    k_new, v_new = k_new.to(q_dtype), v_new.to(q_dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[:, 5:7], expected_v[:, 5:7] = _quantized(k_new, k_scale, dtype), _quantized(v_new, v_scale, dtype)
    out = compat.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=5, causal=True,
                                         k_descale=k_scale, v_descale=v_scale)  # fmt: skip
    assert out.dtype == q_dtype
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))
    expected, _ = _reference(q, _dequantized(expected_k, k_scale), _dequantized(expected_v, v_scale),
                             torch.zeros(BATCH), torch.full((BATCH,), 7), True)  # fmt: skip
    # The output's own rounding (2^-8 relative for bf16, 2^-11 for fp16) and the kernel's
    # low-precision probabilities before P·V.
    tolerance = 2e-2 if q_dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
