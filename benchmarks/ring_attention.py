"""Ring attention on CPU with gloo: overlapped against serialized communication, and memory.

    .venv/bin/python benchmarks/ring_attention.py --worlds 2 4 --seqlens 8192 16384 32768

For each world size N and sequence length S, N spawned ranks run ring_attention forward
and backward (causal, zigzag) on their S / N shards and report, per step:

* overlapped: ring_attention as shipped (each K/V hop and dK/dV hop in flight while the
  blocks are computed);
* serialized: the same steps, every transfer waited for before computing;
* transfer: the same hops (same pieces, same bytes) with no compute at all: what there is to hide;
* exposed: the time the overlapped step spent blocked waiting for transfers, and the same
  for the serialized step (there every transfer is waited for whole);
* hidden: 1 - exposed (overlapped) / exposed (serialized), the share of the waiting that
  overlapping removed (measured by the waits, not by subtracting step times, which CPU
  noise swamps; both include the ranks' skew, which no overlap can hide, so this
  understates the hiding when the skew is large next to the transfers);
* hidden of transfer: (exposed serialized - exposed overlapped) / transfer, the waiting
  that overlapping removed as a share of the pure transfer time: the skew cancels when it
  is the same in both modes (on a loaded machine it is not: read it with the raw columns);
* memory (attention memory, docs/distributed.md "Memory"): the bytes of tensor storage
  allocated during a step and alive at once, inputs (q, k, v, grad_out) excluded, counted
  by torch's CPU allocator through the profiler: "kept" is what is alive when the forward
  returns (what it keeps for the backward, its output included), "peak" the most alive
  at any moment of forward + backward (the gradients included). The same count for one
  process computing attention over the whole sequence gives the baseline; the ratio is
  rank peak / (single peak / N).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
from torch.profiler import ProfilerActivity, profile


def _tensor_bytes_alive(run) -> tuple[int, int, object]:
    """(peak, at the end) bytes of CPU tensor storage allocated by run() and alive, counted
    by the allocator through the profiler, and run()'s result (kept alive for the count)."""
    with tempfile.TemporaryDirectory() as directory:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            result = run()
        trace = os.path.join(directory, "trace.json")
        profiler.export_chrome_trace(trace)
        with open(trace) as file:
            events = [e for e in json.load(file)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e["args"] for e in sorted(events, key=lambda e: e["ts"]) if e["args"].get("Device Type") == 0]
    if not events:
        return 0, 0, result
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    alive = [e["Total Allocated"] - base for e in events]
    return max(alive), alive[-1], result


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


def _memory_of_one_step(run, tensors, grad) -> dict[str, int]:
    """Attention memory of a step: {"kept": bytes alive after the forward, "peak": bytes
    alive at most during forward + backward}, inputs excluded."""
    for tensor in tensors:
        tensor.grad = None
    gc.collect()
    _, kept, out = _tensor_bytes_alive(lambda: run(*tensors))
    del out
    gc.collect()
    peak, _, _ = _tensor_bytes_alive(lambda: run(*tensors).backward(grad))
    for tensor in tensors:
        tensor.grad = None
    return {"kept": kept, "peak": peak}


