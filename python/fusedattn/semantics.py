"""The function every backend computes, in one place.

docs/semantics.md is the prose version of this module. Everything a backend needs to
know about *what* to compute lives here: the normalized call (:class:`AttentionCall`),
the feature names backends declare, query positions under both causal alignments, the
ALiBi bias, the visibility rule (causal, window, key lengths) and the counter-based
dropout generator that every backend reproduces bit for bit.

The helpers here are written in plain PyTorch and are used by the reference backend;
the fast kernels re-implement the same formulas in Triton, C++ and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

MAX_HEAD_DIM = 576
"""Largest head dim (D or Dv) any backend is asked to serve: 512 (Gemma 4's global layers)
and DeepSeek's absorbed MLA decode (D 576 for q/k, Dv 512). Backends declare their own
limit (Capabilities.max_head_dim)."""

CausalAlignment = Literal["bottom_right", "top_left"]
CAUSAL_ALIGNMENTS: tuple[str, ...] = ("bottom_right", "top_left")

# Feature names a backend lists in its capabilities. A call's features are derived by
# AttentionCall.features(); the dispatcher compares the two sets and nothing else.
FEATURES: tuple[str, ...] = (
    "causal_bottom_right",
    "causal_top_left",
    "gqa",
    "bool_mask",
    "additive_mask",
    "key_lengths",
    "varlen",
    "window",
    "alibi",
    "softcap",
    "dropout",
    "value_head_dim",  # Dv != D
    "sinks",  # a learned logit per query head in every row's softmax denominator
    "paged_kv",  # keys and values read in place from a paged cache through a block table
    "sequence_block",  # query_start / key_start: a block of a longer sequence (context parallelism)
    "quantized_kv",  # 8-bit K and V (float8_e4m3fn or int8) with k_descale / v_descale
    "backward",
)

# K / V dtypes read as 8-bit values times a float32 scale (k_descale / v_descale).
QUANTIZED_KV_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.int8)

# Option tensors the output is differentiable in (besides q, k, v): the mask and the ALiBi
# slopes enter the scores additively, the sinks the softmax denominator. A backend lists
# the ones its backward differentiates (Capabilities.differentiable_options); the
# dispatcher refuses a call whose option requires grad to a backend that does not list it.
DIFFERENTIABLE_OPTIONS: tuple[str, ...] = ("attn_mask", "alibi_slopes", "sinks")

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class AttentionCall:
    """A validated, normalized attention call: what every backend receives.

    Dense layout: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv).
    Varlen layout: q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv) with
    cu_seqlens_q / cu_seqlens_k (N + 1,) int32 offsets into the packed tokens.

    attn_mask, when present, is a 4-D view broadcast (with zero strides, never copied)
    to (B, Hq, Sq, Sk); bool (True = attend) or additive in q's dtype.
    key_lengths is (B,) int32. alibi_slopes is (Hq,) or (B, Hq) float32 (float64 for
    float64 inputs); sinks is (Hq,) float32 (float64 for float64 inputs).
    window_left / window_right are None for an unbounded side.
    softcap is None when disabled. dropout_seed is set whenever dropout_p > 0.
    cu_seqlens and key_lengths are contiguous int32; max_seqlen_q/k are at most the packed
    token counts.

    Paged layout (a varlen call whose keys live in a paged cache): q (Tq, Hq, D) with
    cu_seqlens_q; k (num_blocks, block_size, Hkv, D), v (num_blocks, block_size, Hkv, Dv);
    block_table (N, max_blocks) and cache_lengths (N,) contiguous int32; cu_seqlens_k None.
    Sequence i has cache_lengths[i] keys: key j is row j % block_size of block
    block_table[i, j // block_size]. max_seqlen_k is the table's capacity,
    max_blocks * block_size.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    causal: bool = False
    causal_alignment: CausalAlignment = "bottom_right"
    attn_mask: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    window_left: int | None = None
    window_right: int | None = None
    alibi_slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    cache_lengths: torch.Tensor | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    # Global index of query row 0 and key 0 when the call is a block of a longer sequence
    # (dense calls only): positions and the dropout hash use global indices.
    query_start: int = 0
    key_start: int = 0
    # 8-bit K / V (QUANTIZED_KV_DTYPES): float32 scales expanded (zero strides, no copy) to
    # k.shape[:-1] / v.shape[:-1], or None for 1; the key is k.float() * k_descale[..., None].
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None
    needs_grad: bool = False
    # True when the values of cu_seqlens / key_lengths were checked on the host. False
    # inside torch.compile traces and CUDA graph capture (see validation.metadata_guard).
    metadata_checked: bool = False

    # ---- shape facts -------------------------------------------------------------
    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def is_paged(self) -> bool:
        return self.block_table is not None

    @property
    def block_size(self) -> int:
        """Keys per block of a paged cache (paged calls only)."""
        return self.k.shape[1]

    @property
    def batch(self) -> int:
        """B for the dense layout, the number of sequences N for varlen."""
        if self.is_varlen:
            return self.cu_seqlens_q.shape[0] - 1
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[-3] if not self.is_varlen else self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[-2] if self.is_paged else self.k.shape[-3] if not self.is_varlen else self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[-1]

    @property
    def seqlen_q(self) -> int:
        """Sq for dense calls, max_seqlen_q for varlen."""
        return self.max_seqlen_q if self.is_varlen else self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.max_seqlen_k if self.is_varlen else self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def is_empty(self) -> bool:
        """No query rows, or no keys at all: the answer needs no kernel."""
        if self.q.numel() == 0 or self.k.shape[-2 if not self.is_varlen else 0] == 0:
            return True
        return self.is_paged and self.block_table.shape[1] == 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.head_dim_v)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        if self.is_varlen:
            return (self.heads_q, self.q.shape[0])
        return tuple(self.q.shape[:-1])

    def features(self) -> frozenset[str]:
        """The feature names (see FEATURES) this call uses."""
        used = set()
        if self.causal:
            used.add("causal_" + self.causal_alignment)
        elif self.causal_alignment == "top_left" and (
            self.window_left is not None or self.window_right is not None or self.alibi_slopes is not None
        ):
            # Positions matter without causal masking only through windows and ALiBi.
            used.add("causal_top_left")
        if self.heads_q != self.heads_kv:
            used.add("gqa")
        if self.attn_mask is not None:
            used.add("bool_mask" if self.attn_mask.dtype == torch.bool else "additive_mask")
        if self.key_lengths is not None:
            used.add("key_lengths")
        if self.is_varlen:
            used.add("varlen")
        if self.is_paged:
            used.add("paged_kv")
        if self.window_left is not None or self.window_right is not None:
            used.add("window")
        if self.alibi_slopes is not None:
            used.add("alibi")
        if self.sinks is not None:
            used.add("sinks")
        if self.softcap is not None:
            used.add("softcap")
        if self.dropout_p > 0.0:
            used.add("dropout")
        if self.head_dim_v != self.head_dim:
            used.add("value_head_dim")
        if self.query_start != 0 or self.key_start != 0:
            used.add("sequence_block")
        if self.k.dtype in QUANTIZED_KV_DTYPES:
            used.add("quantized_kv")
        if self.needs_grad:
            used.add("backward")
        return frozenset(used)

    def differentiated_options(self) -> frozenset[str]:
        """The DIFFERENTIABLE_OPTIONS whose tensors require grad (with grad mode on)."""
        if not torch.is_grad_enabled():
            return frozenset()
        return frozenset(
            name
            for name in DIFFERENTIABLE_OPTIONS
            if getattr(self, name) is not None and getattr(self, name).requires_grad
        )

    def with_tensors(self, **tensors: torch.Tensor) -> AttentionCall:
        return replace(self, **tensors)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- positions ----------------------------------------------------------------------
