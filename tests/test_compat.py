"""fusedattn.compat: FlashAttention 2's API (layouts, conventions, KV cache) over fusedattn.

Every expectation is computed independently in float64 with plain PyTorch from
FlashAttention 2's documented semantics (bottom-right causal, window_size with -1 =
unbounded, softcap 0 = off, ALiBi -slope * |i + Sk - Sq - j|).
"""

from __future__ import annotations

import math

import fusedattn
import pytest
import torch
from fusedattn import compat


def _flash_reference(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None):
    """Plain float64 attention in FlashAttention's (B, S, H, D) layout; returns (out, lse, probs)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    position = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    key = torch.arange(seqlen_k)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        scores = scores - slopes * (position - key).abs()
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        allowed &= key <= position + right
    if left >= 0:
        allowed &= key >= position - left
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2), lse, probs


def _inputs(batch=2, seqlen_q=5, seqlen_k=7, heads_q=4, heads_kv=2, dim=8, requires_grad=False):
    q = torch.randn(batch, seqlen_q, heads_q, dim, requires_grad=requires_grad)
    k = torch.randn(batch, seqlen_k, heads_kv, dim, requires_grad=requires_grad)
    v = torch.randn(batch, seqlen_k, heads_kv, dim, requires_grad=requires_grad)
    return q, k, v


OPTIONS = [
    dict(),
    dict(causal=True),
    dict(window_size=(2, 1)),
    dict(causal=True, window_size=(3, -1)),
    dict(window_size=(-1, 0)),
    dict(softcap=2.5),
    dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    dict(causal=True, alibi_slopes=torch.tensor([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.05]])),
    dict(causal=True, scale=0.3),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("seqlens", [(5, 7), (7, 5)])
def test_flash_attn_func_matches_flash_semantics(options, seqlens):
    q, k, v = _inputs(seqlen_q=seqlens[0], seqlen_k=seqlens[1], requires_grad=True)
    options = dict(options)
    scale = options.pop("scale", None)
    out = compat.flash_attn_func(q, k, v, softmax_scale=scale, **options)
    expected, _, _ = _flash_reference(q, k, v, scale=scale, **options)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    expected_grads = torch.autograd.grad(expected, (q, k, v), torch.ones_like(expected))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_are_zero_as_in_flash_attention():
    q, k, v = _inputs(seqlen_q=6, seqlen_k=3)
    out, lse, probs = compat.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    # Sq > Sk with bottom-right alignment: the first Sq - Sk rows see no key.
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    assert not probs.isnan().any()


def test_packed_variants_match_unpacked():
    q, k, v = _inputs(seqlen_q=6, seqlen_k=6, heads_kv=4)
    qkv = torch.stack([q, k, v], dim=2)
    kv = torch.stack([k, v], dim=2)
    expected = compat.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(compat.flash_attn_qkvpacked_func(qkv, causal=True), expected)
    torch.testing.assert_close(compat.flash_attn_kvpacked_func(q, kv, causal=True), expected)


def test_return_attn_probs_gives_lse_and_probabilities():
    q, k, v = _inputs()
    slopes = torch.rand(4)
    out, lse, probs = compat.flash_attn_func(
        q, k, v, causal=True, window_size=(3, -1), alibi_slopes=slopes, return_attn_probs=True
    )
    expected, expected_lse, expected_probs = _flash_reference(
        q, k, v, causal=True, window_size=(3, -1), alibi_slopes=slopes
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(probs.double(), expected_probs, atol=2e-6, rtol=1e-5)


def test_dropout_probabilities_encode_the_kernel_pattern():
    q, k, v = _inputs(seqlen_q=6, seqlen_k=6)
    torch.manual_seed(7)
    out, _, probs = compat.flash_attn_func(q, k, v, dropout_p=0.4, causal=True, return_attn_probs=True)
    dropped = probs < 0
    assert 0 < dropped.float().mean() < 1
    # FlashAttention's encoding: |probs| are the probabilities, negative where dropped; the
    # output is the kept probabilities, scaled by 1 / (1 - p), times V.
    kept = torch.where(dropped, torch.zeros_like(probs), probs) / 0.6
    v_expanded = v.transpose(1, 2).repeat_interleave(2, 1)
    torch.testing.assert_close(out, (kept @ v_expanded).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # The same seed draws the same pattern: dropout is reproducible with torch.manual_seed.
    torch.manual_seed(7)
    again = compat.flash_attn_func(q, k, v, dropout_p=0.4, causal=True, return_attn_probs=True)
    assert torch.equal(again[0], out)


def _pack(tensors_by_sequence):
    lengths = [t.shape[0] for t in tensors_by_sequence]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.cat(tensors_by_sequence), cu, max(lengths)


@pytest.mark.parametrize(
    "options",
    [dict(causal=True), dict(window_size=(1, 2), softcap=3.0), dict(),
     dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))],
    ids=lambda o: ",".join(o) or "plain",
)  # fmt: skip
def test_varlen_matches_per_sequence_flash_attn(options):
    seqlens = [(3, 5), (4, 4), (1, 6)]
    pieces = [_inputs(batch=1, seqlen_q=sq, seqlen_k=sk) for sq, sk in seqlens]
    q, cu_q, max_q = _pack([p[0][0] for p in pieces])
    k, cu_k, max_k = _pack([p[1][0] for p in pieces])
    v, _, _ = _pack([p[2][0] for p in pieces])
    out, lse, probs = compat.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **options
    )
    assert lse.shape == (4, q.shape[0]) and probs.shape == (3, 4, max_q, max_k)
    for index, (piece_q, piece_k, piece_v) in enumerate(pieces):
        expected, expected_lse, expected_probs = _flash_reference(piece_q, piece_k, piece_v, **options)
        rows = slice(int(cu_q[index]), int(cu_q[index + 1]))
        torch.testing.assert_close(out[rows].double(), expected[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[:, rows].double(), expected_lse[0], atol=2e-5, rtol=1e-5)
        sq, sk = seqlens[index]
        torch.testing.assert_close(probs[index, :, :sq, :sk].double(), expected_probs[0], atol=2e-6, rtol=1e-5)
    self_k, self_v = q.flip(0), q * 0.5  # self-attention shapes for the qkv-packed variant
    packed = compat.flash_attn_varlen_qkvpacked_func(torch.stack([q, self_k, self_v], dim=1), cu_q, max_q, causal=True)
    direct = compat.flash_attn_varlen_func(q, self_k, self_v, cu_q, cu_q, max_q, max_q, causal=True)
    torch.testing.assert_close(packed, direct)
    kv_packed = compat.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], dim=1), cu_q, cu_k, max_q, max_k)
    torch.testing.assert_close(kv_packed, compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k))


def test_varlen_dropout_probabilities_use_the_varlen_sequence_numbers():
    q, cu, longest = _pack([torch.randn(4, 2, 8), torch.randn(5, 2, 8)])
    torch.manual_seed(3)
    # max_seqlen_k above the longest sequence: the probabilities are shaped by the arguments.
    out, _, probs = compat.flash_attn_varlen_func(q, q, q, cu, cu, longest, longest + 3, dropout_p=0.5,
                                                  return_attn_probs=True)  # fmt: skip
    assert probs.shape == (2, 2, longest, longest + 3)
    for index in range(2):
        rows = slice(int(cu[index]), int(cu[index + 1]))
        length = rows.stop - rows.start
        kept = probs[index, :, :length, :length].clamp(min=0) / 0.5
        expected = kept @ q[rows].transpose(0, 1)
        torch.testing.assert_close(out[rows], expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def _paged(cache, block_size):
    """(B, S, H, D) cache -> a shuffled paged cache and its block table."""
    batch, seqlen = cache.shape[:2]
    blocks_per_row = seqlen // block_size
    order = torch.randperm(batch * blocks_per_row)
    blocks = cache.reshape(batch * blocks_per_row, block_size, *cache.shape[2:])
    paged = torch.empty_like(blocks)
    paged[order] = blocks
    return paged, order.view(batch, blocks_per_row).to(torch.int32)


def test_varlen_block_table_reads_a_paged_cache():
    seqlens = torch.tensor([5, 8])
    q, cu_q, max_q = _pack([torch.randn(2, 4, 8), torch.randn(3, 4, 8)])
    k_cache, v_cache = torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)
    cu_k = torch.tensor([0, 5, 13], dtype=torch.int32)
    k_paged, table = _paged(k_cache, 4)
    v_paged, _ = _paged(v_cache, 4)
    v_paged = v_cache.reshape(4, 4, 2, 8)[torch.argsort(table.flatten().long())]
    out = compat.flash_attn_varlen_func(q, k_paged, v_paged, cu_q, cu_k, max_q, 8, causal=True, block_table=table)
    k = torch.cat([k_cache[b, : seqlens[b]] for b in range(2)])
    v = torch.cat([v_cache[b, : seqlens[b]] for b in range(2)])
    torch.testing.assert_close(out, compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 8, causal=True))


def _kvcache_reference(q, k_cache, v_cache, starts, ends, **options):
    """Per batch row: flash attention of q[b] over cache keys starts[b] .. ends[b] - 1."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        keys = slice(int(starts[b]), int(ends[b]))
        out, lse, _ = _flash_reference(q[b : b + 1], k_cache[b : b + 1, keys], v_cache[b : b + 1, keys], **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


KVCACHE_OPTIONS = [
    dict(),
    dict(causal=True),
    dict(causal=True, window_size=(2, -1)),
    dict(alibi_slopes=torch.tensor([0.5, 0.3, 0.2, 0.1])),
    dict(softcap=2.0, causal=True),
]


@pytest.mark.parametrize("options", KVCACHE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "leftpad", "paged", "paged_leftpad"])
def test_flash_attn_with_kvcache_appends_and_attends(options, seqlen_q, layout):
    batch, capacity, heads_q, heads_kv, dim = 3, 12, 4, 2, 8
    q = torch.randn(batch, seqlen_q, heads_q, dim)
    k_cache, v_cache = torch.randn(batch, capacity, heads_kv, dim), torch.randn(batch, capacity, heads_kv, dim)
    k_new, v_new = torch.randn(batch, seqlen_q, heads_kv, dim), torch.randn(batch, seqlen_q, heads_kv, dim)
    cache_seqlens = torch.tensor([4, 0, 7], dtype=torch.int32)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        position = int(cache_seqlens[b])
        expected_k[b, position : position + seqlen_q] = k_new[b]
        expected_v[b, position : position + seqlen_q] = v_new[b]
    starts = torch.zeros(batch, dtype=torch.long)
    extra = {}
    cache_k, cache_v = k_cache, v_cache
    if layout == "batch_idx":
        # Cache rows in another order than the batch.
        rows = torch.tensor([2, 0, 1], dtype=torch.int32)
        cache_k, cache_v = torch.empty_like(k_cache), torch.empty_like(v_cache)
        cache_k[rows.long()], cache_v[rows.long()] = k_cache, v_cache
        extra["cache_batch_idx"] = rows
    if layout.endswith("leftpad"):
        starts = torch.tensor([1, 0, 3])
        extra["cache_leftpad"] = starts.to(torch.int32)
    if layout.startswith("paged"):
        cache_k, table = _paged(k_cache, 4)
        cache_v = v_cache.reshape(-1, 4, heads_kv, dim)[torch.argsort(table.flatten().long())]
        extra["block_table"] = table
    out, lse = compat.flash_attn_with_kvcache(
        q, cache_k, cache_v, k=k_new, v=v_new, cache_seqlens=cache_seqlens, return_softmax_lse=True, **options, **extra
    )
    expected, expected_lse = _kvcache_reference(
        q, expected_k, expected_v, starts, cache_seqlens.long() + seqlen_q, **options
    )
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=1e-5)
    # The new keys were written into the caches in place.
    if layout == "batch_idx":
        written_k = cache_k[extra["cache_batch_idx"].long()]
    elif layout.startswith("paged"):
        written_k = cache_k[extra["block_table"].long()].reshape(batch, capacity, heads_kv, dim)
    else:
        written_k = cache_k
    torch.testing.assert_close(written_k, expected_k)


