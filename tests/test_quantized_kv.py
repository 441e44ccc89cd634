"""8-bit K/V caches (float8_e4m3fn, int8) with k_descale / v_descale.

The function is attention over the dequantized keys and values (k.float() * k_descale[..., None]):
the reference dequantizes and computes in float64; the CPU kernels read the 8-bit values where
they lie and apply the scales per key (the Triton kernels' tests, which need the interpreter's
fixture, are in tests/test_triton_backend.py). Every check compares against float64.
"""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn.testing import assert_backend_matches, paged_case, quantize_test_cache

KV_DTYPES = [torch.int8, torch.float8_e4m3fn]
IDS = ["int8", "float8_e4m3fn"]


def _dense(batch=2, heads_q=4, heads_kv=2, seqlen_q=5, seqlen_k=70, dim=32, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seqlen_q, dim, generator=generator).to(dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, dim, generator=generator) * 3
    v = torch.randn(batch, heads_kv, seqlen_k, dim, generator=generator)
    return q, k, v


def _dequantized(values: torch.Tensor, descale: torch.Tensor | None) -> torch.Tensor:
    values = values.to(torch.float64)
    return values if descale is None else values * descale.to(torch.float64)[..., None]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "options", [{}, {"causal": True, "softcap": 5.0}, {"window": (9, 2), "alibi_slopes": "per_head"}], ids=str
)
def test_reference_is_attention_over_the_dequantized_cache(kv_dtype: torch.dtype, options: dict) -> None:
    q, k, v = _dense(dtype=torch.float64)
    if options.get("alibi_slopes") == "per_head":
        options = {**options, "alibi_slopes": torch.linspace(0.1, 0.8, q.shape[1], dtype=torch.float64)}
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    out, lse = fusedattn.attention(
        q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, return_lse=True, backend="reference",
        **options,
    )  # fmt: skip
    expected, expected_lse = fusedattn.attention(
        q, _dequantized(key_cache, k_descale), _dequantized(value_cache, v_descale), return_lse=True,
        backend="reference", **options,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "dim", "options"),
    [
        (1, 300, 64, {}),  # decoding: rows read in place, key splits
        (1, 77, 32, {"window": (30, None), "softcap": 3.0}),
        (70, 75, 40, {"causal": True, "dropout_p": 0.2, "dropout_seed": 3}),  # tiles converted
        (3, 130, 128, {"causal": True, "key_lengths": "short"}),
    ],
)
def test_cpu_matches_the_float64_oracle(kv_dtype, dtype, seqlen_q, seqlen_k, dim, options) -> None:
    q, k, v = _dense(seqlen_q=seqlen_q, seqlen_k=seqlen_k, dim=dim, dtype=dtype)
    if options.get("key_lengths") == "short":
        options = {**options, "key_lengths": torch.tensor([seqlen_k, seqlen_k // 3], dtype=torch.int32)}
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    assert_backend_matches("cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, **options)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
@pytest.mark.parametrize(
    ("k_scale_shape", "v_scale_shape"), [((), (2, 1)), ((2, 1), (1, 2, 70)), ((2, 2, 70), None)], ids=str
)
def test_every_scale_granularity(kv_dtype, k_scale_shape, v_scale_shape) -> None:
    # One scale per tensor, per KV head (broadcast over tokens) or per token and head; or none.
    q, k, v = _dense()
    generator = torch.Generator().manual_seed(1)
    key_cache = (k * 10).clamp(-100, 100).to(kv_dtype)
    value_cache = (v * 10).clamp(-100, 100).to(kv_dtype)
    k_descale = torch.rand(k_scale_shape, generator=generator) * 0.2 + 0.01
    v_descale = None if v_scale_shape is None else torch.rand(v_scale_shape, generator=generator) * 0.2 + 0.01
    out = fusedattn.attention(q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, backend="cpu")
    expected = fusedattn.attention(
        q.double(),
        _dequantized(key_cache, k_descale.expand(2, 2, 70)),
        _dequantized(value_cache, None if v_descale is None else v_descale.expand(2, 2, 70)),
        backend="reference",
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
@pytest.mark.parametrize(
    ("seqlen_q", "dim", "dtype"), [(5, 32, torch.float32), (1, 64, torch.bfloat16)], ids=["forward", "decode"]
)
def test_per_token_scales_of_any_stride(kv_dtype, seqlen_q, dim, dtype) -> None:
    # Per-token scales whose token stride is 2 (every other value) and 4 (tokens outermost):
    # the CPU kernels read a dense cache's scales at their stride (bf16 decode: the 8-bit
    # decode kernel of AVX512-BF16 CPUs).
    q, k, v = _dense(seqlen_q=seqlen_q, dim=dim, dtype=dtype)
    generator = torch.Generator().manual_seed(2)
    key_cache = (k * 10).clamp(-100, 100).to(kv_dtype)
    value_cache = (v * 10).clamp(-100, 100).to(kv_dtype)
    k_descale = (torch.rand(2, 2, 140, generator=generator) * 0.2 + 0.01)[..., ::2]
    v_descale = (torch.rand(70, 2, 2, generator=generator) * 0.2 + 0.01).permute(1, 2, 0)
    assert k_descale.stride(-1) == 2 and v_descale.stride(-1) == 4
    assert_backend_matches("cpu", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
def test_varlen_and_paged_caches(kv_dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    (q, key_cache, value_cache), arguments = paged_case((1, 3, 1), (40, 17, 1), block_size=16, generator=generator)
    key_cache, k_descale = quantize_test_cache(key_cache, kv_dtype)
    value_cache, v_descale = quantize_test_cache(value_cache, kv_dtype)
    for backend in ("cpu", "reference"):
        out = fusedattn.attention_paged(
            q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, backend=backend, causal=True,
            **arguments,
        )  # fmt: skip
        expected = fusedattn.attention_paged(
            q.double(), _dequantized(key_cache, k_descale), _dequantized(value_cache, v_descale), backend="reference",
            causal=True, **arguments,
        )  # fmt: skip
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    # Packed sequences: the scales are (Tk, Hkv), like the keys without the head dim.
    k = torch.randn(30, 2, 32, generator=generator)
    v = torch.randn(30, 2, 32, generator=generator)
    q = torch.randn(12, 4, 32, generator=generator)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 30], dtype=torch.int32)
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    out = fusedattn.attention_varlen(
        q, key_cache, value_cache, cu_q, cu_k, 7, 20, causal=True, k_descale=k_descale, v_descale=v_descale,
        backend="cpu",
    )  # fmt: skip
    expected = fusedattn.attention_varlen(
        q.double(), _dequantized(key_cache, k_descale), _dequantized(value_cache, v_descale), cu_q, cu_k, 7, 20,
        causal=True, backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=IDS)
def test_quantize_kv_error_bound_and_append(kv_dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 50, 64, generator=generator) * torch.rand(2, 3, 50, 1, generator=generator) * 10
    x[0, 0, 0] = 0.0  # a row of zeros: scale 1, values 0
    values, descale = fusedattn.quantize_kv(x, kv_dtype)
    assert values.dtype == kv_dtype and descale.shape == (2, 3, 50) and descale.dtype == torch.float32
    assert float(descale[0, 0, 0]) == 1.0 and not values[0, 0, 0].float().any()
    error = (values.float() * descale[..., None] - x).abs()
    largest = x.abs().amax(-1, keepdim=True)
    # int8: half a step of largest / 127; e4m3 (3 mantissa bits): 1/16 of the value, or half
    # the subnormal step at the bottom of the range.
    bound = largest / 254 if kv_dtype == torch.int8 else x.abs() / 16 + largest / 448 * 2**-10
    assert bool((error <= bound * (1 + 1e-6)).all())

    cache, cache_descale = fusedattn.quantize_kv(torch.zeros(2, 3, 60, 64), kv_dtype)
    fusedattn.append_quantized_kv(cache, cache_descale, x, (slice(None), slice(None), slice(5, 55)))
    assert torch.equal(cache[:, :, 5:55].float(), values.float()) and torch.equal(cache_descale[:, :, 5:55], descale)
    assert not cache[:, :, :5].float().any() and not cache[:, :, 55:].float().any()


def test_refusals_name_the_argument() -> None:
    q, k, v = _dense()
    key_cache, k_descale = fusedattn.quantize_kv(k, torch.int8)
    value_cache, v_descale = fusedattn.quantize_kv(v, torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="k, v: expected the dtype of q .* or both float8_e4m3fn or both int8"):
        fusedattn.attention(q, key_cache, value_cache)
    with pytest.raises(ValueError, match=r"k_descale: expected None when k is torch.float32"):
        fusedattn.attention(q, k, v, k_descale=k_descale)
    with pytest.raises(ValueError, match=r"k_descale: expected a shape broadcastable to \(2, 2, 70\)"):
        fusedattn.attention(q, key_cache, key_cache, k_descale=torch.ones(3))
    with pytest.raises(TypeError, match="k_descale: expected a floating dtype"):
        fusedattn.attention(q, key_cache, key_cache, k_descale=torch.ones(1, dtype=torch.int32))
    with pytest.raises(TypeError, match="q: expected dtype float16, bfloat16, float32 or float64"):
        fusedattn.attention(key_cache, key_cache, key_cache)
    with pytest.raises(TypeError, match="dtype: expected torch.float8_e4m3fn or torch.int8"):
        fusedattn.quantize_kv(k, torch.float16)
    with pytest.raises(ValueError, match="x: expected finite values"):
        fusedattn.quantize_kv(torch.tensor([[1.0, float("inf")]]))
    # The CPU kernels are inference only here: a call that needs gradients goes to the reference.
    q.requires_grad_(True)
    explanation = fusedattn.explain(q, key_cache, key_cache, k_descale=k_descale)
    assert explanation.chosen == "reference" and "8-bit K/V" in explanation.refusals["cpu"]
    out = fusedattn.attention(q, key_cache, key_cache, k_descale=k_descale)
    out.sum().backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


def test_tiny_rows_and_flash_attn_compat() -> None:
    # A row of values below float32's smallest normal gets a positive scale (never x / 0).
    values, descale = fusedattn.quantize_kv(torch.tensor([[1e-44, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]]))
    assert bool(torch.isfinite(values.float()).all()) and bool((descale > 0).all())
    # flash-attn's API takes q, k, v of one dtype: 8-bit k / v are refused, not read unscaled.
    from fusedattn import compat

    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        compat.flash_attn_func(q, q.to(torch.int8), q.to(torch.int8))