def query_offset(seqlen_q: int, seqlen_k: int, alignment: str, query_start: int = 0, key_start: int = 0) -> int:
    """Position of query row 0 counted from the call's key 0: Sk - Sq for bottom-right
    alignment, 0 for top-left, plus query_start - key_start for a block of a longer
    sequence (query row i is global row query_start + i, key j global key key_start + j)."""
    alignment_shift = seqlen_k - seqlen_q if alignment == "bottom_right" else 0
    return alignment_shift + query_start - key_start


def visible_keys(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    alignment: str,
    window_left: int | None,
    window_right: int | None,
    device: torch.device | str = "cpu",
    query_start: int = 0,
    key_start: int = 0,
) -> torch.Tensor | None:
    """(Sq, Sk) bool, True where query i may see key j under causal and window rules.

    Query i sits at position p_i = i + query_offset. Causal allows j <= p_i; a window
    allows p_i - window_left <= j <= p_i + window_right. Returns None when nothing is
    masked by these rules.
    """
    if not causal and window_left is None and window_right is None:
        return None
    offset = query_offset(seqlen_q, seqlen_k, alignment, query_start, key_start)
    position = torch.arange(seqlen_q, device=device)[:, None] + offset
    key = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    right = window_right
    if causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        allowed &= key <= position + right
    if window_left is not None:
        allowed &= key >= position - window_left
    return allowed


