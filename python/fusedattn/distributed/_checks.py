"""Checks that give every rank the same verdict, so a bad input never hangs a group.

A rank that refuses its inputs must not leave the others waiting in a collective it will
never reach. So every check runs locally first, its verdict (an error, or the facts that
must agree across ranks: shapes, dtype, options) is written into one fixed-size int64
row, and one all_gather that every rank reaches exchanges the rows. Then each rank raises
the same exception (that of the lowest failing rank, or a disagreement between ranks),
or goes on with the facts of all ranks.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, NotImplementedError, RuntimeError)
_MAX_FACTS = 64
_MESSAGE_BYTES = 2048
_ROW = 2 + _MAX_FACTS + _MESSAGE_BYTES

Facts = Sequence[tuple[str, int]]


def _error_code(error: Exception) -> int:
    for code, kind in enumerate(_ERRORS, start=1):
        if isinstance(error, kind):
            return code
    return len(_ERRORS)  # anything else is reported as a RuntimeError


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _row(error: Exception | None, facts: Facts) -> torch.Tensor:
    row = torch.zeros(_ROW, dtype=torch.int64)
    if error is not None:
        message = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        row[0] = _error_code(error)
        row[1] = len(message)
        row[2 + _MAX_FACTS : 2 + _MAX_FACTS + len(message)] = torch.tensor(list(message), dtype=torch.int64)
        return row
    row[1] = len(facts)
    row[2 : 2 + len(facts)] = torch.tensor([value for _, value in facts], dtype=torch.int64)
    return row


def _decode(row: torch.Tensor) -> str:
    length = int(row[1])
    return bytes(row[2 + _MAX_FACTS : 2 + _MAX_FACTS + length].tolist()).decode(errors="replace")


def collective_check(
    what: str,
    local_check: Callable[[], tuple[Facts, Any]],
    group: dist.ProcessGroup | None,
    rank: int,
    world: int,
) -> tuple[list[list[int]], Any]:
    """Run local_check() -> (facts, result) on this rank, exchange verdicts with every rank
    of group, and return (the facts of every rank, this rank's result).

    Raises on every rank alike: the exception class and message of the lowest rank whose
    check failed (prefixed with its rank), or ValueError naming the first fact on which
    some rank differs from rank 0. Facts are (name, int) pairs, the same names in the same
    order on every rank that passes; a name starting with "~" is exchanged, not compared
    (a value rank 0 decides, such as a dropout seed drawn from each rank's generator).
    """
    error: Exception | None = None
    facts: Facts = ()
    result = None
    try:
        facts, result = local_check()
        if len(facts) > _MAX_FACTS:
            raise RuntimeError(f"{what}: {len(facts)} facts to exchange, at most {_MAX_FACTS}")
    except Exception as caught:  # noqa: BLE001  (every failure must reach the other ranks)
        error = caught
    device = collective_device(group)
    mine = _row(error, facts).to(device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    rows = [row.cpu() for row in rows]
    for source, row in enumerate(rows):
        code = int(row[0])
        if code:
            kind = _ERRORS[code - 1]
            raise kind(f"{what}: rank {source} of {world} refused its inputs: {_decode(row)}") from (
                error if source == rank else None
            )
    names = [name for name, _ in facts]
    values = [row[2 : 2 + int(row[1])].tolist() for row in rows]
    for source in range(1, world):
        if len(values[source]) != len(values[0]):
            raise ValueError(f"{what}: rank {source} of {world} passed different options than rank 0")
        for index, name in enumerate(names):
            if not name.startswith("~") and values[source][index] != values[0][index]:
                raise ValueError(
                    f"{what}: ranks disagree on {name}: rank 0 has {values[0][index]}, "
                    f"rank {source} has {values[source][index]}; every rank must pass "
                    "shards of the same shape and the same options"
                )
    return values, result


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_code(dtype: torch.dtype) -> int:
    """A small int per dtype, for comparing dtypes across ranks."""
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES) + zlib.crc32(str(dtype).encode()) % 1000
