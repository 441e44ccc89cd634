"""Context parallelism on torch.distributed: one sequence sharded over the ranks of a group.

    import fusedattn.distributed as fd
    q, k, v = (fd.shard_sequence(t, dim=2, placement="zigzag") for t in (q, k, v))
    out = fd.ring_attention(q, k, v, causal=True, placement="zigzag")   # this rank's rows
    full = fd.unshard_sequence(out, dim=2, placement="zigzag")

docs/distributed.md describes the placements, the measurements and running with torchrun.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ..dispatch import AUTO, select_backend
from ..validation import validate_attention
from ._blocks import HAS_OFFSETS, RingOptions
from ._checks import collective_check, dtype_code
from ._placement import PLACEMENTS, check_placement, group_rank_and_size, shard_sequence, unshard_sequence
from ._ring import Ring, RingAttentionFunction, default_pieces
from ._transformers import register_transformers
from ._varlen import varlen_attention_allgather

__all__ = [
    "PLACEMENTS",
    "register_transformers",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
    "varlen_attention_allgather",
]

# attention()'s keyword options that ring_attention forwards to its block calls.
_OPTIONS = (
    "causal", "causal_alignment", "scale", "key_lengths", "window", "alibi_slopes", "sinks",
    "softcap", "dropout_p", "dropout_seed", "return_lse", "backend",
)  # fmt: skip


def _bits(value: float | None) -> int:
    """A float as the int64 of its bits (None as -1), to compare options exactly across ranks."""
    return -1 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _side(value: int | None) -> int:
    return -1 if value is None else int(value)


def _checksum(tensor: torch.Tensor | None) -> int:
    """Bits of a position-weighted sum: replicated tensors (sinks, slopes) must agree."""
    if tensor is None:
        return -1
    values = tensor.detach().double().flatten()
    return _bits(float((values * torch.arange(1, values.numel() + 1, device=values.device)).sum()))


def _local_check(q: object, k: object, v: object, placement: object, world: int, options: dict[str, Any]):
    """Everything checkable on this rank alone: the facts all ranks must agree on, and
    (RingOptions, sinks, return_lse, needs_grad)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if "attn_mask" in unknown:
        raise NotImplementedError(
            "attn_mask: not supported by ring_attention (a dense mask does not shard); "
            "use causal, window or key_lengths"
        )
    if unknown:
        raise TypeError(
            f"ring_attention() got unexpected keyword arguments {unknown}; expected some of {list(_OPTIONS)}"
        )
    placement = check_placement(placement)
    return_lse = options.get("return_lse", False)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected True or False, got {type(return_lse).__name__}")
    backend = options.get("backend", AUTO)
    key_lengths = options.get("key_lengths")
    forwarded = {name: value for name, value in options.items() if name not in ("return_lse", "backend", "key_lengths")}
    call = validate_attention(q, k, v, **forwarded)
    batch, heads_q, length_q, head_dim = q.shape
    length_k = k.shape[2]
    if length_q != length_k:
        raise ValueError(
            f"q, k: ring_attention shards one sequence: expected the same shard length, got "
            f"q {length_q} and k {length_k}"
        )
    if placement == "zigzag" and length_q % 2:
        raise ValueError(f"q: zigzag shards hold two equal chunks: expected an even length, got {length_q}")
    if key_lengths is not None:
        # Values count the global keys: validated against the whole sequence (stand-in
        # keys expanded from one element, no memory).
        whole_k = k.new_empty(1).expand(batch, k.shape[1], length_k * world, head_dim)
        whole_v = v.new_empty(1).expand(batch, v.shape[1], length_k * world, v.shape[-1])
        key_lengths = validate_attention(q, whole_k, whole_v, key_lengths=key_lengths).key_lengths
    if call.alibi_slopes is not None and torch.is_grad_enabled() and options["alibi_slopes"].requires_grad:
        raise NotImplementedError("alibi_slopes: ring_attention does not differentiate the slopes")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # The backend must serve the blocks (a forced backend may refuse the dtype, say), and
    # blocks placed in the sequence when a rule reads positions: asked here, on every rank
    # alike, so that no rank meets a refusal in the middle of the ring (a hang).
    block = replace(call, needs_grad=needs_grad)
    if (
        call.causal
        or call.alibi_slopes is not None
        or call.dropout_p > 0
        or call.window_left is not None
        or (call.window_right is not None)
    ):
        block = replace(block, query_start=1, key_start=0)
    select_backend(block, backend)
    if not HAS_OFFSETS and (call.alibi_slopes is not None or call.dropout_p > 0 or call.window_left is not None
                            or call.window_right is not None):  # fmt: skip
        raise NotImplementedError(
            "ring_attention: windows, ALiBi and dropout need attention(query_start=, key_start=), "
            "which this build of fusedattn lacks"
        )
    ring_options = RingOptions(
        scale=call.scale,
        causal=call.causal,
        window_left=call.window_left,
        window_right=call.window_right,
        softcap=call.softcap,
        dropout_p=call.dropout_p,
        dropout_seed=call.dropout_seed,
        alibi_slopes=call.alibi_slopes,
        key_lengths=key_lengths,
        backend=backend,
    )
    seed_given = options.get("dropout_seed") is not None
    facts = [
        ("~drawn dropout seed", -1 if call.dropout_seed is None else int(call.dropout_seed)),  # first: read by index
        ("placement", PLACEMENTS.index(placement)),
        ("batch", batch), ("heads of q", heads_q), ("heads of k", k.shape[1]),
        ("shard length", length_q), ("head dim", head_dim), ("value head dim", v.shape[-1]),
        ("dtype", dtype_code(q.dtype)), ("device type", zlib.crc32(q.device.type.encode())),
        ("causal", int(call.causal)),
        ("window left", _side(call.window_left)), ("window right", _side(call.window_right)),
        ("scale", _bits(call.scale)), ("softcap", _bits(call.softcap)), ("dropout_p", _bits(call.dropout_p)),
        ("dropout_seed", call.dropout_seed if seed_given else -1),
        ("sinks (checksum)", _checksum(call.sinks)), ("alibi_slopes (checksum)", _checksum(call.alibi_slopes)),
        ("key_lengths (checksum)", _checksum(key_lengths)), ("return_lse", int(return_lse)),
        ("backend", zlib.crc32(str(backend).encode())), ("gradient wanted", int(needs_grad)),
    ]  # fmt: skip
    return facts, (ring_options, call.sinks, return_lse, needs_grad)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    placement: str = "contiguous",
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """attention() over a sequence sharded across the ranks of group (ring attention).

    Every rank of group calls it with its own shards (see shard_sequence); the result is
    this rank's rows of attention(full q, full k, full v, **options). Collective: every
    rank must call it, and the backward, together.

    Args:
        q: (B, Hq, S_local, D), this rank's query shard.
        k: (B, Hkv, S_local, D); v: (B, Hkv, S_local, Dv): its key/value shards, the same
            positions as q (one sequence: self-attention). Equal shard lengths on every
            rank (uneven lengths are refused: pad the sequence to a multiple of N, or 2N
            for zigzag); Hq a multiple of Hkv (K/V travel unexpanded).
        group: the process group the sequence is sharded over (default: the world).
        placement: "contiguous" or "zigzag" (see shard_sequence).
        options: attention()'s keyword options: causal (both alignments coincide, as the
            queries and keys are the same S positions), scale, window, softcap,
            alibi_slopes, sinks, key_lengths ((B,) counts of the global keys), dropout_p,
            dropout_seed (rank 0's drawn seed is used when None), return_lse, backend.
            Not attn_mask.

    Returns:
        out (B, Hq, S_local, Dv), or (out, lse (B, Hq, S_local) float32) with return_lse.
        Differentiable in q, k, v and sinks (its gradient is this rank's part: sum it over
        the ranks, as for any replicated parameter).

    Raises:
        The same exception on every rank of group when any rank's inputs are invalid or
        the ranks disagree on shapes or options; never a hang.
    """
    return _ring_attention(q, k, v, group, placement, options, overlap=True)


def _ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    placement: str,
    options: dict[str, Any],
    overlap: bool,
    kv_pieces: int | None = None,
    row_pieces: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ring_attention; overlap=False waits for each transfer before computing, kv_pieces and
    row_pieces override the ring's choice (benchmarks and tests)."""
    rank, world = group_rank_and_size(group)
    facts, checked = collective_check(
        "ring_attention", lambda: _local_check(q, k, v, placement, world, options), group, rank, world
    )
    ring_options, sinks, return_lse, needs_grad = checked
    if ring_options.dropout_p > 0 and options.get("dropout_seed") is None:
        # One mask for the whole sequence: every rank uses the seed rank 0 drew.
        ring_options = replace(ring_options, dropout_seed=int(facts[0][0]))
    pieces = default_pieces(q.shape[2]) if kv_pieces is None else (kv_pieces, row_pieces or 1)
    ring = Ring(group, rank, world, placement, overlap=overlap, kv_pieces=pieces[0], row_pieces=pieces[1])
    sinks_input = options.get("sinks") if sinks is not None else None
    out, lse = RingAttentionFunction.apply(q, k, v, sinks_input, ring, ring_options, needs_grad)
    return (out, lse) if return_lse else out
