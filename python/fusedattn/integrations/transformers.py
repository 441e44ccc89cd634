"""Hugging Face transformers: ``attn_implementation="fusedattn"``.

    import fusedattn.integrations.transformers as fusedattn_hf
    fusedattn_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fusedattn")

:func:`register` adds two things, under one name:

* an attention function with ``AttentionInterface``: it receives query (B, Hq, Sq, D) and
  the un-repeated key/value (B, Hkv, Sk, D) and calls :func:`fusedattn.attention` with
  grouped-query attention, the module's causal flag (aligned bottom-right: the queries
  are the last Sq of the Sk keys), ``sliding_window``, ``softcap``, ``scaling``,
  ``dropout`` and gpt-oss's attention sinks (``s_aux``);
* a mask builder with ``AttentionMaskInterface``. Without one, transformers hands the
  function ``attention_mask=None`` and padding and sliding windows are silently lost.
  For the common patterns (causal, sliding-window causal, bidirectional, each with
  padding) the builder returns no dense mask: right padding (every row's valid keys
  are a prefix) becomes key lengths (B,), other padding a (B, Sk) bool key mask that
  fusedattn reads as a broadcast (B, 1, 1, Sk) view; causality and the window come from
  the module, as for transformers' own FlashAttention path. Any other pattern (packed
  sequences, chunked or image-token masks, static caches whose queries are not the last
  keys) gets transformers' dense boolean mask, so nothing is ever dropped.

An 8-bit KV cache (:class:`fusedattn.integrations.transformers_cache.QuantizedKVCache`)
hands the function 8-bit keys and values carrying their scales (``DESCALE_ATTRIBUTE``),
which it passes on as ``k_descale`` / ``v_descale``: the cache is read where it lies.

What the attention function receives as ``attention_mask``:
  None, (B,) int key lengths, (B, Sk) bool key mask, or a 4-D mask (bool True = attend,
  or additive float) that already holds every rule (then no causal flag or window is added).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..api import attention, attention_varlen
from ..semantics import QUANTIZED_KV_DTYPES

IMPLEMENTATION_NAME = "fusedattn"
# An 8-bit key / value from fusedattn.integrations.transformers_cache carries its float32
# scales (B, Hkv, Sk) in this attribute; they become k_descale / v_descale.
DESCALE_ATTRIBUTE = "fusedattn_descale"

__all__ = ["DESCALE_ATTRIBUTE", "IMPLEMENTATION_NAME", "fusedattn_attention_forward", "fusedattn_mask", "register"]


# ---- mask builder ----------------------------------------------------------------------
def _code_of(function: Callable) -> Any:
    return getattr(function, "__code__", None)


def _closure_values(function: Callable) -> list[Any]:
    return [cell.cell_contents for cell in (getattr(function, "__closure__", None) or ())]


def _is_sliding_causal(mask_function: Callable, sliding_window: int | None) -> bool:
    """True for masking_utils.sliding_window_causal_mask_function(sliding_window)."""
    from transformers import masking_utils

    if sliding_window is None:
        return False
    reference = masking_utils.sliding_window_causal_mask_function(sliding_window)
    if _code_of(mask_function) is not _code_of(reference):
        return False
    parts = [p for value in _closure_values(mask_function) if isinstance(value, tuple) for p in value]
    overlay = masking_utils.sliding_window_overlay(sliding_window)
    return (
        len(parts) == 2
        and parts[1] is masking_utils.causal_mask_function
        and _code_of(parts[0]) is _code_of(overlay)
        and _closure_values(parts[0]) == [sliding_window]
    )


def _is_plain_pattern(mask_function: Callable, local_size: int | None) -> bool:
    """Patterns that the module's causal flag and sliding_window fully describe."""
    from transformers import masking_utils

    if (
        mask_function is masking_utils.causal_mask_function
        or mask_function is masking_utils.bidirectional_mask_function
    ):
        return True
    # Recognizing a sliding window reads the mask function's closure, which torch.compile
    # cannot trace: compiled models get the dense mask for those layers instead.
    return not _is_tracing() and _is_sliding_causal(mask_function, local_size)


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def fusedattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask builder registered with AttentionMaskInterface (see the module docstring).

    Args:
        batch_size, q_length, kv_length: the attention's B, Sq and Sk.
        q_offset, kv_offset: positions of the first query and the first key.
        mask_function: transformers' mask pattern (causal, sliding window, ...).
        attention_mask: (B, tokens) bool padding mask, True = real token.
        local_size: the sliding window, for sliding-window masks.

    Returns:
        None (no padding), key lengths (B,) int32, a (B, kv_length) bool key mask, or
        transformers' dense (B, 1, Sq, Sk) bool mask for other patterns.
    """
    from transformers import masking_utils

    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if not aligned or not _is_plain_pattern(mask_function, local_size):
        kwargs.pop("allow_is_causal_skip", None)
        return masking_utils.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=False,
            **kwargs,
        )
    if attention_mask is None:
        return None
    keys = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)[
        :, kv_offset : kv_offset + kv_length
    ]
    keys = keys.to(torch.bool)
    if _is_tracing():
        # Reading the mask's values would break the graph: keep it as a key mask.
        return keys
    lengths = keys.sum(dim=1, dtype=torch.int32)
    if bool((keys == (torch.arange(kv_length, device=keys.device)[None, :] < lengths[:, None])).all()):
        return None if bool((lengths == kv_length).all()) else lengths
    return keys


# ---- attention function ----------------------------------------------------------------
def window_of(sliding_window: int | None, causal: bool) -> tuple[int | None, int | None] | None:
    """transformers' sliding_window w: a query sees the w keys up to itself (w - 1 back);
    non-causal modules get w - 1 on both sides, as transformers' FlashAttention path does."""
    if sliding_window is None:
        return None
    return (sliding_window - 1, None if causal else sliding_window - 1)


def fusedattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered with AttentionInterface.

    Args:
        module: the attention module (its is_causal is used unless is_causal is given).
        query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D), not repeated for GQA.
        attention_mask: what :func:`fusedattn_mask` built (see the module docstring).
        scaling: score scale (default 1 / sqrt(D)); dropout: attention dropout probability.
        sliding_window: the module's window, or None; softcap: logit softcap, or None.

    Returns:
        (attn_output (B, Sq, Hq, D) contiguous, None): weights are never materialized.
    """
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("position_bias: not supported by attn_implementation='fusedattn'")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    options: dict[str, Any] = dict(scale=scaling, softcap=softcap, dropout_p=dropout)
    # gpt-oss passes its learned sinks as s_aux: one logit per query head in the softmax.
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None:
        options["sinks"] = sinks
    for name, tensor in (("k_descale", key), ("v_descale", value)):
        # An 8-bit cache (transformers_cache.QuantizedKVCache): read in place with its scales.
        if tensor.dtype in QUANTIZED_KV_DTYPES:
            scales = getattr(tensor, DESCALE_ATTRIBUTE, None)
            if scales is None:
                raise ValueError(
                    f"{name[0]}: an 8-bit {'key' if name[0] == 'k' else 'value'} ({tensor.dtype}) without its scales; "
                    "use fusedattn.integrations.transformers_cache.QuantizedKVCache"
                )
            options[name] = scales
    packed = kwargs.get("cu_seq_lens_q")
    if packed is not None and query.shape[0] == 1 and kwargs.get("cu_seq_lens_k") is not None:
        if "k_descale" in options:
            raise NotImplementedError("packed sequences (cu_seq_lens_q) over an 8-bit KV cache are not supported")
        # Padding-free packed batches (DataCollatorWithFlattening): one varlen call.
        out = attention_varlen(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            packed,
            kwargs["cu_seq_lens_k"],
            int(kwargs["max_length_q"]),
            int(kwargs["max_length_k"]),
            causal=causal,
            window=window_of(sliding_window, causal),
            **options,
        )
        return out[None].contiguous(), None
    if attention_mask is None or attention_mask.dim() in (1, 2):
        options.update(causal=causal, window=window_of(sliding_window, causal))
        if attention_mask is not None and attention_mask.dim() == 1:
            options["key_lengths"] = attention_mask
        elif attention_mask is not None:
            options["attn_mask"] = attention_mask[:, None, None, :]
    else:
        # A dense mask holds the causal and window rules already (as with torch SDPA).
        mask = attention_mask
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
        options["attn_mask"] = mask
    out = attention(query, key, value, **options)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = IMPLEMENTATION_NAME) -> str:
    """Register fusedattn with transformers' AttentionInterface and AttentionMaskInterface.

    After this, ``attn_implementation=name`` works in from_pretrained, from_config and
    ``model.set_attn_implementation``. Idempotent. Returns name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fusedattn_attention_forward)
    AttentionMaskInterface.register(name, fusedattn_mask)
    return name
