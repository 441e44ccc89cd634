"""Ring attention: every rank's queries meet every rank's keys, one neighbour at a time.

N steps. At step t rank r holds the K/V shard of rank (r - t) mod N, computes its blocks
against it while already sending that shard on to rank r + 1 and receiving the next one
from rank r - 1 (batch_isend_irecv: the transfer overlaps the compute), and merges the
partial (out, lse) of each block into its running result by their lse. K/V travel with
Hkv heads (grouped-query attention never expands them on the wire).

The backward repeats the ring: each block's gradient is FlashAttention's, given the
merged out and lse of its rows; dq stays home, dK/dV accumulate in buffers that travel
with their shard and reach their owner after one more hop.

A long shard's K/V travel in pieces, each piece its own ring, and the queries are
computed in parts (default_pieces): what is alive at once is then about one process's
attention memory over 1/N of the sequence (docs/distributed.md, "Memory").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import semantics
from ._blocks import Block, RingOptions, block_backward, block_call, block_forward, plan_blocks
from ._placement import piece_bounds, restrict, segments


@dataclass(frozen=True)
class Ring:
    """A process group seen as a ring, and how this rank runs its steps."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    placement: str
    overlap: bool = True  # False waits for every transfer before computing (benchmarks)
    # The K/V shard travels in kv_pieces consecutive pieces, one ring each, and the queries
    # are computed in row_pieces parts: what is alive at once shrinks with them (transfer
    # buffers and block temporaries), at the cost of more, smaller hops and calls.
    kv_pieces: int = 1
    row_pieces: int = 1

    def peer(self, step: int) -> int:
        """Global rank of the group member step places after this one."""
        member = (self.rank + step) % self.world
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, member)

    def pass_on(self, tensors: tuple[torch.Tensor, ...]) -> Transfer:
        """Send tensors to the next rank and receive the same shapes from the previous one.

        The received buffers are valid after the transfer's wait_received(). With
        overlap=False both directions are waited for before this returns.
        """
        received = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors)
        # A piece of a shard is a strided view: its contiguous copy is what is sent, and the
        # transfer keeps that copy alive until the send is done.
        outgoing = tuple(t.contiguous() for t in tensors)
        following, preceding = self.peer(1), self.peer(-1)
        operations = [dist.P2POp(dist.isend, t, following, self.group) for t in outgoing]
        operations += [dist.P2POp(dist.irecv, r, preceding, self.group) for r in received]
        requests = dist.batch_isend_irecv(operations)
        transfer = Transfer(received, outgoing, requests[: len(tensors)], requests[len(tensors) :])
        if not self.overlap:
            transfer.wait_sent()
            transfer.wait_received()
        return transfer

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def blocks(self, options: RingOptions, step: int, shard_length: int, piece: tuple[int, int]) -> list[Block]:
        """The blocks of a step: this rank's query runs (cut into row_pieces) against the
        key runs of piece (local range of the source's shard; key local indices count from
        the piece's start, as the travelling K/V hold only the piece)."""
        q_runs = tuple(
            run
            for rows in piece_bounds(shard_length, self.row_pieces)
            for run in restrict(segments(self.placement, self.rank, self.world, shard_length), *rows, rebase=False)
        )
        k_runs = restrict(segments(self.placement, self.source(step), self.world, shard_length), *piece, rebase=True)
        return plan_blocks(options, q_runs, k_runs)


# Pieces are no shorter than these (blocks of 128 keys x 512 queries still run at full
# speed on the CPU kernels) and no more numerous: 16 K/V pieces and 4 row parts bring the
# ring's own buffers down to about 1.2x of 1/N of one process (docs/distributed.md, "Memory").
_MIN_PIECE_KEYS, _MAX_KV_PIECES = 128, 16
_MIN_PIECE_ROWS, _MAX_ROW_PIECES = 512, 4


