"""Ring attention: every rank's queries meet every rank's keys, one neighbour at a time.

N steps. At step t rank r holds the K/V shard of rank (r - t) mod N, computes its blocks
against it while already sending that shard on to rank r + 1 and receiving the next one
from rank r - 1 (batch_isend_irecv: the transfer overlaps the compute), and merges the
partial (out, lse) of each block into its running result by their lse. K/V travel with
Hkv heads (grouped-query attention never expands them on the wire).

The backward repeats the ring: each block's gradient is FlashAttention's, given the
merged out and lse of its rows; dq stays home, dK/dV accumulate in buffers that travel
with their shard and reach their owner after one more hop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import semantics
from ._blocks import Block, RingOptions, block_backward, block_call, block_forward, plan_blocks
from ._placement import segments


@dataclass(frozen=True)
class Ring:
    """A process group seen as a ring, and how this rank runs its steps."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    placement: str
    overlap: bool = True  # False waits for every transfer before computing (benchmarks)

    def peer(self, step: int) -> int:
        """Global rank of the group member step places after this one."""
        member = (self.rank + step) % self.world
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, member)

    def pass_on(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], list]:
        """Send tensors to the next rank and receive the same shapes from the previous one.

        Returns (received buffers, requests); the buffers are valid after wait(requests).
        """
        received = tuple(torch.empty_like(t) for t in tensors)
        following, preceding = self.peer(1), self.peer(-1)
        operations = [dist.P2POp(dist.isend, t.contiguous(), following, self.group) for t in tensors]
        operations += [dist.P2POp(dist.irecv, r, preceding, self.group) for r in received]
        requests = dist.batch_isend_irecv(operations)
        if not self.overlap:
            wait(requests)
            return received, []  # a gloo request must not be waited for twice: it can hang
        return received, requests

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def blocks(self, options: RingOptions, step: int, shard_length: int) -> list[Block]:
        q_runs = segments(self.placement, self.rank, self.world, shard_length)
        k_runs = segments(self.placement, self.source(step), self.world, shard_length)
        return plan_blocks(options, q_runs, k_runs)


# Seconds this process has spent blocked on ring transfers: the communication that compute
# did not hide (benchmarks/ring_attention.py reads it).
_BLOCKED = [0.0]


def wait(requests: list) -> None:
    if not requests:
        return
    start = time.perf_counter()
    for request in requests:
        request.wait()
    _BLOCKED[0] += time.perf_counter() - start


def blocked_seconds() -> float:
    """Total time spent waiting for ring transfers in this process (exposed communication)."""
    return _BLOCKED[0]


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a partial softmax result over other keys into (out, lse), in place (no
    temporaries of out's size): out and lse become those of the union of the keys.

    Rows with no visible key in either part keep out 0 and lse -inf (never NaN).
    """
    merged = torch.logaddexp(lse, block_lse.to(lse.dtype))
    anchor = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    out.mul_(torch.exp(lse - anchor)[..., None])
    out.addcmul_(block_out.to(out.dtype), torch.exp(block_lse.to(lse.dtype) - anchor)[..., None])
    lse.copy_(merged)


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the sink logit (one per head, no value) to the merged rows: once, not per block."""
    sink = sinks.to(lse.dtype)[None, :, None].expand_as(lse)
    merged = torch.logaddexp(lse, sink)
    anchor = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
    return out * torch.exp(lse - anchor)[..., None], merged


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return semantics.lse_dtype(dtype)


def ring_forward(
    ring: Ring, options: RingOptions, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (out, lse) of this rank's queries over the whole sequence, without sinks.

    out (B, Hq, S_local, Dv) and lse (B, Hq, S_local) in the accumulator dtype (float32, or
    float64 for float64 inputs).
    """
    accumulate = _accumulator_dtype(q.dtype)
    batch, heads, length = q.shape[:3]
    out = q.new_zeros(batch, heads, length, v.shape[-1], dtype=accumulate)
    lse = q.new_full((batch, heads, length), float("-inf"), dtype=accumulate)
    shard_length = q.shape[2]
    keys = (k, v)
    for step in range(ring.world):
        arriving = None
        if step < ring.world - 1:
            arriving = ring.pass_on(keys)
        for block in ring.blocks(options, step, shard_length):
            call = block_call(options, block, q, keys[0], keys[1], needs_grad)
            block_out, block_lse = block_forward(call, options.backend)
            rows = slice(block.q_run.local_start, block.q_run.local_start + block.q_run.length)
            merge_into(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        if arriving is not None:
            wait(arriving[1])
            keys = arriving[0]
    return out, lse


def ring_backward(
    ring: Ring,
    options: RingOptions,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's shards; out and lse are the merged ones (sinks included)."""
    accumulate = _accumulator_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=accumulate, device=q.device)
    shard_length = q.shape[2]
    keys = (k, v)
    travelling = None  # (buffers, requests): the dK/dV partial sums arriving from the previous rank
    for step in range(ring.world):
        arriving = None
        if step < ring.world - 1:
            arriving = ring.pass_on(keys)
        block_grads = []  # (key columns, dk, dv) of this step's blocks
        for block in ring.blocks(options, step, shard_length):
            call = block_call(options, block, q, keys[0], keys[1], needs_grad=True)
            rows = slice(block.q_run.local_start, block.q_run.local_start + block.q_run.length)
            columns = slice(block.k_run.local_start, block.k_run.local_start + block.k_run.length)
            dq, dk, dv = block_backward(call, options.backend, grad_out[:, :, rows], out[:, :, rows], lse[:, :, rows])
            grad_q[:, :, rows] += dq
            block_grads.append((columns, dk, dv))
        if travelling is None:
            grad_k = torch.zeros(k.shape, dtype=accumulate, device=k.device)
            grad_v = torch.zeros(v.shape, dtype=accumulate, device=v.device)
        else:
            # Add into the partial sums that arrived from the ranks this shard already
            # visited (no fresh buffers: they travel on once this step's part is in).
            wait(travelling[1])
            grad_k, grad_v = travelling[0]
        for columns, dk, dv in block_grads:
            grad_k[:, :, columns] += dk
            grad_v[:, :, columns] += dv
        del block_grads
        if ring.world > 1:
            travelling = ring.pass_on((grad_k, grad_v))
        if arriving is not None:
            wait(arriving[1])
            keys = arriving[0]
    if ring.world > 1:
        # The last hop brought this rank's own dK/dV, summed over every rank's queries.
        wait(travelling[1])
        grad_k, grad_v = travelling[0]
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd of ring attention: (q, k, v, sinks) -> (out, lse); lse is not differentiable.

    The sinks' gradient is this rank's part (its rows), like any replicated parameter's:
    summing it over the ranks (what DDP does) gives the whole sequence's.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, ring: Ring, options: RingOptions, needs_grad: bool):
        out, lse = ring_forward(ring, options, q, k, v, needs_grad)
        if sinks is not None:
            out, lse = fold_sinks(out, lse, sinks)
        out = out.to(q.dtype)
        lse = lse.to(semantics.lse_dtype(q.dtype))
        ctx.ring, ctx.options = ring, options
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.contiguous()
        dq, dk, dv = ring_backward(ctx.ring, ctx.options, q, k, v, grad_out, out, lse)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d sinks[h] = -sum_i exp(sinks[h] - lse_i) * rowsum(dO_i * O_i), in lse's precision.
            delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
            probability = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)
            terms = torch.where(torch.isfinite(lse), -probability * delta, torch.zeros_like(delta))
            grad_sinks = terms.sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, grad_sinks, None, None, None
