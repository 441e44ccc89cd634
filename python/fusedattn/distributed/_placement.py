"""Which global sequence positions each rank holds, and the shard/unshard functions.

A placement cuts a sequence of S positions over N ranks into equal shards:

* ``"contiguous"``: rank r holds positions [r * S / N, (r + 1) * S / N).
* ``"zigzag"``: the sequence is cut into 2N chunks of S / 2N; rank r holds chunk r and
  chunk 2N - 1 - r, in that order. Under causal masking every rank then has the same
  amount of work (an early chunk with few visible keys, a late one with many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._checks import Facts, collective_check, dtype_code

PLACEMENTS: tuple[str, ...] = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """A run of consecutive global positions inside one shard: positions
    [start, start + length) sit at local indices [local_start, local_start + length)."""

    start: int
    local_start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def check_placement(placement: object) -> str:
    if not isinstance(placement, str) or placement not in PLACEMENTS:
        raise ValueError(f"placement: expected one of {list(PLACEMENTS)}, got {placement!r}")
    return placement


def chunks_per_rank(placement: str) -> int:
    """How many equal chunks each rank's shard is made of."""
    return 2 if placement == "zigzag" else 1


def segments(placement: str, rank: int, world: int, shard_length: int) -> tuple[Segment, ...]:
    """The global runs of positions of rank's shard (shard_length positions per rank)."""
    if placement == "contiguous":
        return (Segment(rank * shard_length, 0, shard_length),)
    chunk = shard_length // 2
    return (Segment(rank * chunk, 0, chunk), Segment((2 * world - 1 - rank) * chunk, chunk, chunk))


def piece_bounds(shard_length: int, pieces: int) -> list[tuple[int, int]]:
    """pieces (start, end) local ranges that cut a shard into nearly equal consecutive parts."""
    pieces = max(1, min(pieces, shard_length)) if shard_length else 1
    return [(shard_length * i // pieces, shard_length * (i + 1) // pieces) for i in range(pieces)]


def restrict(runs: tuple[Segment, ...], start: int, end: int, rebase: bool) -> tuple[Segment, ...]:
    """The parts of runs at local indices [start, end); rebase=True counts their local
    indices from start (for a tensor that holds only that range)."""
    parts = []
    for run in runs:
        first, last = max(run.local_start, start), min(run.local_start + run.length, end)
        if first < last:
            offset = first - run.local_start
            parts.append(Segment(run.start + offset, first - start if rebase else first, last - first))
    return tuple(parts)


def shard_indices(placement: str, rank: int, world: int, total: int, device: torch.device) -> torch.Tensor:
    """(S / N,) int64 global positions of rank's shard, in local order."""
    runs = segments(placement, rank, world, total // world)
    return torch.cat([torch.arange(run.start, run.end, device=device) for run in runs])


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this process's rank in group, group size); raises when it is not a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to non-members
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return rank, dist.get_world_size(group)


def _check_shardable(x: object, dim: object) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None, placement: str = "contiguous"
) -> torch.Tensor:
    """This rank's shard of a full tensor x (identical on every rank) along dim.

    Args:
        x: any shape; x.shape[dim] = S, the full sequence, a multiple of N (contiguous) or
            2N (zigzag), N the group's size. Uneven lengths are refused: pad first.
        dim: the sequence dimension (2 for (B, H, S, D) attention inputs, 1 for (B, S)
            position ids or (B, S, hidden) activations).

    Returns:
        (..., S / N, ...) on x's device. Differentiable: x's gradient is this rank's part
        (zero outside its shard); summed over ranks it is the gradient of the sum of every
        rank's loss, as DDP sums parameter gradients.
    """
    placement = check_placement(placement)
    rank, world = group_rank_and_size(group)
    dim = _check_shardable(x, dim)
    total = x.shape[dim]
    multiple = world * chunks_per_rank(placement)
    if total % multiple:
        raise ValueError(
            f"x: the sequence dimension {dim} has length {total}, not a multiple of {multiple} "
            f"({world} ranks, {placement} placement); pad the sequence to a multiple of {multiple}"
        )
    runs = segments(placement, rank, world, total // world)
    return torch.cat([x.narrow(dim, run.start, run.length) for run in runs], dim=dim)


class _Unshard(torch.autograd.Function):
    """all_gather of equal shards, reordered by placement; backward: all_reduce, then
    this rank's shard of the summed gradient (the gradient of every rank's loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, placement: str, rank: int, world: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.placement, ctx.rank, ctx.world = dim, group, placement, rank, world
        pieces = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        length = x.shape[dim]
        full_shape = list(x.shape)
        full_shape[dim] = length * world
        full = x.new_empty(full_shape)
        for source, piece in enumerate(pieces):
            for run in segments(placement, source, world, length):
                full.narrow(dim, run.start, run.length).copy_(piece.narrow(dim, run.local_start, run.length))
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        length = grad.shape[ctx.dim] // ctx.world
        runs = segments(ctx.placement, ctx.rank, ctx.world, length)
        shard = torch.cat([grad.narrow(ctx.dim, run.start, run.length) for run in runs], dim=ctx.dim)
        return shard, None, None, None, None, None


def unshard_sequence(
    x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None, placement: str = "contiguous"
) -> torch.Tensor:
    """The full tensor from every rank's shard x (the inverse of shard_sequence).

    Args:
        x: this rank's shard, (..., S / N, ...) along dim, the same shape on every rank.

    Returns:
        (..., S, ...), identical on every rank. Collective: every rank of group must call
        it. Differentiable: the backward sums the gathered tensor's gradient over the
        ranks (all_reduce) and returns this rank's part, the gradient of the sum of every
        rank's loss (if every rank computes the same loss L on the result, that is N * L).
    """
    rank, world = group_rank_and_size(group)
    agree_on_shapes("unshard_sequence", x, dim, placement, group, rank, world)
    dim = dim % x.dim()
    return _Unshard.apply(x, dim, group, placement, rank, world)


def agree_on_shapes(
    what: str, x: object, dim: object, placement: str, group: dist.ProcessGroup | None, rank: int, world: int
) -> None:
    """For unshard_sequence: x a tensor, dim valid, the same shard shape and dtype on every rank."""

    def local() -> tuple[Facts, None]:
        check_placement(placement)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
        if x.shape[dim] % chunks_per_rank(placement):
            raise ValueError(f"x: zigzag shards hold two equal chunks: expected an even length, got {x.shape[dim]}")
        facts = [("placement", PLACEMENTS.index(placement)), ("dim", dim % x.dim()), ("dtype", dtype_code(x.dtype))]
        facts += [("x.dim()", x.dim())] + [(f"x.shape[{d}]", size) for d, size in enumerate(x.shape)]
        return facts, None

    collective_check(what, local, group, rank, world)
