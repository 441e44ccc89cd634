"""Benchmark fusedattn's GPU backends against torch SDPA's backends on the same card.

Shapes follow FlashAttention's benchmark (benchmarks/benchmark_flash_attention.py):
16k tokens per batch, model dim 2048 (32 heads at d64, 16 at d128), seq 512 .. 16k,
causal and not, forward and forward+backward, bf16. FLOPs: forward 4*B*H*S*S*D,
halved for causal; forward+backward 3.5x forward. Also decode (1 query row, GQA 32/8,
long KV) in bytes of K/V read per second, against a copy bandwidth measured in the same
run. Timings: triton.testing.do_bench (median ms). Writes one JSON file.

    python scripts/device_bench.py --json OUT.json [--budget-s 200]
    python scripts/device_bench.py --tiny --json /tmp/x.json   # logic check on CPU (interpreter)

Rows run in priority order and the run stops starting new rows when the time budget is
spent (those rows are listed as skipped), so a time-boxed caller always gets a JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _timer(device: str):
    """(fn) -> median milliseconds: triton's do_bench on CUDA, a wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        def bench(fn, grad_to_none=None):
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none))

        return bench

    def bench_cpu(fn, grad_to_none=None):
        fn()
        times = []
        for _ in range(3):
            if grad_to_none:
                for tensor in grad_to_none:
                    tensor.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]

    return bench_cpu


def _fusedattn_backends(device: str) -> list[str]:
    import fusedattn.dispatch as dispatch

    names = []
    for name in ("triton", "cuda"):
        backend = dispatch.registry().get(name)
        if backend is None:
            continue
        available, _ = backend.availability()
        if available and device in backend.capabilities.devices:
            names.append(name)
    return names


def _attention_function(implementation: str, causal: bool):
    """(q, k, v) -> out for "fusedattn:NAME" or "sdpa:BACKEND"; q (B, H, S, D)."""
    kind, _, name = implementation.partition(":")
    if kind == "fusedattn":
        import fusedattn

        return lambda q, k, v: fusedattn.attention(q, k, v, causal=causal, backend=name)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backend = getattr(SDPBackend, name) if name != "MATH" else SDPBackend.MATH

    def run(q, k, v):
        with sdpa_kernel(sdpa_backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def _measure(bench, implementation, causal, q, k, v, mode):
    """Median ms of one implementation; "fusedattn:triton-notma" is triton with its Hopper
    tensor-descriptor (TMA) path switched off."""
    if implementation.endswith("-notma"):
        previous = os.environ.get("FUSEDATTN_TRITON_TMA")
        os.environ["FUSEDATTN_TRITON_TMA"] = "0"
        try:
            return _measure(bench, implementation.removesuffix("-notma"), causal, q, k, v, mode)
        finally:
            if previous is None:
                os.environ.pop("FUSEDATTN_TRITON_TMA")
            else:
                os.environ["FUSEDATTN_TRITON_TMA"] = previous
    attend = _attention_function(implementation, causal)
    if mode == "fwd":
        with torch.no_grad():
            return bench(lambda: attend(q, k, v))
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn_like(q[..., : v.shape[-1]])

    def forward_backward():
        attend(*inputs).backward(grad_out)

    return bench(forward_backward, grad_to_none=inputs)


def _flops(batch, heads, seqlen, head_dim, causal, mode):
    forward = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2.0 if causal else 1.0)
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def _rows(tiny: bool):
    """(priority-ordered) attention rows: (head_dim, seqlen, causal, mode)."""
    if tiny:
        return [(16, 32, causal, mode) for causal in (False, True) for mode in ("fwd", "fwd_bwd")]
    seqlens = (512, 1024, 2048, 4096, 8192, 16384)
    rows = [(128, s, False, "fwd") for s in (4096, 8192, 16384)]  # the TFLOP/s target first
    for mode in ("fwd", "fwd_bwd"):
        for head_dim in (128, 64):
            for causal in (False, True):
                rows += [(head_dim, s, causal, mode) for s in seqlens if (head_dim, s, causal, mode) not in rows]
    return rows


