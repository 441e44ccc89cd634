"""Ring attention on CPU with gloo: overlapped against serialized communication, and memory.

    .venv/bin/python benchmarks/ring_attention.py --worlds 2 4 --seqlens 8192 16384 32768

For each world size N and sequence length S, N spawned ranks run ring_attention forward
and backward (causal, zigzag) on their S / N shards and report, per step:

* overlapped: ring_attention as shipped (each K/V hop and dK/dV hop in flight while the
  blocks are computed);
* serialized: the same steps, every transfer waited for before computing;
* transfer: the same hops with no compute at all (what there is to hide);
* exposed: the time the overlapped step spent blocked waiting for transfers, and the same
  for the serialized step (there every transfer is waited for whole);
* hidden: 1 - exposed (overlapped) / exposed (serialized), the share of the waiting that
  overlapping removed (measured by the waits, not by subtracting step times, which CPU
  noise swamps; both include the ranks' skew, which no overlap can hide);
* memory: the rise of the rank's peak resident memory over one step (inputs excluded),
  against one process computing attention over the whole sequence, divided by N.

One process per world size also measures the single-process step (fusedattn.attention
over S) for the memory baseline. Threads are split between the ranks (--threads in all).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing


def _resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _inputs(config: dict, length: int, generator: torch.Generator) -> list[torch.Tensor]:
    heads, kv_heads, dim = config["heads"], config["kv_heads"], config["head_dim"]
    shapes = [(1, heads, length, dim), (1, kv_heads, length, dim), (1, kv_heads, length, dim)]
    return [torch.randn(shape, generator=generator).requires_grad_(True) for shape in shapes]


def _step(run, tensors: list[torch.Tensor], grad: torch.Tensor) -> float:
    for tensor in tensors:
        tensor.grad = None
    start = time.perf_counter()
    run(*tensors).backward(grad)
    return time.perf_counter() - start


def _memory_of_one_step(run, tensors, grad) -> tuple[float, int]:
    """(seconds, peak resident bytes above what was resident before the step)."""
    gc.collect()
    before = _resident_bytes()
    seconds = _step(run, tensors, grad)
    return seconds, max(0, _peak_bytes() - before)


def _rank(rank: int, world: int, config: dict, store: str, results: str) -> None:
    from fusedattn.distributed import _ring_attention
    from fusedattn.distributed._ring import Ring, blocked_seconds, wait

    torch.set_num_threads(max(1, config["threads"] // world))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    length = config["seqlen"] // world
    generator = torch.Generator().manual_seed(rank)
    tensors = _inputs(config, length, generator)
    grad = torch.randn(tensors[0].shape, generator=generator)
    options = {"causal": True}

    def ring(overlap: bool):
        return lambda q, k, v: _ring_attention(q, k, v, None, config["placement"], options, overlap)

    first_seconds, memory = _memory_of_one_step(ring(True), tensors, grad)
    timings = {"overlapped": [], "serialized": [], "transfer": [], "exposed": [], "exposed_serialized": []}
    hops = Ring(None, rank, world, config["placement"])
    k, v = tensors[1].detach(), tensors[2].detach()
    for _ in range(config["steps"]):
        for mode in ("overlapped", "serialized"):
            dist.barrier()
            blocked = blocked_seconds()
            timings[mode].append(_step(ring(mode == "overlapped"), tensors, grad))
            timings["exposed" if mode == "overlapped" else "exposed_serialized"].append(blocked_seconds() - blocked)
        dist.barrier()
        start = time.perf_counter()
        keys = (k, v)
        for _hop in range(world - 1):  # forward: K/V; backward: K/V and float32 dK/dV
            received, requests = hops.pass_on(keys)
            wait(requests)
            keys = received
        keys = (k, v, k.float(), v.float())
        for _hop in range(world):
            received, requests = hops.pass_on(keys)
            wait(requests)
        timings["transfer"].append(time.perf_counter() - start)
    summary = {mode: statistics.median(values) for mode, values in timings.items()}
    summary.update(memory=memory, first_step=first_seconds)
    with open(os.path.join(results, f"rank{rank}.json"), "w") as file:
        json.dump(summary, file)
    dist.destroy_process_group()


def _single(config: dict, results: str) -> None:
    import fusedattn

    torch.set_num_threads(config["threads"])
    tensors = _inputs(config, config["seqlen"], torch.Generator().manual_seed(0))
    grad = torch.randn(tensors[0].shape)
    seconds, memory = _memory_of_one_step(lambda q, k, v: fusedattn.attention(q, k, v, causal=True), tensors, grad)
    with open(os.path.join(results, "single.json"), "w") as file:
        json.dump({"seconds": seconds, "memory": memory}, file)


def measure(config: dict, world: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        multiprocessing.start_processes(_single_entry, args=(config, directory), nprocs=1, start_method="spawn")
        multiprocessing.start_processes(
            _rank, args=(world, config, os.path.join(directory, "store"), directory), nprocs=world, start_method="spawn"
        )
        with open(os.path.join(directory, "single.json")) as file:
            single = json.load(file)
        ranks = []
        for rank in range(world):
            with open(os.path.join(directory, f"rank{rank}.json")) as file:
                ranks.append(json.load(file))
    modes = ("overlapped", "serialized", "transfer", "exposed", "exposed_serialized")
    slowest = {mode: max(r[mode] for r in ranks) for mode in modes}
    waited = slowest["exposed_serialized"]
    hidden = 1.0 - slowest["exposed"] / waited if waited else 0.0
    memory = max(r["memory"] for r in ranks)
    return {
        "world": world,
        "seqlen": config["seqlen"],
        **{f"{mode}_s": round(value, 4) for mode, value in slowest.items()},
        "hidden": round(min(max(hidden, 0.0), 1.0), 3),
        "rank_memory_mib": round(memory / 2**20, 1),
        "single_memory_mib": round(single["memory"] / 2**20, 1),
        "memory_vs_single_over_n": round(memory / (single["memory"] / world), 3) if single["memory"] else None,
    }


def _single_entry(_index: int, config: dict, directory: str) -> None:
    _single(config, directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--placement", default="zigzag", choices=["contiguous", "zigzag"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all, split between ranks")
    parser.add_argument("--output", help="also write the rows as JSON here")
    arguments = parser.parse_args()
    # A fixed mmap threshold stops glibc from keeping freed large blocks in its heap, so the
    # peak resident memory of the spawned processes follows their live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    rows = []
    header = "| N | S | overlapped s | serialized s | transfer s | exposed s (ovl / ser) | hidden | MiB/rank | single MiB | vs single/N |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for world in arguments.worlds:
        for seqlen in arguments.seqlens:
            config = dict(
                seqlen=seqlen, heads=arguments.heads, kv_heads=arguments.kv_heads, head_dim=arguments.head_dim,
                placement=arguments.placement, steps=arguments.steps, threads=arguments.threads,
            )  # fmt: skip
            row = measure(config, world)
            rows.append(row)
            print(
                f"| {world} | {seqlen} | {row['overlapped_s']} | {row['serialized_s']} | {row['transfer_s']} | "
                f"{row['exposed_s']} / {row['exposed_serialized_s']} | "
                f"{row['hidden']:.0%} | {row['rank_memory_mib']} | {row['single_memory_mib']} | "
                f"{row['memory_vs_single_over_n']} |",
                flush=True,
            )
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