def test_kvcache_without_new_keys_and_with_int_seqlens():
    q = torch.randn(2, 1, 4, 8)
    k_cache, v_cache = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 4, 8)
    out = compat.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4, causal=True)
    expected, _, _ = _flash_reference(q, k_cache[:, :4], v_cache[:, :4])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    everything = compat.flash_attn_with_kvcache(q, k_cache, v_cache)
    torch.testing.assert_close(everything.double(), _flash_reference(q, k_cache, v_cache)[0], atol=2e-5, rtol=1e-4)


def test_rotary_arguments_raise_a_clear_error():
    q = torch.randn(1, 1, 2, 8)
    cache = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="rotary_cos"):
        compat.flash_attn_with_kvcache(q, cache, cache, rotary_cos=torch.ones(4, 4), rotary_sin=torch.zeros(4, 4))


def test_arguments_are_checked_by_fusedattn_validation():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="window"):
        compat.flash_attn_func(q, k, v, window_size=(2.5, -1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout_p"):
        compat.flash_attn_func(q, k, v, dropout_p=1.5)


def test_deterministic_is_accepted():
    q, k, v = _inputs()
    torch.testing.assert_close(compat.flash_attn_func(q, k, v, deterministic=True), compat.flash_attn_func(q, k, v))


def test_calls_go_through_the_public_api(monkeypatch):
    calls = []
    original = fusedattn.api.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(compat, "attention", spy)
    q, k, v = _inputs()
    compat.flash_attn_func(q, k, v, causal=True, window_size=(4, -1), softcap=0.0)
    assert calls[0]["window"] == (4, None) and calls[0]["causal"] is True and calls[0]["softcap"] == 0.0


def test_learnable_sink_is_fusedattn_sinks():
    # flash-attn 4's learnable_sink: one logit per query head in every row's denominator.
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 4, 16, generator=generator) for _ in range(3))
    sinks = torch.randn(4, generator=generator, requires_grad=True)
    out = compat.flash_attn_func(q, k, v, causal=True, learnable_sink=sinks)
    expected = fusedattn.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, sinks=sinks).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), sinks)
    assert grad.shape == (4,) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed = [t.reshape(10, 4, 16) for t in (q, k, v)]
    varlen = compat.flash_attn_varlen_func(*packed, cu, cu, 5, 5, causal=True, learnable_sink=sinks)
    torch.testing.assert_close(varlen, out.reshape(10, 4, 16))
    cached = compat.flash_attn_with_kvcache(q, k.clone(), v.clone(), causal=True, learnable_sink=sinks)
    torch.testing.assert_close(cached, out)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=["float8_e4m3fn", "int8"])