def _rank(rank: int, world: int, config: dict, store: str, results: str) -> None:
    from fusedattn.distributed import _ring_attention
    from fusedattn.distributed._ring import Ring, blocked_seconds, default_pieces, piece_bounds

    torch.set_num_threads(max(1, config["threads"] // world))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    length = config["seqlen"] // world
    generator = torch.Generator().manual_seed(rank)
    tensors = _inputs(config, length, generator)
    grad = torch.randn(tensors[0].shape, generator=generator)
    options = {"causal": True}
    kv_pieces, row_pieces = config["pieces"] or default_pieces(length)

    def ring(overlap: bool):
        return lambda q, k, v: _ring_attention(
            q, k, v, None, config["placement"], options, overlap, kv_pieces, row_pieces
        )

    first_seconds = _step(ring(True), tensors, grad)  # warm-up: lazy initialization is not counted
    memory = _memory_of_one_step(ring(True), tensors, grad)
    timings = {"overlapped": [], "serialized": [], "transfer": [], "exposed": [], "exposed_serialized": []}
    hops = Ring(None, rank, world, config["placement"], overlap=False)  # every hop waited for whole
    k, v = tensors[1].detach(), tensors[2].detach()
    accumulate = torch.float32
    for _ in range(config["steps"]):
        for mode in ("overlapped", "serialized"):
            dist.barrier()
            blocked = blocked_seconds()
            timings[mode].append(_step(ring(mode == "overlapped"), tensors, grad))
            timings["exposed" if mode == "overlapped" else "exposed_serialized"].append(blocked_seconds() - blocked)
        # The same hops without compute: per piece, N - 1 K/V hops in the forward, N - 1
        # K/V hops and N dK/dV hops (float32 partial sums) in the backward.
        dist.barrier()
        start = time.perf_counter()
        for first, last in piece_bounds(length, kv_pieces) * 2:
            keys = (k[:, :, first:last].contiguous(), v[:, :, first:last].contiguous())
            for _hop in range(world - 1):
                keys = hops.pass_on(keys).wait_received()
        for first, last in piece_bounds(length, kv_pieces):
            partial = (k[:, :, first:last].to(accumulate), v[:, :, first:last].to(accumulate))
            for _hop in range(world):
                partial = hops.pass_on(partial).wait_received()
        timings["transfer"].append(time.perf_counter() - start)
    summary = {mode: statistics.median(values) for mode, values in timings.items()}
    summary.update(memory=memory, first_step=first_seconds, pieces=[kv_pieces, row_pieces])
    with open(os.path.join(results, f"rank{rank}.json"), "w") as file:
        json.dump(summary, file)
    dist.destroy_process_group()


def _single(config: dict, results: str) -> None:
    import fusedattn

    torch.set_num_threads(config["threads"])
    tensors = _inputs(config, config["seqlen"], torch.Generator().manual_seed(0))
    grad = torch.randn(tensors[0].shape)

    def run(q, k, v):
        return fusedattn.attention(q, k, v, causal=True)

    seconds = _step(run, tensors, grad)
    memory = _memory_of_one_step(run, tensors, grad)
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
    removed = waited - slowest["exposed"]
    hidden_of_transfer = removed / slowest["transfer"] if slowest["transfer"] else 0.0
    peak = max(r["memory"]["peak"] for r in ranks)
    kept = max(r["memory"]["kept"] for r in ranks)
    single_peak, single_kept = single["memory"]["peak"], single["memory"]["kept"]
    return {
        "world": world,
        "seqlen": config["seqlen"],
        "pieces": ranks[0]["pieces"],
        **{f"{mode}_s": round(value, 4) for mode, value in slowest.items()},
        "hidden": round(min(max(hidden, 0.0), 1.0), 3),
        "hidden_of_transfer": round(min(max(hidden_of_transfer, 0.0), 1.0), 3),
        "single_step_s": round(single["seconds"], 4),
        "rank_peak_mib": round(peak / 2**20, 2),
        "rank_kept_mib": round(kept / 2**20, 2),
        "single_peak_mib": round(single_peak / 2**20, 2),
        "single_kept_mib": round(single_kept / 2**20, 2),
        "peak_vs_single_over_n": round(peak / (single_peak / world), 3) if single_peak else None,
        "kept_vs_single_over_n": round(kept / (single_kept / world), 3) if single_kept else None,
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
    parser.add_argument("--pieces", type=int, nargs=2, metavar=("KV", "ROWS"),
                        help="K/V pieces and query parts of the ring (default: its own choice)")  # fmt: skip
    parser.add_argument("--output", help="also write the rows as JSON here")
    arguments = parser.parse_args()
    rows = []
    header = (
        "| N | S | pieces | overlapped s | serialized s | transfer s | exposed s (ovl / ser) | hidden | of transfer "
        "| peak MiB/rank | single peak MiB | peak vs single/N | kept MiB/rank | kept vs single/N |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for world in arguments.worlds:
        for seqlen in arguments.seqlens:
            config = dict(
                seqlen=seqlen, heads=arguments.heads, kv_heads=arguments.kv_heads, head_dim=arguments.head_dim,
                placement=arguments.placement, steps=arguments.steps, threads=arguments.threads,
                pieces=arguments.pieces,
            )  # fmt: skip
            row = measure(config, world)
            rows.append(row)
            print(
                f"| {world} | {seqlen} | {row['pieces'][0]} x {row['pieces'][1]} | {row['overlapped_s']} | "
                f"{row['serialized_s']} | {row['transfer_s']} | {row['exposed_s']} / {row['exposed_serialized_s']} | "
                f"{row['hidden']:.0%} | {row['hidden_of_transfer']:.0%} | {row['rank_peak_mib']} | {row['single_peak_mib']} | "
                f"{row['peak_vs_single_over_n']} | {row['rank_kept_mib']} | {row['kept_vs_single_over_n']} |",
                flush=True,
            )
    if arguments.output:
        document = {
            "command": "python benchmarks/ring_attention.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "rows": rows,
        }
        with open(arguments.output, "w") as file:
            json.dump(document, file, indent=1)


if __name__ == "__main__":
    main()