def within_key_lengths(key_lengths: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """(B, Sk) bool, True where key j < key_lengths[b]: the keys of batch element b. The
    rest is storage, never read (docs/semantics.md, "Storage past the lengths")."""
    return torch.arange(seqlen_k, device=key_lengths.device)[None, :] < key_lengths[:, None]


def alibi_bias(
    slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, alignment: str, query_start: int = 0, key_start: int = 0
) -> torch.Tensor:
    """ALiBi bias -slope * |p_i - j|: (..., Hq, Sq, Sk) for slopes (..., Hq)."""
    offset = query_offset(seqlen_q, seqlen_k, alignment, query_start, key_start)
    position = torch.arange(seqlen_q, device=slopes.device)[:, None] + offset
    key = torch.arange(seqlen_k, device=slopes.device)[None, :]
    distance = (position - key).abs().to(slopes.dtype)
    return -slopes[..., None, None] * distance


def sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """d sinks[h] = -sum over the rows of head h of exp(sinks[h] - lse) * delta: the sink's
    probability in the row times delta = rowsum(dO * O) (the softmax gradient of a logit
    with no value). lse, delta and row_valid are (B, Hq, Sq), or (Hq, T) for varlen;
    rows where row_valid is False (tokens of no sequence) or lse is -inf add nothing."""
    heads_dim = 1 if lse.dim() == 3 else 0
    shape = [1] * lse.dim()
    shape[heads_dim] = -1
    sink = sinks.to(torch.float32).view(shape)
    probability = torch.exp(sink - lse.float())
    terms = torch.where(row_valid & (lse != float("-inf")), -probability * delta.float(), 0.0)
    return terms.sum(dim=[d for d in range(lse.dim()) if d != heads_dim])


def call_sink_gradient(
    call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """sink_gradient for a call's backward: delta from grad_out and the forward's out, rows
    valid where a varlen sequence covers the token. (Hq,) float32."""
    delta = (grad_out.float() * out.float()).sum(-1)
    if not call.is_varlen:
        return sink_gradient(call.sinks, lse, delta, torch.ones_like(lse, dtype=torch.bool))
    tokens = torch.arange(call.q.shape[0], device=lse.device)
    covered = (tokens >= call.cu_seqlens_q[0]) & (tokens < call.cu_seqlens_q[-1])
    return sink_gradient(call.sinks, lse, delta.transpose(0, 1), covered[None, :].expand_as(lse))


def apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(s / softcap) on the scaled scores."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


# ---- dropout --------------------------------------------------------------------------
# A counter-based generator: the keep decision of every (seed, sequence, head, query row,
# key) is a pure function of those integers, so each backend recomputes the identical
# mask inside its kernel and the backward pass needs no stored mask. The mixing function
# is the "lowbias32" 32-bit integer hash; all arithmetic is modulo 2**32.
_MIX_MULTIPLIER_1 = 0x7FEB352D
_MIX_MULTIPLIER_2 = 0x846CA68B


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding unsigned 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MULTIPLIER_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MULTIPLIER_2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """mix32 on a Python int (used for the per-seed key outside kernels)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MIX_MULTIPLIER_1) & _MASK32
    x ^= x >> 15
    x = (x * _MIX_MULTIPLIER_2) & _MASK32
    return x ^ (x >> 16)


def dropout_seed_key(seed: int) -> int:
    """The 32-bit key every dropout hash starts from: mix32(lo ^ mix32(hi))."""
    return mix32_int((seed & _MASK32) ^ mix32_int((seed >> 32) & _MASK32))


def dropout_threshold(dropout_p: float) -> int:
    """A score is dropped when its 32-bit hash is below this: floor(p * 2**32)."""
    return int(math.floor(dropout_p * 4294967296.0))


def dropout_keep_scale(dropout_p: float) -> float:
    """Factor applied to kept probabilities: 1 / (1 - p); 0 when p == 1."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def dropout_hash(
    seed: int,
    sequence: torch.Tensor,
    head: torch.Tensor,
    row: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """32-bit hash of (seed, sequence, head, row, key); arguments broadcast (int64).

    hash = mix32(mix32(mix32(mix32(seed_key ^ sequence) ^ head) ^ row) ^ key)
    """
    h = mix32(torch.bitwise_xor(sequence, dropout_seed_key(seed)))
    h = mix32(h ^ head)
    h = mix32(h ^ row)
    return mix32(h ^ key)


def dropout_keep_mask(
    seed: int,
    dropout_p: float,
    sequence: torch.Tensor,
    num_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    query_start: int = 0,
    key_start: int = 0,
) -> torch.Tensor:
    """(len(sequence), Hq, Sq, Sk) bool, True where the probability is kept.

    sequence holds the batch (or varlen sequence) index of each leading row; rows and keys
    are hashed by their global index (query_start + i, key_start + j).
    """
    device = sequence.device
    seq = sequence.to(torch.int64)[:, None, None, None]
    head = torch.arange(num_heads, device=device, dtype=torch.int64)[None, :, None, None]
    row = torch.arange(seqlen_q, device=device, dtype=torch.int64)[None, None, :, None] + query_start
    key = torch.arange(seqlen_k, device=device, dtype=torch.int64)[None, None, None, :] + key_start
    return dropout_hash(seed, seq, head, row, key) >= dropout_threshold(dropout_p)