def test_flash_attn_3_descales_scale_8bit_keys_and_values(kv_dtype):
    # flash-attn 3's k_descale / v_descale: float32 (batch, num_heads_k); the key is
    # k.float() * k_descale[b, h]. The expectation dequantizes in float64 and follows
    # FlashAttention's semantics (_flash_reference), independently of fusedattn.
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 16, generator=generator)
    k_values, v_values = ((torch.randn(2, 9, 2, 16, generator=generator) * 20).clamp(-100, 100).to(kv_dtype)
                          for _ in range(2))  # fmt: skip
    k_descale = torch.rand(2, 2, generator=generator) * 0.05 + 0.01
    v_descale = torch.rand(2, 2, generator=generator) * 0.05 + 0.01

    def dequantized(values, scales):
        return values.double() * scales.double()[:, None, :, None]

    out = compat.flash_attn_func(q, k_values, v_values, causal=True, k_descale=k_descale, v_descale=v_descale)
    expected = _flash_reference(q, dequantized(k_values, k_descale), dequantized(v_values, v_descale), causal=True)[0]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)
    # Packed sequences: (N, Hkv) scales, one per sequence, applied to each of its tokens.
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    packed = compat.flash_attn_varlen_func(
        torch.cat([q[0], q[1]]), torch.cat([k_values[0], k_values[1]]), torch.cat([v_values[0], v_values[1]]),
        torch.tensor([0, 3, 6], dtype=torch.int32), cu, 3, 9, window_size=(4, 0), k_descale=k_descale,
        v_descale=v_descale,
    )  # fmt: skip
    for index in range(2):
        one = _flash_reference(q[index : index + 1], dequantized(k_values, k_descale)[index : index + 1],
                               dequantized(v_values, v_descale)[index : index + 1], window_size=(4, 0))[0]  # fmt: skip
        torch.testing.assert_close(packed[3 * index : 3 * index + 3].double(), one[0], rtol=0, atol=2e-5)
    # Only k_descale: a missing scale is 1, as in flash-attn 3.
    out = compat.flash_attn_func(q, k_values, v_values, k_descale=k_descale)
    expected = _flash_reference(q, dequantized(k_values, k_descale), v_values.double())[0]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-4)


