"""FlashAttention 2's Python API on top of fusedattn: change the import, keep the code.

    # from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from fusedattn.compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same signatures, layouts and semantics as flash-attn 2.x: tensors are (batch, seqlen,
heads, head_dim) (varlen: (total_tokens, heads, head_dim)); causal masks are aligned to
the bottom-right corner; window_size=(-1, -1) is unbounded (a negative side is
unbounded); softcap=0.0 is off; alibi_slopes (heads,) or (batch, heads) add
-slope * |i + Sk - Sq - j|; lse is (batch, heads, Sq) (varlen: (heads, total_q)).
Every call goes through :func:`fusedattn.attention` / :func:`fusedattn.attention_varlen`,
which check the arguments and pick the backend.

Arguments are taken in every form flash-attn's op converts (numpy integers, 0-d tensors,
window_size as a 1-D tensor of two); bad block tables and cache lengths raise
fusedattn.errors.CacheMetadataError, a RuntimeError as in flash-attn. Differences, by
design, each with its reason, are listed in docs/swap-in.md: among them, the probabilities
returned with ``return_attn_probs=True`` are exact and normalized, shaped (batch, heads, Sq,
Sk), with dropped entries negated as FlashAttention encodes them; ``deterministic`` and
``num_splits`` have no effect; rotary embeddings in :func:`flash_attn_with_kvcache` are not
implemented; the kernels run on any device and dtype fusedattn supports (CPU included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import semantics
from .api import attention, attention_paged, attention_varlen
from .dispatch import select_backend
from .nn.weights import attention_probabilities
from .quantization import quantize_scaled
from .validation import (
    integer_argument,
    integer_pair,
    number_argument,
    poison_if_invalid,
    require_dtype_of_q,
    validate_attention,
)
from .validation_kvcache import check_kv_cache_tensors, kv_cache_indices, paged_sequence_lengths

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

WindowSize = Sequence[int] | torch.Tensor
"""(left, right): a tuple or list of ints, or a 1-D integer tensor or numpy array of two."""
FlashOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""out, or (out, lse, probabilities) with return_attn_probs=True."""


# ---- convention translation ---------------------------------------------------------
def _window(window_size: WindowSize) -> tuple[int | None, int | None] | None:
    """FlashAttention's (left, right) with -1 = unbounded -> fusedattn's (left, right) with None.

    Sides are taken as flash-attn's op takes them (numpy integers, 0-d tensors: its tests pass
    torch.randint(0, s, (2,))); a tensor's values are read on the host.
    """
    left, right = integer_pair("window_size", window_size)
    if left < 0 and right < 0:
        return None
    return (None if left < 0 else left, None if right < 0 else right)


def _options(
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: WindowSize,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    learnable_sink: torch.Tensor | None = None,
) -> dict:
    """FlashAttention's options as fusedattn.attention keyword arguments (flash-attn 4's
    learnable_sink is fusedattn's sinks). Numbers are taken in every form flash-attn's op
    converts (numpy scalars, 0-d tensors), as Python numbers; fusedattn then checks values."""
    options = dict(
        causal=causal,
        scale=None if softmax_scale is None else number_argument("softmax_scale", softmax_scale),
        window=_window(window_size),
        alibi_slopes=alibi_slopes,
        softcap=number_argument("softcap", softcap),
        dropout_p=number_argument("dropout_p", dropout_p),
    )
    if learnable_sink is not None:
        options["sinks"] = learnable_sink
    return options


def _one_dtype(q: object, k: object, v: object) -> None:
    # A q of no floating dtype is refused by name in validation (before k, v are compared).
    if isinstance(q, torch.Tensor) and q.is_floating_point():
        require_dtype_of_q(q, (("k", k), ("v", v)))


def _refuse_q_descale(q: object, q_descale: object) -> None:
    if q_descale is not None:
        raise ValueError(
            f"q_descale: expected None with q of dtype {getattr(q, 'dtype', None)} (flash-attn 3 applies it to "
            "float8_e4m3fn queries only, which fusedattn does not take)"
        )


