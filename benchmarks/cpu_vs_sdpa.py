"""fusedattn's CPU backend against torch SDPA on CPU, in one run on this machine.

Also measures the practical ceilings of the same run: torch.mm GFLOP/s per dtype and the
bandwidth of a large tensor copy. Prints a table of ratios and writes a JSON file.

    .venv/bin/python benchmarks/cpu_vs_sdpa.py            # full set, about 5-10 minutes on 2 cores
    .venv/bin/python benchmarks/cpu_vs_sdpa.py --quick    # a smaller set

FLOPs follow FlashAttention's convention: forward 4*B*H*Sq*Sk*D (halved for causal),
forward+backward 3.5x that. Window/varlen rows count only the visible (useful) scores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import fusedattn
import torch
import torch.nn.functional as F
from fusedattn.backends.cpu import selected_isa

RESULTS = Path(__file__).resolve().parent / "results"


CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (steadier on a shared machine)


def best_time(function, repeats: int, warmup: int = 1) -> float:
    """Shortest time of function() over repeats runs, in seconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        function()
        times.append(CLOCK() - start)
    return min(times)


def mm_rate(dtype: torch.dtype, size: int = 2048) -> float:
    """torch.mm GFLOP/s for square matrices of this dtype."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    seconds = best_time(lambda: torch.mm(a, b), repeats=3)
    return 2 * size**3 / seconds / 1e9


def copy_bandwidth() -> float:
    """GB/s of a 512 MiB tensor copy (bytes read + written)."""
    source = torch.empty(128 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    seconds = best_time(lambda: target.copy_(source), repeats=3)
    return 2 * source.numel() * 4 / seconds / 1e9


def attention_flops(batch, heads, seqlen_q, seqlen_k, dim, causal) -> float:
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * dim
    return flops / 2 if causal and seqlen_q == seqlen_k else flops


def sdpa(q, k, v, causal=False, mask=None):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def dense_case(rows, name, dtype, batch, heads, seqlen, dim, causal, repeats, backward=False):
    q, k, v = (torch.randn(batch, heads, seqlen, dim, dtype=dtype) for _ in range(3))
    flops = attention_flops(batch, heads, seqlen, seqlen, dim, causal)
    if backward:
        flops *= 3.5
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        grad = torch.randn_like(q)

        def ours():
            out = fusedattn.attention(*leaves, causal=causal, backend="cpu")
            torch.autograd.grad(out, leaves, grad)

        def theirs():
            out = sdpa(*leaves, causal=causal)
            torch.autograd.grad(out, leaves, grad)
    else:

        def ours():
            with torch.no_grad():
                fusedattn.attention(q, k, v, causal=causal, backend="cpu")

        def theirs():
            with torch.no_grad():
                sdpa(q, k, v, causal=causal)

    record(rows, name, dtype, ours, theirs, repeats, flops=flops,
           shape=f"B{batch} H{heads} S{seqlen} D{dim}{' causal' if causal else ''}")  # fmt: skip


def decode_case(rows, dtype, seqlen_k, repeats, bandwidth):
    batch, heads_q, heads_kv, dim = 1, 32, 8, 128
    q = torch.randn(batch, heads_q, 1, dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
    bytes_moved = (k.numel() + v.numel()) * k.element_size()

    def ours():
        with torch.no_grad():
            fusedattn.attention(q, k, v, backend="cpu")

    def theirs():
        with torch.no_grad():
            sdpa(q, k, v)

    row = record(rows, "decode", dtype, ours, theirs, repeats, bytes_moved=bytes_moved,
                 shape=f"Sq1 Sk{seqlen_k} Hq32/Hkv8 D128")  # fmt: skip
    row["ours_fraction_of_copy_bandwidth"] = row["ours_gb_s"] / bandwidth
    row["sdpa_fraction_of_copy_bandwidth"] = row["sdpa_gb_s"] / bandwidth


def window_case(rows, dtype, repeats):
    batch, heads, seqlen, dim, window = 1, 8, 8192, 64, 512
    q, k, v = (torch.randn(batch, heads, seqlen, dim, dtype=dtype) for _ in range(3))
    position = torch.arange(seqlen)
    mask = (position[None, :] <= position[:, None]) & (position[None, :] > position[:, None] - window)
    useful = 4.0 * batch * heads * int(mask.sum()) * dim

    def ours():
        with torch.no_grad():
            fusedattn.attention(q, k, v, causal=True, window=(window - 1, 0), backend="cpu")

    def theirs():
        with torch.no_grad():
            sdpa(q, k, v, mask=mask)

    record(rows, "sliding window 512", dtype, ours, theirs, repeats, flops=useful,
           shape=f"B1 H{heads} S{seqlen} D{dim} causal window 512")  # fmt: skip


def varlen_case(rows, dtype, repeats):
    heads, dim = 8, 64
    lengths = [1024, 512, 384, 768, 256, 640, 128, 384]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, dim, dtype=dtype) for _ in range(3))
    # SDPA's equivalent: the packed batch as one sequence with a block-diagonal causal mask.
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(total)
    mask = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
    dense = [t.transpose(0, 1)[None] for t in (q, k, v)]
    useful = 4.0 * heads * int(mask.sum()) * dim

    def ours():
        with torch.no_grad():
            fusedattn.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, backend="cpu")

    def theirs():
        with torch.no_grad():
            sdpa(*dense, mask=mask)

    record(rows, "varlen causal", dtype, ours, theirs, repeats, flops=useful,
           shape=f"{len(lengths)} seqs, {total} tokens, H{heads} D{dim}")  # fmt: skip


def record(rows, name, dtype, ours, theirs, repeats, flops=None, bytes_moved=None, shape=""):
    ours_s = best_time(ours, repeats)
    sdpa_s = best_time(theirs, repeats)
    row = {
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "ours_ms": ours_s * 1e3,
        "sdpa_ms": sdpa_s * 1e3,
        "speedup": sdpa_s / ours_s,
    }
    if flops is not None:
        row["ours_gflops"] = flops / ours_s / 1e9
        row["sdpa_gflops"] = flops / sdpa_s / 1e9
    if bytes_moved is not None:
        row["ours_gb_s"] = bytes_moved / ours_s / 1e9
        row["sdpa_gb_s"] = bytes_moved / sdpa_s / 1e9
    rows.append(row)
    extra = ""
    if flops is not None:
        extra = f"  {row['ours_gflops']:7.1f} vs {row['sdpa_gflops']:7.1f} GFLOP/s"
    if bytes_moved is not None:
        extra = f"  {row['ours_gb_s']:6.1f} vs {row['sdpa_gb_s']:6.1f} GB/s"
    print(f"{name:22s} {row['dtype']:9s} {shape:34s} ours {row['ours_ms']:9.2f} ms  sdpa {row['sdpa_ms']:9.2f} ms"
          f"  x{row['speedup']:5.2f}{extra}", flush=True)  # fmt: skip
    return row


_MEMORY_PROBE = """
import re, torch, fusedattn
torch.manual_seed(0)
q, k, v = (torch.randn(1, 16, 16384, 128) for _ in range(3))
fusedattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="cpu")  # load everything once
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
with torch.no_grad():
    out, lse = fusedattn.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