def test_flash_attn_3_descale_refusals_and_ignored_scales():
    q = torch.randn(2, 3, 4, 16)
    k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    scales = torch.ones(2, 2)
    # Inputs in q's dtype: flash-attn 3 reads its scales only for float8 inputs; so here.
    torch.testing.assert_close(compat.flash_attn_func(q, k, v, q_descale=scales * 3, k_descale=scales * 2),
                               compat.flash_attn_func(q, k, v))  # fmt: skip
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="q: float8_e4m3fn queries .* are not supported"):
        compat.flash_attn_func(q.to(torch.float8_e4m3fn), k8, v8, q_descale=scales, k_descale=scales)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):  # no scale: flash-attn's dtype rule
        compat.flash_attn_func(q, k8, v8)
    with pytest.raises(ValueError, match=r"k_descale: expected shape \(batch, num_heads_k\) = \(2, 2\)"):
        compat.flash_attn_func(q, k8, v8, k_descale=torch.ones(2, 2, 9))
    with pytest.raises(TypeError, match="v_descale: expected dtype torch.float32"):
        compat.flash_attn_func(q, k8, v8, v_descale=scales.double())
    with pytest.raises(ValueError, match="q_descale: expected None with q of dtype torch.float32"):
        compat.flash_attn_func(q, k8, v8, q_descale=scales, k_descale=scales)
    with pytest.raises(NotImplementedError, match="per cache row"):
        cu = torch.tensor([0, 1, 2], dtype=torch.int32)
        compat.flash_attn_varlen_func(q[:, 0], k8[:1].view(1, 9, 2, 16), v8[:1].view(1, 9, 2, 16), cu, cu, 1, 1,
                                      block_table=torch.zeros(2, 1, dtype=torch.int32), k_descale=scales)  # fmt: skip
    # Caches in q's dtype ignore the scales there too.
    torch.testing.assert_close(compat.flash_attn_with_kvcache(q, k, v, k_descale=scales * 2),
                               compat.flash_attn_with_kvcache(q, k, v))  # fmt: skip