def _flash3_descales(
    q: object,
    k: object,
    q_descale: object,
    k_descale: object,
    v_descale: object,
    batch: int | None,
    heads_kv: int | None,
) -> tuple[object, object] | None:
    """flash-attn 3's q_descale / k_descale / v_descale (float32, (batch, num_heads_k): one
    scale per sequence and KV head), checked as flash-attn 3 checks them.

    flash-attn 3 reads them only with float8_e4m3fn inputs (q, k, v all fp8) and ignores
    them otherwise; fusedattn computes in q's dtype and reads only K and V in 8 bits, so:
    a float8 q is refused; K/V in q's dtype ignore the scales (returns None, as flash-attn
    3 does); 8-bit K/V (float8_e4m3fn or int8, which flash-attn 3 would refuse next to a
    float16 / bfloat16 q) take k_descale / v_descale (returned, each None or (batch,
    num_heads_k), a missing one meaning 1 as in flash-attn 3), and q_descale is refused
    there (it would scale nothing). Returns None when no scale applies.
    """
    if isinstance(q, torch.Tensor) and q.dtype == torch.float8_e4m3fn:
        raise TypeError(
            "q: float8_e4m3fn queries (flash-attn 3's FP8 path) are not supported: fusedattn computes in q's "
            "dtype and reads only K and V in 8 bits; pass q as float16 or bfloat16 (dequantized with its "
            "q_descale) and k, v as float8_e4m3fn with k_descale / v_descale"
        )
    quantized = isinstance(k, torch.Tensor) and k.dtype in semantics.QUANTIZED_KV_DTYPES
    if not quantized or (k_descale is None and v_descale is None):
        return None  # flash-attn 3 ignores scales of fp16 / bf16 inputs; unscaled 8-bit K/V are refused later
    _refuse_q_descale(q, q_descale)
    for name, scale in (("k_descale", k_descale), ("v_descale", v_descale)):
        if scale is None:
            continue
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(scale).__name__}")
        if scale.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32 (as flash-attn 3), got {scale.dtype}")
        if batch is not None and tuple(scale.shape) != (batch, heads_kv):
            raise ValueError(
                f"{name}: expected shape (batch, num_heads_k) = {(batch, heads_kv)} (flash-attn 3's one scale "
                f"per sequence and KV head), got {tuple(scale.shape)}"
            )
    return k_descale, v_descale


def _drawn_seed(dropout_p: float) -> int | None:
    # The probabilities returned with return_attn_probs must show the kernel's dropout
    # pattern, so the seed is drawn here (from torch's generator, as fusedattn would).
    # dropout_p is _options' float: one out of [0, 1] gets no seed, validation refuses it.
    if not 0.0 < dropout_p <= 1.0:
        return None
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _flash_probabilities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
    """FlashAttention's S_dmask: (B, H, Sq, Sk) probabilities, negative where dropped."""
    with torch.no_grad():
        probabilities, keep = attention_probabilities(validate_attention(q, k, v, **options))
    if keep is not None:
        probabilities = torch.where(keep, probabilities, -probabilities)
    return probabilities


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: WindowSize,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    return_attn_probs: bool,
    learnable_sink: torch.Tensor | None = None,
    descales: tuple[object, object, object] = (None, None, None),
) -> FlashOutput:
    """The dense functions on q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv);
    descales: flash-attn 3's (q_descale, k_descale, v_descale)."""
    shaped = isinstance(k, torch.Tensor) and k.dim() == 4
    scales = _flash3_descales(q, k, *descales, k.shape[0] if shaped else None, k.shape[2] if shaped else None)
    if scales is None:
        _one_dtype(q, k, v)
    # (B, S, H, D) -> fusedattn's (B, H, S, D): a view, never a copy.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink)
    if scales is not None:
        # (B, Hkv) per sequence and KV head -> broadcast over the keys: (B, Hkv, 1), a view.
        options["k_descale"], options["v_descale"] = (None if s is None else s[:, :, None] for s in scales)
    if not return_attn_probs:
        return attention(q, k, v, **options).transpose(1, 2).contiguous()
    options["dropout_seed"] = _drawn_seed(options["dropout_p"])
    out, lse = attention(q, k, v, return_lse=True, **options)
    return out.transpose(1, 2).contiguous(), lse, _flash_probabilities(q, k, v, options)