peak = status("VmHWM")
print(peak - before - out.numel() * 4 - lse.numel() * 4)
"""


def memory_case() -> dict:
    """Peak resident memory a forward at S=16384, H=16, D=128 (causal, fp32) adds beyond its outputs."""
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, check=True)  # noqa: S603
    extra = int(result.stdout.strip().splitlines()[-1])
    score_matrix = 16 * 16384 * 16384 * 4
    row = {"case": "peak extra memory", "extra_bytes": extra, "score_matrix_bytes": score_matrix,
           "fraction": extra / score_matrix}  # fmt: skip
    print(f"peak extra memory of the forward: {extra / 2**20:.1f} MiB = {100 * row['fraction']:.3f}% of the "
          f"{score_matrix / 2**30:.0f} GiB score matrix")  # fmt: skip
    return row


def markdown_table(report: dict) -> str:
    """The cases of a saved report as a markdown table (for docs/performance.md)."""
    ceilings = report["ceilings"]
    lines = [
        f"torch.mm {ceilings['mm_gflops_float32']:.0f} GFLOP/s fp32, {ceilings['mm_gflops_bfloat16']:.0f} bf16;"
        f" copy {ceilings['copy_gb_s']:.1f} GB/s; {report['machine']['threads']} thread(s), {report.get('clock', '')}",
        "",
        "| case | dtype | shape | fusedattn ms | SDPA ms | speedup | fusedattn rate | SDPA rate | of ceiling |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["cases"]:
        if "ours_gflops" in row:
            rates = f"{row['ours_gflops']:.1f} GFLOP/s", f"{row['sdpa_gflops']:.1f} GFLOP/s"
            ceiling = row.get("ours_fraction_of_mm")
        else:
            rates = f"{row['ours_gb_s']:.1f} GB/s", f"{row['sdpa_gb_s']:.1f} GB/s"
            ceiling = row.get("ours_fraction_of_copy_bandwidth")
        ceiling_text = "" if ceiling is None else f"{100 * ceiling:.0f}%"
        lines.append(
            f"| {row['case']} | {row['dtype']} | {row['shape']} | {row['ours_ms']:.2f} | {row['sdpa_ms']:.2f} |"
            f" {row['speedup']:.2f}x | {rates[0]} | {rates[1]} | {ceiling_text} |"
        )
    memory = report.get("memory")
    if memory:
        lines += ["", f"Peak extra memory of the forward at S=16384, H=16, D=128: {memory['extra_bytes'] / 2**20:.0f} MiB"
                  f" = {100 * memory['fraction']:.2f}% of the (Sq x Sk) fp32 score matrix."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the S=16384 memory probe")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time with process CPU time instead of wall time (use with --threads 1)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON path (default benchmarks/results/cpu-DATE.json)"
    )
    parser.add_argument("--table", type=Path, default=None, help="print a saved JSON report as markdown and exit")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    torch.manual_seed(0)
    repeats = 2 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel variant {selected_isa()}")
    ceilings = {"mm_gflops_float32": mm_rate(torch.float32), "mm_gflops_bfloat16": mm_rate(torch.bfloat16),
                "copy_gb_s": copy_bandwidth()}  # fmt: skip
    print(f"torch.mm: {ceilings['mm_gflops_float32']:.1f} GFLOP/s fp32, {ceilings['mm_gflops_bfloat16']:.1f} bf16;"
          f" copy {ceilings['copy_gb_s']:.1f} GB/s")  # fmt: skip
    rows: list[dict] = []
    dtypes = (torch.bfloat16, torch.float32)
    dense_shapes = [(1, 16, 2048, 128), (2, 8, 1024, 64)] if args.quick else [
        (1, 16, 2048, 128), (2, 8, 1024, 64), (4, 8, 512, 128), (1, 8, 4096, 128), (1, 8, 8192, 64)]  # fmt: skip
    for dtype in dtypes:
        for batch, heads, seqlen, dim in dense_shapes:
            for causal in (False, True):
                dense_case(rows, "forward", dtype, batch, heads, seqlen, dim, causal, repeats)
    for dtype in dtypes:
        for causal in (False, True):
            dense_case(rows, "forward+backward", dtype, 1, 8, 1024, 128, causal, 2, backward=True)
    for dtype in dtypes:
        for seqlen_k in (4096, 32768):
            decode_case(rows, dtype, seqlen_k, repeats * 3, ceilings["copy_gb_s"])
    for dtype in dtypes:
        window_case(rows, dtype, 1)
        varlen_case(rows, dtype, repeats)
    for row in rows:
        if "ours_gflops" in row and row["case"] == "forward":
            key = "mm_gflops_" + row["dtype"]
            row["ours_fraction_of_mm"] = row["ours_gflops"] / ceilings[key]
    memory = None if args.no_memory or args.quick else memory_case()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "kernel_variant": selected_isa(),
            "torch": torch.__version__,
        },  # fmt: skip
        "ceilings": ceilings,
        "cases": rows,
        "memory": memory,
        "command": "python " + " ".join(sys.argv),
        "clock": "process CPU time" if args.cpu_time else "wall time",
    }
    output = args.output or RESULTS / f"cpu-{datetime.date.today().isoformat()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
