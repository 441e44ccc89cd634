"""Compile every Triton attention kernel for real GPU targets, without a GPU.

The kernels are run through their launchers on CPU tensors with the launch replaced by
a recorder; each recorded launch is then compiled by triton.compile for the chosen
targets (default sm_80 and sm_90) with the GPU configs (every forward autotune config,
the backward and decode heuristics). This catches what the interpreter cannot: type
errors of the compiled frontend, unsupported ops, and shared memory over the card's
limit. Needs only triton's bundled ptxas.

    python scripts/device_compile_check.py [--targets 80,90] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from fusedattn.kernels import attention_backward, attention_decode, attention_forward, configs  # noqa: E402
from fusedattn.validation import validate_attention, validate_varlen  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
    torch.uint8: "u8",
}


def _signature(kernel, arguments: dict) -> tuple[dict, dict]:
    signature, constants = {}, {}
    for param in kernel.params:
        name = param.name
        value = arguments[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # launches specialize integer arguments equal to 1
                signature[name] = "constexpr"
                constants[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else ("u32" if value < 2**32 else "i64")
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unsupported argument {type(value).__name__}")
    return signature, constants


class Recorder:
    def __init__(self) -> None:
        self.launches: list[tuple[object, dict]] = []

    def __call__(self, kernel, grid, **arguments) -> None:
        self.launches.append((kernel, arguments))


def _calls(dtype: torch.dtype, head_dim: int, head_dim_v: int):
    """A few calls covering the feature flags; tensors on CPU (never read)."""

    def tensors(sq, sk, hq=8, hkv=2):
        return (
            torch.zeros(2, hq, sq, head_dim, dtype=dtype),
            torch.zeros(2, hkv, sk, head_dim, dtype=dtype),
            torch.zeros(2, hkv, sk, head_dim_v, dtype=dtype),
        )

    q, k, v = tensors(300, 300)
    yield "plain", validate_attention(q, k, v)
    yield "causal", validate_attention(q, k, v, causal=True)
    yield (
        "everything",
        validate_attention(
            q,
            k,
            v,
            causal=True,
            window=(64, None),
            alibi_slopes=torch.rand(8),
            softcap=30.0,
            attn_mask=torch.zeros(2, 1, 300, 300, dtype=torch.bool),
            key_lengths=torch.tensor([300, 100]),
            dropout_p=0.1,
            dropout_seed=1,
        ),
    )
    yield "additive_mask", validate_attention(q, k, v, attn_mask=torch.zeros(300, 300, dtype=dtype), window=(8, 8))
    qv = torch.zeros(40, 8, head_dim, dtype=dtype)
    kv = torch.zeros(50, 2, head_dim, dtype=dtype)
    vv = torch.zeros(50, 2, head_dim_v, dtype=dtype)
    cu_q, cu_k = torch.tensor([0, 10, 40], dtype=torch.int32), torch.tensor([0, 20, 50], dtype=torch.int32)
    yield "varlen", validate_varlen(qv, kv, vv, cu_q, cu_k, 30, 30, causal=True)
    q, k, v = tensors(1, 4096)
    yield "decode", validate_attention(q, k, v, causal=True)


def record(dtype: torch.dtype, head_dim: int, head_dim_v: int) -> list[tuple[str, object, dict]]:
    recorder = Recorder()
    saved = {module: module.launch for module in (attention_forward, attention_backward, attention_decode)}
    try:
        for module in saved:
            module.launch = recorder
        # GPU configs, although the tensors are on the CPU.
        configs.interpreting = lambda: False
        attention_decode.interpreting = lambda: False
        attention_decode.configs.multiprocessor_count = lambda index: 132
        entries = []
        for name, call in _calls(dtype, head_dim, head_dim_v):
            start = len(recorder.launches)
            out, lse = attention_forward.forward(call.with_tensors(needs_grad=False))
            if name != "decode":
                for deterministic in ("0", "1"):  # atomic dQ, then the separate dQ kernel
                    os.environ["FUSEDATTN_DETERMINISTIC"] = deterministic
                    with torch.no_grad():
                        attention_backward.backward(call, torch.zeros_like(out), out, lse)
                os.environ.pop("FUSEDATTN_DETERMINISTIC")
            entries += [(name, kernel, arguments) for kernel, arguments in recorder.launches[start:]]
        return entries
    finally:
        for module, launch in saved.items():
            module.launch = launch


def _variants(kernel, arguments: dict, capability: int) -> list[dict]:
    """Every autotune config of the forward kernel, with and without TMA (Hopper and newer)."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [arguments]
    variants = []
    for use_tma in (False, True) if capability >= 90 else (False,):
        for config in kernel.configs:
            variant = dict(arguments, USE_TMA=use_tma, **config.kwargs)
            variant["num_warps"], variant["num_stages"] = config.num_warps, config.num_stages
            variants.append(variant)
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--head-dims", default="64,128,72:40,256", help="D or D:Dv, comma separated")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tma-only", action="store_true", help="compile only the forward TMA variants")
    args = parser.parse_args()
    results, failures = [], 0
    for capability in (int(t) for t in args.targets.split(",")):
        target = GPUTarget("cuda", capability, 32)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for dims in args.head_dims.split(","):
                head_dim, _, head_dim_v = dims.partition(":")
                head_dim, head_dim_v = int(head_dim), int(head_dim_v or head_dim)
                seen = set()
                for case, kernel, arguments in record(dtype, head_dim, head_dim_v):
                    if case != "decode" and kernel is attention_forward.attention_forward_kernel:
                        # The launcher took the CPU path: compile the GPU autotune configs instead.
                        heavy = arguments["MASK_KIND"] != 0 or arguments["HAS_DROPOUT"] or arguments["HAS_SOFTCAP"]
                        block = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
                        kernel = attention_forward._tuned_forward_kernel(block, dtype, heavy)
                    base = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
                    for variant in _variants(kernel, arguments, capability):
                        if args.tma_only and not variant.get("USE_TMA"):
                            continue
                        signature, constants = _signature(base, variant)
                        key = (base.__name__, tuple(sorted((k, str(v)) for k, v in constants.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        options = {"num_warps": variant.get("num_warps", 4), "num_stages": variant.get("num_stages", 2)}
                        label = (
                            f"sm_{capability} {dtype_name} d{head_dim}/{head_dim_v} {case} {base.__name__} "
                            f"M{variant.get('BLOCK_M', '-')} N{variant.get('BLOCK_N', '-')} w{options['num_warps']} "
                            f"s{options['num_stages']}{' tma' if variant.get('USE_TMA') else ''}"
                        )
                        started = time.perf_counter()
                        try:
                            compiled = triton.compile(
                                ASTSource(base, signature, constants), target=target, options=options
                            )
                            shared = compiled.metadata.shared
                            limit = SHARED_MEMORY_LIMIT.get(capability, 227 * 1024)
                            status = "ok" if shared <= limit else f"shared memory {shared} > {limit}"
                        except Exception as error:  # report every failure, keep going
                            status, shared = f"error: {type(error).__name__}: {str(error)[-1500:]}", None
                        seconds = time.perf_counter() - started
                        failures += status != "ok"
                        results.append({"kernel": label, "status": status, "shared": shared, "seconds": seconds})
                        print(f"{status[:120]:<40} {label} shared={shared} ({seconds:.1f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "results": results}, handle, indent=1)
    print(f"{len(results)} kernels compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