def default_pieces(shard_length: int) -> tuple[int, int]:
    """(kv_pieces, row_pieces) for a shard of this many positions (1, 1 for short shards)."""
    kv_pieces = max(1, min(_MAX_KV_PIECES, shard_length // _MIN_PIECE_KEYS))
    row_pieces = max(1, min(_MAX_ROW_PIECES, shard_length // _MIN_PIECE_ROWS))
    return kv_pieces, row_pieces


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


class Transfer:
    """One hop in flight: buffers arriving from the previous rank and sends to the next.

    The two directions are waited for separately (a finished send frees its tensor before
    the receive is needed), each at most once: a gloo request must not be waited for
    twice, it can hang.
    """

    def __init__(
        self, received: tuple[torch.Tensor, ...], sent: tuple[torch.Tensor, ...], sends: list, receives: list
    ) -> None:
        self._received, self._sent = received, sent
        self._sends, self._receives = sends, receives

    def wait_sent(self) -> None:
        """Waits for the sends; the sent tensors are released (kept alive until then)."""
        wait(self._sends)
        self._sends, self._sent = [], ()

    def wait_received(self) -> tuple[torch.Tensor, ...]:
        wait(self._receives)
        self._receives = []
        return self._received


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
    for piece in piece_bounds(shard_length, ring.kv_pieces):
        keys = _piece_of(piece, k, v)
        for step in range(ring.world):
            arriving = ring.pass_on(keys) if step < ring.world - 1 else None
            for block in ring.blocks(options, step, shard_length, piece):
                call = block_call(options, block, q, keys[0], keys[1], needs_grad)
                block_out, block_lse = block_forward(call, options.backend)
                rows = slice(block.q_run.local_start, block.q_run.local_start + block.q_run.length)
                merge_into(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
                del call, block_out, block_lse  # not kept past the merge
            if arriving is not None:
                arriving.wait_sent()
                keys = arriving.wait_received()
    return out, lse


def _piece_of(piece: tuple[int, int], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The local positions [start, end) of each (B, H, S_local, ·) tensor (views)."""
    start, end = piece
    return tuple(t if (start, end) == (0, t.shape[2]) else t.narrow(2, start, end - start) for t in tensors)


def _step_key_gradients(
    ring: Ring,
    options: RingOptions,
    step: int,
    piece: tuple[int, int],
    q: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor],
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_q: torch.Tensor,
) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Computes one ring step's blocks: adds their dq into grad_q (in place) and returns
    [(key columns, dk, dv)], one entry per key run (its blocks' parts summed in place)."""
    by_columns: dict[tuple[int, int], tuple[slice, torch.Tensor, torch.Tensor]] = {}
    for block in ring.blocks(options, step, q.shape[2], piece):
        call = block_call(options, block, q, keys[0], keys[1], needs_grad=True)
        rows = slice(block.q_run.local_start, block.q_run.local_start + block.q_run.length)
        dq, dk, dv = block_backward(call, options.backend, grad_out[:, :, rows], out[:, :, rows], lse[:, :, rows])
        grad_q[:, :, rows] += dq
        del call, dq  # not kept past the sum: a step holds one dk/dv per key run
        key = (block.k_run.local_start, block.k_run.length)
        if key in by_columns:
            by_columns[key][1].add_(dk)
            by_columns[key][2].add_(dv)
        else:
            # Summed in the accumulator dtype (a copy only for 16-bit inputs).
            by_columns[key] = (slice(key[0], key[0] + key[1]), dk.to(grad_q.dtype), dv.to(grad_q.dtype))
        del dk, dv
    return list(by_columns.values())


def _piece_backward(
    ring: Ring,
    options: RingOptions,
    piece: tuple[int, int],
    q: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor],
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring of one K/V piece: adds its dq parts into grad_q and returns the piece's
    (dk, dv) summed over every rank's queries, in the accumulator dtype."""
    accumulate = grad_q.dtype
    travelling: Transfer | None = None  # the dK/dV partial sums arriving from the previous rank
    for step in range(ring.world):
        if travelling is not None:
            # The partial sums sent at the end of the previous step leave before this step
            # computes (the next rank posted its receive with them): one dK/dV less alive.
            travelling.wait_sent()
        arriving = ring.pass_on(keys) if step < ring.world - 1 else None
        step_grads = _step_key_gradients(ring, options, step, piece, q, keys, grad_out, out, lse, grad_q)
        if arriving is not None:
            arriving.wait_sent()
            keys = arriving.wait_received()  # the shard just used is dropped here
        if travelling is None:
            grad_k = torch.zeros(keys[0].shape, dtype=accumulate, device=q.device)
            grad_v = torch.zeros(keys[1].shape, dtype=accumulate, device=q.device)
        else:
            # Add into the partial sums that arrived from the ranks this piece already
            # visited (no fresh buffers: they travel on once this step's part is in).
            grad_k, grad_v = travelling.wait_received()
        while step_grads:  # popped, so no loop variable keeps the last part alive
            columns, dk, dv = step_grads.pop()
            grad_k[:, :, columns] += dk
            grad_v[:, :, columns] += dv
            del dk, dv
        if ring.world > 1:
            travelling = ring.pass_on((grad_k, grad_v))
            del grad_k, grad_v  # the transfer holds them until sent
    del keys
    if travelling is not None:
        # The last hop brought this rank's own dK/dV, summed over every rank's queries.
        travelling.wait_sent()
        grad_k, grad_v = travelling.wait_received()
    return grad_k, grad_v


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
    """(dq, dk, dv) of this rank's shards; out and lse are the merged ones (sinks included).

    What is alive at once is kept small (docs/distributed.md, "Memory"): each block's dq is
    added at once, a step's dk/dv parts are summed per key run, a K/V piece is dropped as
    soon as its blocks are done and the next one is in, and the dK/dV partial sums sent on
    are waited for before the next step's blocks (during compute only the arriving ones
    are in flight).
    """
    accumulate = _accumulator_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=accumulate, device=q.device)
    pieces = piece_bounds(q.shape[2], ring.kv_pieces)
    if len(pieces) == 1:
        grad_k, grad_v = _piece_backward(ring, options, pieces[0], q, (k, v), grad_out, out, lse, grad_q)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
    # Each piece's dK/dV comes home at the end of its ring, into the result (input dtype).
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    for piece in pieces:
        piece_k, piece_v = _piece_backward(ring, options, piece, q, _piece_of(piece, k, v), grad_out, out, lse, grad_q)
        grad_k[:, :, piece[0] : piece[1]] = piece_k
        grad_v[:, :, piece[0] : piece[1]] = piece_v
        del piece_k, piece_v
    return grad_q.to(q.dtype), grad_k, grad_v


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
