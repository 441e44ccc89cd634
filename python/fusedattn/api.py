"""The public attention functions: validate, choose a backend, run its custom op."""

from __future__ import annotations

import torch

from .dispatch import AUTO, Explanation, explain_call, select_backend
from .ops import run_forward
from .semantics import AttentionCall
from .validation import validate_attention, validate_paged, validate_varlen


def _run(call: AttentionCall, backend: str, return_lse: bool):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected True or False, got {type(return_lse).__name__}")
    out, lse = run_forward(select_backend(call, backend), call)
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
        return_lse: also return the log-sum-exp of the scores, (B, Hq, Sq) float32.
        backend: "auto", or a backend name (see fusedattn.explain / fusedattn info).

    Returns:
        out (B, Hq, Sq, Dv) in q's dtype, or (out, lse) with return_lse=True.
    """
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
    )
    return _run(call, backend, return_lse)


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
        Other options as in :func:`attention`; alibi_slopes may be (Hq,) or (N, Hq).

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
        alignment and ALiBi positions use each sequence's own key count.

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

    query (N, ..., L, E), key (N, ..., S, E), value (N, ..., S, Ev) with 3-D or 4-D
    inputs; attn_mask bool (True = attend) or additive, broadcastable to (N, ..., L, S);
    is_causal aligned top-left. One deliberate difference: a fully masked row gives 0,
    not NaN. Dropout draws its seed from torch's generator.
    """
    if not isinstance(query, torch.Tensor) or query.dim() not in (3, 4):
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query: expected a 3-D (N, L, E) or 4-D (N, H, L, E) tensor, got {shape}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask: expected None when is_causal=True (torch SDPA rejects both), got a mask")
    three_d = query.dim() == 3
    if three_d:
        for name, tensor in (("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
                raise ValueError(f"{name}: expected a 3-D tensor like query, got {getattr(tensor, 'shape', tensor)}")
        if isinstance(attn_mask, torch.Tensor):
            # A head dimension for the mask; validation checks the broadcast (an expand in a
            # try block here would not survive torch.compile's tracing).
            target = (query.shape[0], query.shape[1], key.shape[1])
            padded = (1,) * (3 - attn_mask.dim()) + tuple(attn_mask.shape)
            if attn_mask.dim() > 3 or any(have not in (1, want) for have, want in zip(padded, target)):
                raise ValueError(
                    f"attn_mask: expected at most 3 dims broadcastable to {target}, got {tuple(attn_mask.shape)}"
                )
            if attn_mask.dim() == 3:
                attn_mask = attn_mask[:, None]
        query, key, value = query[:, None], key[:, None], value[:, None]
    if not enable_gqa and isinstance(key, torch.Tensor) and key.dim() == 4 and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"key: expected {query.shape[1]} heads (those of query) unless enable_gqa=True, got {key.shape[1]}"
        )
    out = attention(
        query,
        key,
        value,
        causal=is_causal,
        causal_alignment="top_left",
        scale=scale,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
    )
    return out[:, 0] if three_d else out


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
