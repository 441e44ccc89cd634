"""8-bit K/V caches: quantize keys or values, and append new tokens to a quantized cache.

A quantized cache holds K (or V) as float8_e4m3fn or int8 values with one float32 scale per
row (token and head): the key is ``k.float() * k_descale[..., None]`` (docs/semantics.md,
"Quantized K and V"), which every entry point (attention, attention_varlen, attention_paged)
takes as ``k_descale`` / ``v_descale``.

    key_cache, k_descale = fusedattn.quantize_kv(keys)                   # (B, Hkv, S, D) -> 8 bits
    out = fusedattn.attention(q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale)
    fusedattn.append_quantized_kv(key_cache, k_descale, new_keys, (slice(None), slice(None), slice(s, s + n)))
"""

from __future__ import annotations

from typing import Any

import torch

from .semantics import QUANTIZED_KV_DTYPES

# The largest magnitude each 8-bit format holds: a row's largest |x| maps to it.
LARGEST_QUANTIZED_VALUE: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize keys or values row by row.

    Args:
        x: (..., D) floating tensor of finite values, e.g. K (B, Hkv, S, D), packed K (T, Hkv, D)
            or a paged cache (num_blocks, block_size, Hkv, D).
        dtype: torch.float8_e4m3fn (rounded to nearest) or torch.int8 (rounded, in [-127, 127]).

    Returns:
        (values (..., D) in dtype, descale (...) float32) with x ≈ values.float() * descale[..., None];
        a row of zeros gets scale 1.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating torch.Tensor, got {type(x).__name__}")
    if dtype not in QUANTIZED_KV_DTYPES:
        raise TypeError(f"dtype: expected torch.float8_e4m3fn or torch.int8, got {dtype}")
    largest = x.detach().abs().amax(dim=-1).float()
    if not bool(torch.isfinite(largest).all()):
        raise ValueError("x: expected finite values (a row holds inf or NaN, which no scale represents)")
    # At least float32's smallest normal: a row of tiny values must not get a scale of 0 (x / 0).
    descale = torch.where(largest > 0, largest / LARGEST_QUANTIZED_VALUE[dtype], torch.ones_like(largest))
    descale = descale.clamp(min=torch.finfo(torch.float32).tiny)
    return quantize_scaled(x.detach().float() / descale[..., None], dtype), descale


def quantize_scaled(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values already divided by their scale, in dtype: int8 rounded to the nearest integer
    (ties to even) within [-127, 127]; float8_e4m3fn within [-448, 448], rounded to nearest."""
    if dtype == torch.int8:
        scaled = scaled.round()
    largest = LARGEST_QUANTIZED_VALUE[dtype]
    return scaled.clamp(-largest, largest).to(dtype)


def append_quantized_kv(cache: torch.Tensor, descale: torch.Tensor, x: torch.Tensor, index: Any) -> None:
    """Quantize x with cache's dtype and write it in place: cache[index] and descale[index].

    index addresses rows of the cache without the head dim, e.g. (slice(None), slice(None),
    slice(start, end)) for a dense (B, Hkv, S, D) cache, or (block_ids, rows) for a paged
    (num_blocks, block_size, Hkv, D) one. descale has cache's shape without the head dim
    (as quantize_kv returns it).
    """
    if cache.dtype not in QUANTIZED_KV_DTYPES:
        raise TypeError(f"cache: expected dtype torch.float8_e4m3fn or torch.int8, got {cache.dtype}")
    if tuple(descale.shape) != tuple(cache.shape[:-1]) or descale.dtype != torch.float32:
        raise ValueError(
            f"descale: expected a float32 tensor of shape {tuple(cache.shape[:-1])} (the cache without its "
            f"head dim), got {descale.dtype} {tuple(descale.shape)}"
        )
    values, scales = quantize_kv(x, cache.dtype)
    cache[index] = values
    descale[index] = scales
