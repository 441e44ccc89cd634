"""The public attention functions: validate, choose a backend, run its custom op."""

from __future__ import annotations

import torch

from . import repeat_calls
from .dispatch import AUTO, Explanation, explain_call, select_backend
from .ops import run_forward
from .semantics import AttentionCall
from .validation import validate_attention, validate_paged, validate_varlen
from .validation_dropin import plain_sdpa_options, sdpa_call


def _run(call: AttentionCall, backend: str, return_lse: bool, remember_as: tuple | None = None):
    """Run call on its backend; with remember_as (a repeat_calls key), keep the backend's
    prepared forward for later calls with that key."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected True or False, got {type(return_lse).__name__}")
    chosen = select_backend(call, backend)
    if remember_as is not None:
        repeat_calls.remember(remember_as, chosen, call)
    out, lse = run_forward(chosen, call)
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    query_start: int = 0,
    key_start: int = 0,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = AUTO,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused scaled dot-product attention (docs/semantics.md defines every option).

    Args:
        q: (B, Hq, Sq, D).
        k: (B, Hkv, Sk, D), with Hq a multiple of Hkv (grouped-query attention).
        v: (B, Hkv, Sk, Dv).
        causal: mask keys after each query's position.
        causal_alignment: "bottom_right" (query i at key position i + Sk - Sq, as
            FlashAttention 2.1+) or "top_left" (query i at position i, as torch SDPA).
        scale: score scale; default 1 / sqrt(D).
        attn_mask: bool (True = attend) or additive in q's dtype, broadcastable to
            (B, Hq, Sq, Sk).
        key_lengths: (B,) int; keys at index >= key_lengths[b] are masked.
        window: (left, right); query at position p sees keys p - left .. p + right.
            Either side None for unbounded.
        alibi_slopes: (Hq,) or (B, Hq); adds -slope * |p - j| to the scores.
        sinks: (Hq,) learned logits (attention sinks, gpt-oss): exp(sinks[h]) joins every
            row's softmax denominator and contributes no value; differentiable.
        softcap: softcap * tanh(s / softcap) on the scaled scores.
        dropout_p: probability of dropping an attention probability.
        dropout_seed: seed of the counter-based dropout mask; drawn from torch's
            generator when None.
        query_start, key_start: global index of query row 0 and of key 0 when the call is
            a block of a longer sequence (context parallelism): query i sits at position
            query_start + i (+ Sk - Sq bottom-right), key j at key_start + j, for causal,
            windows and ALiBi, and dropout hashes the global indices.
        k_descale, v_descale: with k and v float8_e4m3fn or int8 (a quantized cache), float
            scales broadcastable to (B, Hkv, Sk): the key is k.float() * k_descale[..., None]
            (None: 1). See fusedattn.quantize_kv.
        return_lse: also return the log-sum-exp of the scores, (B, Hq, Sq) float32.
        backend: "auto", or a backend name (see fusedattn.explain / fusedattn info).

    Returns:
        out (B, Hq, Sq, Dv) in q's dtype, or (out, lse) with return_lse=True.
    """
    plain = (
        attn_mask is None
        and key_lengths is None
        and alibi_slopes is None
        and sinks is None
        and dropout_seed is None
        and type(dropout_p) in (float, int)
        and dropout_p == 0
        and type(return_lse) is bool
    )
    key = None
    if plain:
        scales = (k_descale, v_descale)
        key = repeat_calls.dense_key(
            q, k, v, causal, causal_alignment, scale, window, softcap, query_start, key_start, backend, scales=scales
        )
        prepared = None if key is None else repeat_calls.lookup(key)
        if prepared is not None:
            out, lse = prepared(q, k, v, *scales)
            return (out, lse) if return_lse else out
    call = validate_attention(
        q,
        k,
        v,
        causal=causal,
        causal_alignment=causal_alignment,
        scale=scale,
        attn_mask=attn_mask,
        key_lengths=key_lengths,
        window=window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        query_start=query_start,
        key_start=key_start,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    return _run(call, backend, return_lse, remember_as=key)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = AUTO,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length sequences.

    Args:
        q: (Tq, Hq, D), the query tokens of all sequences, concatenated.
        k: (Tk, Hkv, D); v: (Tk, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int offsets; sequence i is
            q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] against k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence.
        Other options as in :func:`attention`; alibi_slopes may be (Hq,) or (N, Hq);
        k_descale / v_descale broadcastable to (Tk, Hkv).

    Returns:
        out (Tq, Hq, Dv), or (out, lse) with lse (Hq, Tq) float32.
    """
    call = validate_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=causal,
        causal_alignment=causal_alignment,
        scale=scale,
        window=window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    return _run(call, backend, return_lse)


def attention_paged(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_lengths: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    causal: bool = False,
    causal_alignment: str = "bottom_right",
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = AUTO,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over a paged KV cache, read where the blocks lie (no gather).

    The vLLM layout: sequence i's keys are its first cache_lengths[i] positions; position j
    is row j % block_size of block block_table[i, j // block_size]. Serves decoding (one
    query per sequence) and chunked prefill (several new queries per sequence, their keys
    already written to the cache: bottom-right causal alignment puts the last query at the
    last key). Inference only: the fast backends have no backward here (the reference,
    which gathers, differentiates it).

    Args:
        q: (Tq, Hq, D), the new query tokens of all sequences, concatenated.
        key_cache: (num_blocks, block_size, Hkv, D); value_cache: (num_blocks, block_size, Hkv, Dv).
            Any block size >= 1; Hq a multiple of Hkv.
        block_table: (N, max_blocks) int32 block numbers; entries past a sequence's last
            block are never read (they may hold anything, -1 included).
        cache_lengths: (N,) int32, keys of each sequence, at most max_blocks * block_size.
        cu_seqlens_q: (N + 1,) int offsets of each sequence's queries in q.
        max_seqlen_q: at least the longest query sequence.
        Other options as in :func:`attention`; alibi_slopes may be (Hq,) or (N, Hq). Causal
        alignment and ALiBi positions use each sequence's own key count. 8-bit caches take
        k_descale / v_descale broadcastable to (num_blocks, block_size, Hkv).

    Returns:
        out (Tq, Hq, Dv), or (out, lse) with lse (Hq, Tq) float32.
    """
    call = validate_paged(
        q,
        key_cache,
        value_cache,
        block_table,
        cache_lengths,
        cu_seqlens_q,
        max_seqlen_q,
        causal=causal,
        causal_alignment=causal_alignment,
        scale=scale,
        window=window,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        softcap=softcap,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    return _run(call, backend, return_lse)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics.

    query (..., L, E), key (..., S, E), value (..., S, Ev), any number of batch dims,
    broadcast as torch broadcasts them; attn_mask bool (True = attend), additive (float32
    or query's dtype) or a torch.nn.attention.bias.CausalBias (run as the causal alignment
    it names, never materialized), broadcastable to (..., L, S); is_causal aligned
    top-left, also together with a mask. Inputs torch refuses are refused with torch's
    exception class (fusedattn.errors). Dropout draws its seed from torch's generator;
    docs/swap-in.md lists what still differs from torch.
    """
    repeat_key = None
    if attn_mask is None and scale is None and enable_gqa is False and type(dropout_p) is float and dropout_p == 0.0:
        repeat_key = repeat_calls.dense_key(
            query, key, value, is_causal, "top_left", None, None, None, 0, 0, AUTO, entry="sdpa"
        )
        prepared = None if repeat_key is None else repeat_calls.lookup(repeat_key)
        if prepared is not None:
            return prepared(query, key, value)[0]
    planned = sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(planned, torch.Tensor):  # empty problems, head dims past the kernels'
        return planned
    (q, k, v), options, out_shape = planned
    out = attention(q, k, v, **options)
    plain = repeat_key is not None and q is query and k is key and v is value and options["attn_mask"] is None
    if plain and options == plain_sdpa_options(is_causal):
        # The plain plan: later identical calls run what attention() just remembered.
        repeat_calls.remember_alias(
            repeat_key, repeat_calls.dense_key(q, k, v, is_causal, "top_left", None, None, None, 0, 0, AUTO)
        )
    if out.shape != out_shape:  # inputs of another rank than 4, or broadcast batch dims
        out = out.reshape(out_shape)
    return out if out.dtype == query.dtype else out.to(query.dtype)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> Explanation:
    """Which backend attention(q, k, v, **kwargs) would run, and why not the others.

    Pass cu_seqlens_q, cu_seqlens_k, max_seqlen_q and max_seqlen_k to ask about
    attention_varlen; block_table, cache_lengths, cu_seqlens_q and max_seqlen_q (k, v the
    caches) to ask about attention_paged. print() the result for a readable table.
    """
    backend = kwargs.pop("backend", AUTO)
    kwargs.pop("return_lse", None)
    if "block_table" in kwargs:
        paged = [kwargs.pop(name) for name in ("block_table", "cache_lengths", "cu_seqlens_q", "max_seqlen_q")]
        call = validate_paged(q, k, v, *paged, **kwargs)
    elif "cu_seqlens_q" in kwargs:
        varlen = [kwargs.pop(name) for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
        call = validate_varlen(q, k, v, *varlen, **kwargs)
    else:
        call = validate_attention(q, k, v, **kwargs)
    return explain_call(call, backend)