def copy_bandwidth(device: str, bench, tiny: bool) -> dict:
    elements = (1 << 16) if tiny else (1 << 30) // 2  # 1 GiB of bf16 on the GPU
    source = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    milliseconds = bench(lambda: target.copy_(source))
    moved = 2 * source.numel() * source.element_size()
    return {"bytes": moved, "ms": milliseconds, "GB_per_s": moved / milliseconds / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting rows after this many seconds")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU logic check under TRITON_INTERPRET=1)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if device == "cpu":
        dtype = torch.float16 if dtype == torch.bfloat16 else dtype  # the interpreter has no bf16 dots
    bench = _timer(device)
    implementations = [f"fusedattn:{name}" for name in _fusedattn_backends(device)]
    if device == "cuda" and "fusedattn:triton" in implementations and torch.cuda.get_device_capability()[0] >= 9:
        implementations.insert(1, "fusedattn:triton-notma")
    implementations += [f"sdpa:{name}" for name in (SDPA_BACKENDS if device == "cuda" else ("MATH",))]

    import fusedattn

    versions = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fusedattn": getattr(fusedattn, "__version__", "?"),
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "dtype": str(dtype).removeprefix("torch."),
        "implementations": implementations,
        "flop_convention": "forward 4*B*H*S*S*D (halved causal); fwd_bwd 3.5x forward",
        "attention": [],
        "decode": [],
        "skipped": [],
    }

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)

    report["copy_bandwidth"] = copy_bandwidth(device, bench, args.tiny)
    save()
    tokens, model_dim = (64, 32) if args.tiny else (16384, 2048)
    for head_dim, seqlen, causal, mode in _rows(args.tiny):
        row = {"head_dim": head_dim, "seqlen": seqlen, "causal": causal, "mode": mode}
        if over_budget():
            report["skipped"].append(row)
            continue
        batch, heads = max(1, tokens // seqlen), model_dim // head_dim
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype) for _ in range(3))
        row.update(batch=batch, heads=heads, ms={}, tflops={}, errors={})
        flops = _flops(batch, heads, seqlen, head_dim, causal, mode)
        for implementation in implementations:
            try:
                milliseconds = _measure(bench, implementation, causal, q, k, v, mode)
                row["ms"][implementation] = milliseconds
                row["tflops"][implementation] = flops / milliseconds / 1e9
            except Exception as error:  # one backend failing must not stop the run
                row["errors"][implementation] = f"{type(error).__name__}: {str(error)[:300]}"
        sdpa = [row["tflops"][i] for i in implementations if i.startswith("sdpa:") and i in row["tflops"]]
        if sdpa:
            row["fastest_sdpa_tflops"] = max(sdpa)
            for implementation in implementations:
                if implementation.startswith("fusedattn:") and implementation in row["tflops"]:
                    row.setdefault("ratio_vs_fastest_sdpa", {})[implementation] = row["tflops"][implementation] / max(
                        sdpa
                    )
        report["attention"].append(row)
        print(json.dumps(row), flush=True)
        save()
        del q, k, v

    # (batch, Sk, Sq): 0.5 to 1 GB of K/V each, so launch overhead stays small against the reads.
    decode_shapes = [(1, 64, 1)] if args.tiny else [(4, 32768, 1), (1, 131072, 1), (8, 32768, 1), (16, 16384, 4)]
    heads_q, heads_kv, head_dim = (4, 2, 16) if args.tiny else (32, 8, 128)
    for batch, seqlen_k, seqlen_q in decode_shapes:
        row = {"batch": batch, "seqlen_q": seqlen_q, "seqlen_k": seqlen_k, "heads_q": heads_q, "heads_kv": heads_kv}
        if over_budget():
            report["skipped"].append(row)
            continue
        q = torch.randn(batch, heads_q, seqlen_q, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, heads_kv, seqlen_k, head_dim, device=device, dtype=dtype) for _ in range(2))
        moved = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()
        row.update(bytes=moved, ms={}, GB_per_s={}, fraction_of_copy={}, errors={})
        for implementation in implementations:
            try:
                milliseconds = _measure(bench, implementation, False, q, k, v, "fwd")
                row["ms"][implementation] = milliseconds
                row["GB_per_s"][implementation] = moved / milliseconds / 1e6
                row["fraction_of_copy"][implementation] = row["GB_per_s"][implementation] / max(
                    report["copy_bandwidth"]["GB_per_s"], 1e-9
                )
            except Exception as error:
                row["errors"][implementation] = f"{type(error).__name__}: {str(error)[:300]}"
        report["decode"].append(row)
        print(json.dumps(row), flush=True)
        save()
    save()
    print(f"wrote {args.json} in {report['elapsed_s']} s; {len(report['skipped'])} rows skipped (budget)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
