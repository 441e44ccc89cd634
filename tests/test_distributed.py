"""fusedattn.distributed on gloo: 2, 3 and 4 spawned processes against one process.

One process group per world size runs every case (tests/distributed_cases.py; spawning
costs seconds); each case's verdict is one test here. Numerics: out, lse, dq, dk, dv (and
the summed dsinks) of ring_attention on each rank's shard against the shard of a single
process fusedattn.attention over the full sequence in float64 on the reference backend,
for both placements, ring blocks in float64 (reference backend) and float32 (the default
CPU dispatch). Errors: every rank raises the same exception, and the group stays usable.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as multiprocessing
from distributed_cases import GPU_CASES, case_names, gpu_worker, worker

torch_distributed = pytest.importorskip("torch.distributed")
if not torch_distributed.is_available() or not torch_distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD_SIZES = (2, 3, 4)
DEADLINE_SECONDS = 240  # per group: a hang fails the tests instead of stalling CI


def _run_group(world: int, directory: str, entry=worker) -> dict[int, dict[str, str]]:
    context = multiprocessing.start_processes(
        entry, args=(world, directory), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {DEADLINE_SECONDS} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = {}
    for rank in range(world):
        with open(os.path.join(directory, f"results_{rank}.json")) as file:
            results[rank] = json.load(file)
    return results


_GROUPS: dict[int, dict[int, dict[str, str]] | Exception] = {}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    def results(world: int) -> dict[int, dict[str, str]]:
        if world not in _GROUPS:
            try:
                _GROUPS[world] = _run_group(world, str(tmp_path_factory.mktemp(f"world{world}")))
            except Exception as error:  # noqa: BLE001  (reported by every test of that world)
                _GROUPS[world] = error
        outcome = _GROUPS[world]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return results


@pytest.mark.parametrize(("world", "case"), [(world, case) for world in WORLD_SIZES for case in case_names(world)])
def test_distributed(group_results, world: int, case: str) -> None:
    results = group_results(world)
    failures = {rank: verdicts.get(case, "not run") for rank, verdicts in results.items()}
    failures = {rank: verdict for rank, verdict in failures.items() if verdict}
    assert not failures, "\n".join(f"rank {rank}: {verdict}" for rank, verdict in failures.items())


@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch_distributed.is_nccl_available(), reason="needs a GPU and NCCL"
)
def test_nccl_on_gpus(tmp_path):
    """NCCL, one rank per GPU (a single GPU runs the single-rank path), out/lse/grads as above."""
    world = min(torch.cuda.device_count(), 4)
    results = _run_group(world, str(tmp_path), entry=gpu_worker)
    failures = {(rank, case): verdicts.get(case, "not run") for rank, verdicts in results.items() for case in GPU_CASES}
    failures = {key: verdict for key, verdict in failures.items() if verdict}
    assert not failures, failures


# ---- block planning: no processes needed ----------------------------------------------------------
def _plan(world: int, placement: str, shard: int, **rules) -> dict[tuple[int, int], list[tuple[int, int, bool]]]:
    """{(rank, source): [(query start, key start, masked), ...]} of every ring step."""
    from fusedattn.distributed._blocks import RingOptions, plan_blocks
    from fusedattn.distributed._placement import segments

    options = RingOptions(
        scale=1.0, causal=rules.get("causal", False), window_left=rules.get("left"), window_right=rules.get("right"),
        softcap=None, dropout_p=0.0, dropout_seed=None, alibi_slopes=None, key_lengths=None, backend="auto",
    )  # fmt: skip
    return {
        (rank, source): [
            (b.q_run.start, b.k_run.start, b.masked)
            for b in plan_blocks(
                options, segments(placement, rank, world, shard), segments(placement, source, world, shard)
            )
        ]
        for rank in range(world)
        for source in range(world)
    }


def test_causal_contiguous_skips_future_ranks_and_masks_only_the_diagonal():
    plan = _plan(4, "contiguous", 8, causal=True)
    for (rank, source), blocks in plan.items():
        if source > rank:
            assert blocks == []
        else:
            assert blocks == [(rank * 8, source * 8, source == rank)]


def test_zigzag_balances_causal_work():
    plan = _plan(4, "zigzag", 8, causal=True)
    work = [sum(len(plan[rank, source]) for source in range(4)) for rank in range(4)]
    assert len(set(work)) == 1, work  # every rank computes as many (equal-sized) blocks


def test_window_skips_ranks_entirely_outside_it():
    # Window of 3 keys back, causal, shards of 8: only the own and the previous shard are seen.
    plan = _plan(4, "contiguous", 8, causal=True, left=3)
    for (rank, source), blocks in plan.items():
        assert bool(blocks) == (rank - 1 <= source <= rank), (rank, source, blocks)
        assert all(masked for _, _, masked in blocks)
    # Non-causal window (2, 2): the next shard too, never farther ones.
    plan = _plan(4, "contiguous", 8, left=2, right=2)
    assert all(bool(blocks) == (abs(rank - source) <= 1) for (rank, source), blocks in plan.items())


@pytest.mark.parametrize("placement", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("kv_pieces", "row_pieces"), [(1, 1), (3, 2), (16, 4)])
def test_pieces_cover_every_query_key_pair_once(placement, kv_pieces, row_pieces):
    """Over every piece's ring, each rank's blocks meet every global key exactly once per
    query row (K/V pieces are rebased to their own local indices)."""
    from fusedattn.distributed._placement import shard_indices
    from fusedattn.distributed._ring import Ring, piece_bounds

    world, shard = 3, 12
    options = _options_without_rules()
    for rank in range(world):
        seen = torch.zeros(world * shard, world * shard, dtype=torch.int64)
        ring = Ring(None, rank, world, placement, kv_pieces=kv_pieces, row_pieces=row_pieces)
        for piece in piece_bounds(shard, kv_pieces):
            for step in range(world):
                for block in ring.blocks(options, step, shard, piece):
                    assert (
                        0
                        <= block.k_run.local_start
                        <= block.k_run.local_start + block.k_run.length
                        <= piece[1] - piece[0]
                    )
                    seen[block.q_run.start : block.q_run.end, block.k_run.start : block.k_run.end] += 1
        mine = shard_indices(placement, rank, world, world * shard, torch.device("cpu"))
        assert torch.equal(seen[mine], torch.ones_like(seen[mine])), (rank, placement)
        others = torch.ones(world * shard, dtype=torch.bool)
        others[mine] = False
        assert int(seen[others].sum()) == 0


def _options_without_rules():
    from fusedattn.distributed._blocks import RingOptions

    return RingOptions(
        scale=1.0, causal=False, window_left=None, window_right=None, softcap=None, dropout_p=0.0,
        dropout_seed=None, alibi_slopes=None, key_lengths=None, backend="auto",
    )  # fmt: skip
