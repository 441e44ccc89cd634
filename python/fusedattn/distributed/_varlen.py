"""Packed variable-length sequences over a group: all-gather K/V, then one varlen call per rank.

The packed tokens of all sequences, (T, H, D), are cut into N equal contiguous shards:
rank r holds tokens [r T / N, (r + 1) T / N). A sequence may span several ranks. Each
rank gathers the keys and values of every rank (Hkv heads: grouped-query attention is not
expanded), and runs attention_varlen for its own query tokens, sequence by sequence,
against the keys of their sequences. With causal masking the keys stop at the rank's last
query, so each sequence's queries are the last of its keys and the bottom-right alignment
puts them at their true positions (causal, windows and ALiBi exact). The backward sums the
gathered keys' gradient over the ranks (all_reduce) and keeps this rank's part.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from ..api import attention_varlen
from ..validation import validate_varlen
from ._checks import collective_check, dtype_code
from ._placement import group_rank_and_size


class _GatherTokens(torch.autograd.Function):
    """all_gather of equal token shards along dim 0; backward: all_reduce, keep own part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.world = group, rank, world
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        length = grad.shape[0] // ctx.world
        return grad[ctx.rank * length : (ctx.rank + 1) * length], None, None, None


_OPTIONS = (
    "causal",
    "causal_alignment",
    "scale",
    "window",
    "alibi_slopes",
    "sinks",
    "softcap",
    "return_lse",
    "backend",
)


def _local_check(q, k, v, cu_seqlens, max_seqlen, world: int, options: dict[str, Any]):
    unknown = sorted(set(options) - set(_OPTIONS))
    if "dropout_p" in unknown:
        raise NotImplementedError("dropout_p: not supported by varlen_attention_allgather")
    if unknown:
        raise TypeError(f"varlen_attention_allgather() got unexpected keyword arguments {unknown}")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v)):
        raise TypeError("q, k, v: expected 3-D tensors (tokens, heads, head_dim)")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"q, k, v: expected the same tokens per rank, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    forwarded = {n: value for n, value in options.items() if n not in ("return_lse", "backend")}
    total = q.shape[0] * world
    # Validated as the whole packed batch (stand-ins expanded from one element, no memory).
    whole = [t.new_empty(1).expand(total, *t.shape[1:]) for t in (q, k, v)]
    call = validate_varlen(*whole, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **forwarded)
    positional = call.window_left is not None or call.window_right is not None or call.alibi_slopes is not None
    if positional and not call.causal:
        raise NotImplementedError("varlen_attention_allgather: windows and ALiBi need causal=True")
    offsets = call.cu_seqlens_q.tolist()
    facts = [
        ("tokens per rank", q.shape[0]), ("heads of q", q.shape[1]), ("heads of k", k.shape[1]),
        ("head dim", q.shape[2]), ("value head dim", v.shape[2]), ("dtype", dtype_code(q.dtype)),
        ("cu_seqlens (checksum)", zlib.crc32(str(offsets).encode())), ("causal", int(call.causal)),
        ("options (checksum)", zlib.crc32(repr(sorted((n, repr(x)) for n, x in forwarded.items()
                                                      if not isinstance(x, torch.Tensor))).encode())),
    ]  # fmt: skip
    return facts, offsets


def varlen_attention_allgather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    group: dist.ProcessGroup | None = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """attention_varlen over packed self-attention sequences whose tokens are sharded.

    Args:
        q: (T / N, Hq, D), this rank's contiguous shard of the packed tokens (T a multiple
            of N: pad the packed batch).
        k: (T / N, Hkv, D); v: (T / N, Hkv, Dv), the same tokens.
        cu_seqlens: (num_sequences + 1,) int offsets of the sequences in the whole packed
            batch (ending at T), the same on every rank; max_seqlen: at least the longest.
        options: attention_varlen's causal, scale, window and alibi_slopes (with causal),
            sinks, softcap, return_lse, backend. No dropout.

    Returns:
        out (T / N, Hq, Dv), or (out, lse (Hq, T / N)). Differentiable in q, k, v (and
        sinks: this rank's part of their gradient, to sum over the ranks). Collective over group.
    """
    rank, world = group_rank_and_size(group)
    _, offsets = collective_check(
        "varlen_attention_allgather",
        lambda: _local_check(q, k, v, cu_seqlens, max_seqlen, world, options),
        group,
        rank,
        world,
    )
    return_lse = options.pop("return_lse", False)
    causal = bool(options.get("causal", False))
    keys = _GatherTokens.apply(k, group, rank, world)
    values = _GatherTokens.apply(v, group, rank, world)
    first, last = rank * q.shape[0], (rank + 1) * q.shape[0]
    # The sequences this rank has queries of, and each one's query and key ranges (global).
    runs, sequences = [], []
    for index, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        low, high = max(start, first), min(end, last)
        if low < high:
            runs.append((low, high, start, high if causal else end))
            sequences.append(index)
    if causal:
        # Each sequence's queries are the last of its (trimmed) keys: bottom-right is exact.
        options["causal_alignment"] = "bottom_right"
    slopes = options.get("alibi_slopes")
    if slopes is not None and slopes.dim() == 2:  # one row per sequence: this rank's sequences
        options["alibi_slopes"] = slopes[sequences]
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32 if q.dtype != torch.float64
                     else torch.float64, device=q.device)  # fmt: skip
    if runs:
        query_from, query_to = runs[0][0], runs[-1][1]
        key_from, key_to = runs[0][2], runs[-1][3]
        cu_q = torch.tensor([0] + [high - query_from for _, high, _, _ in runs], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0] + [end - key_from for _, _, _, end in runs], dtype=torch.int32, device=q.device)
        max_q = max(high - low for low, high, _, _ in runs)
        max_k = max(end - start for _, _, start, end in runs)
        part_out, part_lse = attention_varlen(
            q[query_from - first : query_to - first], keys[key_from:key_to], values[key_from:key_to],
            cu_q, cu_k, max_q, max_k, return_lse=True, **options,
        )  # fmt: skip
        rows = slice(query_from - first, query_to - first)
        out = torch.cat([out[: rows.start], part_out, out[rows.stop :]], dim=0)
        lse[:, rows] = part_lse.detach().to(lse.dtype)
    return (out, lse) if return_lse else out