# ---- dense ---------------------------------------------------------------------------
def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    learnable_sink: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> FlashOutput:
    """flash_attn.flash_attn_func.

    Args:
        q: (B, Sq, Hq, D); k: (B, Sk, Hkv, D); v: (B, Sk, Hkv, Dv), Hq a multiple of Hkv.
        dropout_p: set it to 0.0 for evaluation, as with flash-attn.
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned causal mask.
        window_size: (left, right); query i sees keys i + Sk - Sq - left .. i + Sk - Sq + right.
        softcap: > 0 applies softcap * tanh(s / softcap).
        alibi_slopes: (Hq,) or (B, Hq) float32.
        deterministic: accepted for compatibility; no effect.
        return_attn_probs: also return lse (B, Hq, Sq) float32 and the probabilities.
        learnable_sink: (Hq,) attention-sink logits (flash-attn 4's name; fusedattn's sinks).
        q_descale, k_descale, v_descale: flash-attn 3's names, float32 (B, Hkv): with k, v
            float8_e4m3fn or int8 (q float16 / bfloat16 / float32) the key is
            k.float() * k_descale[b, h] (fusedattn's quantized K/V); ignored, as in flash-attn
            3, when k, v have q's dtype. A float8 q is refused (fusedattn computes in q's dtype).

    Returns:
        out (B, Sq, Hq, Dv), or (out, lse, probabilities) with return_attn_probs.
    """
    del deterministic  # fusedattn's backward does not depend on it
    return _dense(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, learnable_sink,
        (q_descale, k_descale, v_descale),
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> FlashOutput:
    """flash_attn.flash_attn_qkvpacked_func: qkv (B, S, 3, H, D); returns out (B, S, H, D)."""
    del deterministic
    q, k, v = qkv.unbind(dim=2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> FlashOutput:
    """flash_attn.flash_attn_kvpacked_func: q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D)."""
    del deterministic
    k, v = kv.unbind(dim=2)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


# ---- varlen --------------------------------------------------------------------------
def _per_token(scales: torch.Tensor | None, cu_seqlens: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """(N, Hkv) scales per sequence -> (tokens, Hkv) per packed token: token t takes the scale
    of the sequence whose offsets hold it (searched on the device: no host read). Only the
    small scale tensor is gathered, never the keys."""
    if scales is None or cu_seqlens is None or cu_seqlens.is_floating_point():
        return scales  # a bad cu_seqlens_k is refused, by name, by attention_varlen
    positions = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return scales[sequence.clamp(max=max(scales.shape[0] - 1, 0))]


def _paged_keys(cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed (sum(lengths), Hkv, D) keys of a paged cache (num_blocks, block_size, Hkv, D):
    the first lengths[b] positions of each sequence b, in order.

    Sequence b's position p lives in block block_table[b, p // block_size], row p % block_size.
    """
    sequence = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(sequence.shape[0], device=lengths.device) - offsets[sequence]
    block_size = cache.shape[1]
    blocks = block_table.long()[sequence, position // block_size]
    return cache[blocks, position % block_size]


def _paged(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    options: dict,
    invalid: torch.Tensor | None,
    return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """attention_paged over the cache where it lies, with FlashAttention's options (no dropout:
    paged calls are inference), outputs poisoned when unchecked indices were invalid."""
    options = dict(options)
    if options.pop("dropout_p") not in (0, 0.0):
        raise ValueError("dropout_p: expected 0.0 with block_table (paged KV caches are inference only)")
    result = attention_paged(
        q, key_cache, value_cache, table, lengths, cu_seqlens_q, max_seqlen_q, return_lse=return_lse, **options
    )
    outputs = poison_if_invalid(invalid, *(result if return_lse else (result,)))
    return outputs if return_lse else outputs[0]


def _varlen_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    options: dict,
) -> torch.Tensor:
    """(N, H, max_seqlen_q, max_seqlen_k) probabilities, sequence by sequence, zero beyond
    each length (FlashAttention's shape, without its rounding of the sizes).

    The dropout pattern of sequence i is the varlen one: its hash uses sequence number i.
    """
    dropout_p, seed = options["dropout_p"], options["dropout_seed"]
    offsets_q, offsets_k = cu_q.tolist(), cu_k.tolist()
    count = len(offsets_q) - 1
    result = q.new_zeros(count, q.shape[1], max_seqlen_q, max_seqlen_k)
    slopes = options.get("alibi_slopes")
    for index in range(count):
        q_i = q[offsets_q[index] : offsets_q[index + 1]].transpose(0, 1)[None]
        k_i = k[offsets_k[index] : offsets_k[index + 1]].transpose(0, 1)[None]
        v_i = v[offsets_k[index] : offsets_k[index + 1]].transpose(0, 1)[None]
        if q_i.shape[2] == 0 or k_i.shape[2] == 0:
            continue
        per_sequence = dict(
            options,
            alibi_slopes=slopes[index] if slopes is not None and slopes.dim() == 2 else slopes,
            dropout_p=0.0,
            dropout_seed=None,
        )
        probabilities = _flash_probabilities(q_i, k_i, v_i, per_sequence)[0]
        if dropout_p > 0.0:
            sequence = torch.tensor([index], device=q.device)
            keep = semantics.dropout_keep_mask(seed, dropout_p, sequence, q.shape[1], q_i.shape[2], k_i.shape[2])[0]
            probabilities = torch.where(keep, probabilities, -probabilities)
        result[index, :, : q_i.shape[2], : k_i.shape[2]] = probabilities
    return result


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    learnable_sink: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> FlashOutput:
    """flash_attn.flash_attn_varlen_func.

    Args:
        q: (Tq, Hq, D); k: (Tk, Hkv, D); v: (Tk, Hkv, Dv), packed sequences.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 offsets.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        block_table: (N, max_blocks) int32 with k, v a paged cache (num_blocks, block_size,
            Hkv, D): sequence i's keys are its first cu_seqlens_k[i + 1] - cu_seqlens_k[i]
            positions in its blocks, read in place (fusedattn.attention_paged; no dropout).
        q_descale, k_descale, v_descale: as in :func:`flash_attn_func`, (N, Hkv): one scale
            per sequence and KV head (not with block_table: fusedattn's scales of a paged
            cache belong to its rows, which sequences may share).
        Other options (learnable_sink included) as in :func:`flash_attn_func`.

    Returns:
        out (Tq, Hq, Dv), or (out, lse (Hq, Tq), probabilities (N, Hq, max_seqlen_q, max_seqlen_k)).
    """
    del deterministic
    invalid = None
    offsets = cu_seqlens_k if isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_k.dim() == 1 else None
    shaped = offsets is not None and isinstance(k, torch.Tensor) and k.dim() == 3
    scales = _flash3_descales(
        q, k, q_descale, k_descale, v_descale, offsets.shape[0] - 1 if shaped else None, k.shape[1] if shaped else None
    )
    if scales is None:
        _one_dtype(q, k, v)
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink)
    if scales is not None:
        if block_table is not None:
            raise NotImplementedError(
                "k_descale, v_descale: with block_table flash-attn 3's scales are per sequence, fusedattn's per "
                "cache row (blocks may be shared by sequences); call fusedattn.attention_paged with scales of "
                "shape (num_blocks, block_size, Hkv)"
            )
        options["k_descale"], options["v_descale"] = (_per_token(s, offsets, k.shape[0]) for s in scales)
    max_seqlen_q = integer_argument("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = integer_argument("max_seqlen_k", max_seqlen_k)
    if block_table is not None:
        lengths, table, invalid = paged_sequence_lengths(cu_seqlens_q, cu_seqlens_k, block_table, k, q)
        if not return_attn_probs:
            return _paged(q, k, v, table, lengths, cu_seqlens_q, max_seqlen_q, options, invalid, False)
        # The probabilities (a debugging output) come from the keys gathered into a packed copy.
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "return_attn_probs: with block_table the probabilities are computed from keys packed by the "
                "values of cu_seqlens_k, which torch.compile cannot trace; call it outside the compiled region"
            )
        out, lse = _paged(q, k, v, table, lengths, cu_seqlens_q, max_seqlen_q, options, invalid, True)
        k, v = _paged_keys(k, table, lengths), _paged_keys(v, table, lengths)
        cu_seqlens_k = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(cu_seqlens_k.dtype)
        probabilities = _varlen_probabilities(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dict(options, dropout_seed=None)
        )
        return out, lse, probabilities
    if not return_attn_probs:
        out = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
        return poison_if_invalid(invalid, out)[0]
    options["dropout_seed"] = _drawn_seed(options["dropout_p"])
    out, lse = attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse=True, **options
    )
    out, lse = poison_if_invalid(invalid, out, lse)
    return out, lse, _varlen_probabilities(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> FlashOutput:
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (T, 3, H, D)."""
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> FlashOutput:
    """flash_attn.flash_attn_varlen_kvpacked_func: q (Tq, Hq, D), kv (Tk, 2, Hkv, D)."""
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )  # fmt: skip


# ---- KV cache ------------------------------------------------------------------------
def _write_new_keys(
    cache: torch.Tensor,
    new: torch.Tensor,
    cache_rows: torch.Tensor,
    start: torch.Tensor,
    block_table: torch.Tensor | None,
    invalid: torch.Tensor | None,
) -> None:
    """cache[cache_rows[b], start[b] + t] = new[b, t], in place (through block_table if paged).

    With invalid set (indices unchecked on the host, clamped), the rows are written back
    unchanged, so invalid indices never overwrite another sequence's cache.
    """
    # Clamped below too: with unchecked (invalid) lengths a start may be negative.
    positions = (start[:, None] + torch.arange(new.shape[1], device=cache.device)[None, :]).clamp(min=0)
    if block_table is None:
        rows, positions = cache_rows[:, None], positions.clamp(max=cache.shape[1] - 1)
    else:
        block_size = cache.shape[1]
        blocks = positions // block_size
        rows = torch.gather(block_table, 1, blocks.clamp(max=block_table.shape[1] - 1))
        positions = positions % block_size
    if invalid is not None:
        new = torch.where(invalid, cache[rows, positions], new)
    cache[rows, positions] = new


def _kv_cache_descales(
    q: object, k_cache: object, q_descale: object, k_descale: object, v_descale: object
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """flash-attn 3's scales of an 8-bit cache: (k_descale, v_descale), each None (meaning 1,
    as in flash-attn 3) or (B, Hkv) float32, one per batch element and KV head (flash-attn 3
    indexes them by batch element, not by cache row). None for caches in q's dtype, whose
    scales are ignored as there."""
    shaped = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k_cache))
    batch, heads_kv = (q.shape[0], k_cache.shape[2]) if shaped else (None, None)
    scales = _flash3_descales(q, k_cache, q_descale, k_descale, v_descale, batch, heads_kv)
    if scales is None and isinstance(k_cache, torch.Tensor) and k_cache.dtype in semantics.QUANTIZED_KV_DTYPES:
        _refuse_q_descale(q, q_descale)
        return None, None
    return scales


def _quantized_new_keys(new: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """New keys or values (B, S_new, Hkv, D) -> the 8-bit cache's dtype.

    Already in it (flash-attn 3's k / v of an FP8 cache): written as they are, so the
    caller quantized them with the cache's scale. In q's dtype: new / scale of their batch
    element and KV head (scale (B, Hkv), None = 1), rounded as fusedattn.quantize_kv rounds
    (quantization.quantize_scaled).
    """
    if new.dtype == cache_dtype:
        return new
    scaled = new.float() if scale is None else new.float() / scale[:, None, :, None]
    return quantize_scaled(scaled, cache_dtype)


def _right_aligned_keys(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    block_table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys (B, span, Hkv, D), values, mask (B, 1, 1, span)): row b's cache positions
    starts[b] .. ends[b] - 1 in the last slots, mask True on them.

    span is the longest row eagerly, the cache capacity while compiling (a static shape).
    Slot j holds cache position j - (span - ends[b]); bottom-right alignment then gives
    each query the position it has in its own row.
    """
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    span = capacity if torch.compiler.is_compiling() or ends.numel() == 0 else int(ends.max())
    positions = torch.arange(span, device=ends.device)[None, :] - (span - ends[:, None])
    mask = positions >= starts[:, None]
    # Slots before a row's first valid key read that key (hidden by the mask): the cache
    # there is storage, which may hold NaN (0 * NaN would reach the output). A row with no
    # valid key reads the slot at its end, which only a fully masked row sees (output 0).
    positions = torch.where(mask, positions, starts[:, None]).clamp(0, max(capacity - 1, 0))
    if block_table is None:
        cache_rows = rows[:, None]
    else:
        block_size = k_cache.shape[1]
        cache_rows = torch.gather(block_table, 1, positions // block_size).clamp(0, k_cache.shape[0] - 1)
        positions = positions % block_size
    return k_cache[cache_rows, positions], v_cache[cache_rows, positions], mask[:, None, None, :]


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    learnable_sink: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash_attn.flash_attn_with_kvcache: attention over a KV cache, appending k, v in place.

    Args:
        q: (B, Sq, Hq, D).
        k_cache, v_cache: (B_cache, S_cache, Hkv, D), or (num_blocks, block_size, Hkv, D)
            with block_table (paged cache).
        k, v: optional (B, S_new, Hkv, D) new keys and values, written into the caches at
            positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 before attending.
        cache_seqlens: int or (B,) int32: tokens already in each cache row (all of S_cache
            when None).
        cache_batch_idx: (B,) which cache row each batch element uses (default 0..B-1).
        cache_leftpad: (B,) first valid cache position of each row (default 0).
        block_table: (B, max_blocks) int32 for a paged cache, read in place
            (fusedattn.attention_paged) unless cache_leftpad is given.
        causal, window_size, softcap, alibi_slopes, softmax_scale: as in
            :func:`flash_attn_func`, aligned to each row's own key count.
        rotary_cos, rotary_sin, rotary_interleaved: not implemented.
        num_splits: accepted; no effect.
        return_softmax_lse: also return lse (B, Hq, Sq) float32.
        learnable_sink: (Hq,) attention-sink logits (flash-attn 4's name; fusedattn's sinks).
        q_descale, k_descale, v_descale: flash-attn 3's names; ignored (as there) with caches
            in q's dtype. 8-bit caches (float8_e4m3fn or int8, both alike; q float16,
            bfloat16, float32 or float64) take k_descale / v_descale (B, Hkv) float32, one scale per
            batch element and KV head (a missing one is 1, as in flash-attn 3): the key is
            k_cache.float() * k_descale[b, h]. New k, v are then in the cache's dtype
            (written as they are, as flash-attn 3 does) or in q's dtype (quantized into the
            cache with that scale: k / k_descale[b, h], rounded). A float8 q and q_descale
            are refused.

    Returns:
        out (B, Sq, Hq, D), or (out, lse) with return_softmax_lse.
    """
    scales = _kv_cache_descales(q, k_cache, q_descale, k_descale, v_descale)
    integer_argument("num_splits", num_splits)  # a kernel-scheduling hint: checked, then unused
    del num_splits, rotary_interleaved
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError(
            "rotary_cos, rotary_sin: rotary embeddings are not implemented by fusedattn.compat; "
            "apply them to q and k before the call"
        )
    batch = q.shape[0]
    check_kv_cache_tensors(q, k_cache, v_cache, k, v)
    options = _options(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, learnable_sink)
    del options["dropout_p"]  # no dropout in KV-cache calls
    # Every option is checked before anything is written into the caches.
    heads_kv = k_cache.shape[2]
    # (B, Hkv) per batch element and KV head -> broadcast over the keys: (B, Hkv, 1), a view.
    descales = {}
    if scales is not None:
        descales = {name: None if s is None else s[:, :, None] for name, s in zip(("k_descale", "v_descale"), scales)}
    probe = validate_attention(
        q.transpose(1, 2),
        k_cache.new_empty(batch, heads_kv, 0, k_cache.shape[3]),
        v_cache.new_empty(batch, heads_kv, 0, v_cache.shape[3]),
        **options,
        **descales,
    )
    select_backend(probe)  # a forced backend that cannot serve the call refuses it now
    new_tokens = 0 if k is None else k.shape[1]
    rows, starts, ends, block_table, invalid = kv_cache_indices(
        q, k_cache, new_tokens, cache_seqlens, cache_batch_idx, cache_leftpad, block_table
    )
    if k is not None:
        if scales is not None:
            k, v = _quantized_new_keys(k, k_cache.dtype, scales[0]), _quantized_new_keys(v, v_cache.dtype, scales[1])
        _write_new_keys(k_cache, k, rows, ends - new_tokens, block_table, invalid)
        _write_new_keys(v_cache, v, rows, ends - new_tokens, block_table, invalid)
    position_dependent = options["window"] is not None or alibi_slopes is not None or (causal and q.shape[1] > 1)
    # attention_paged's scales belong to cache rows, flash-attn 3's to batch elements (which
    # may share blocks): scaled 8-bit paged caches take the gathering path below.
    per_batch_scales = scales is not None and any(s is not None for s in scales)
    if block_table is not None and cache_leftpad is None and not per_batch_scales:
        # Read in place: each batch row is a sequence of Sq queries over its ends[b] keys.
        seqlen_q = q.shape[1]
        cu_seqlens_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seqlen_q
        out, lse = attention_paged(
            q.reshape(batch * seqlen_q, q.shape[2], q.shape[3]), k_cache, v_cache, block_table, ends,
            cu_seqlens_q, seqlen_q, return_lse=True, **options,
        )  # fmt: skip
        out = out.view(batch, seqlen_q, q.shape[2], v_cache.shape[3])
        lse = lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1).contiguous()
        out, lse = poison_if_invalid(invalid, out, lse)
        return (out, lse) if return_softmax_lse else out
    if block_table is None and cache_leftpad is None and not position_dependent:
        # Keys 0 .. end - 1 of each row: a dense call with key lengths. The only query (or
        # every query, without causal) sees all of them, so no position is involved.
        keys, values = (k_cache[:batch], v_cache[:batch]) if cache_batch_idx is None else (k_cache[rows], v_cache[rows])
        mask, key_lengths = None, ends
    else:
        # Positions count from each row's own first valid key: gather every row's keys so
        # that they end together at the last slot, mask the slots before its first valid
        # key, and align bottom-right. Shapes stay static under torch.compile.
        keys, values, mask = _right_aligned_keys(k_cache, v_cache, rows, starts, ends, block_table)
        key_lengths = None
    out, lse = attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask,
        key_lengths=key_lengths,
        return_lse=True,
        **options,
        **descales,
    )
    out = out.transpose(1, 2).contiguous()
    out, lse = poison_if_invalid(invalid, out, lse)
    return (out, lse) if return_softmax_lse else out
