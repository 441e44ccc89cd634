"""Compile every Triton attention kernel for real GPU targets, without a GPU.

The kernels are run through their launchers on CPU tensors with the launch replaced by
a recorder; each recorded launch is then compiled by triton.compile for the chosen
targets (default sm_90) with the GPU configs (every forward autotune config, with and
without TMA on sm_90+, the backward and decode heuristics).

Each launch is compiled with the specialization Triton's JIT gives a real launch on CUDA
tensors: integer arguments equal to 1 become constexprs, integers divisible by 16 and
16-byte aligned pointers get tt.divisibility=16 (the recorded CPU tensors stand in for
CUDA allocations: a pointer is aligned when its storage offset keeps it so), except for
the parameters a kernel lists in do_not_specialize / do_not_specialize_on_alignment.
Without those hints Triton builds scalar loads and no cp.async pipeline, i.e. another
kernel than the GPU runs (--no-specialize compiles that one, for comparison). When the
installed Triton has the JIT's own binder, each specialization is checked against it.

Reported per kernel: status, registers, spills (compiled.n_spills: the local memory
ptxas gives the thread, in 4-byte words), spill store/load bytes, shared memory,
seconds, and which copy / MMA instructions the PTX uses. This catches what the
interpreter cannot: type errors of the compiled frontend, unsupported ops, ptxas
crashes, shared memory over the card's limit and register spills. Needs only triton's
bundled ptxas. Compiles run in worker processes with a per-kernel timeout.

    python scripts/device_compile_check.py --slice ci            # representative, ~1 min
    python scripts/device_compile_check.py --slice full --jobs 2 --json PATH
    python scripts/device_compile_check.py --dtypes bfloat16 --head-dims 128,72:40
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import deque

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fusedattn.kernels import attention_backward, attention_decode, attention_forward, configs  # noqa: E402
from fusedattn.validation import validate_attention, validate_paged, validate_varlen  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch_specialization import _backend, jit_specialization, specialize  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ALL_CASES = (
    "plain", "causal", "everything", "additive_mask", "varlen", "decode", "paged", "paged_decode", "sinks",
    "sinks_decode", "int8_kv", "fp8_kv", "int8_kv_decode", "fp8_kv_decode", "fp8_kv_paged_decode",
)  # fmt: skip
# Calls that have no backward: paged caches and 8-bit K/V are inference only.
INFERENCE_CASES = ("decode", "sinks_decode", "paged", "paged_decode", "int8_kv", "fp8_kv", "int8_kv_decode",
                   "fp8_kv_decode", "fp8_kv_paged_decode")  # fmt: skip
# Instructions worth knowing a kernel uses (searched in its PTX).
PTX_FEATURES = {
    "cp.async": re.compile(r"cp\.async\.c[ag]\."),  # pipelined global -> shared copies (Ampere+)
    "tma": re.compile(r"cp\.async\.bulk\.tensor"),  # tensor-descriptor copies (Hopper+)
    "wgmma": re.compile(r"wgmma\.mma_async"),  # Hopper warp-group MMA
    "mma": re.compile(r"\bmma\.sync"),  # Ampere MMA
}


# ---- recording the launches ----------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.launches: list[tuple[object, dict]] = []

    def __call__(self, kernel, grid, **arguments) -> None:
        self.launches.append((kernel, arguments))


def _calls(dtype: torch.dtype, head_dim: int, head_dim_v: int):
    """A few calls covering the feature flags; tensors on CPU (never read). Plain and
    causal use a sequence length that is a multiple of 16 (most real shapes: those
    integers get the divisibility hint), the masked calls a ragged one (300)."""

    def tensors(sq, sk, hq=8, hkv=2):
        return (
            torch.zeros(2, hq, sq, head_dim, dtype=dtype),
            torch.zeros(2, hkv, sk, head_dim, dtype=dtype),
            torch.zeros(2, hkv, sk, head_dim_v, dtype=dtype),
        )

    q, k, v = tensors(1024, 1024)
    yield "plain", validate_attention(q, k, v)
    yield "causal", validate_attention(q, k, v, causal=True)
    q, k, v = tensors(300, 300)
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
    # Paged caches of 16-key blocks: chunked prefill (the forward kernel) and decoding.
    key_cache = torch.zeros(520, 16, 2, head_dim, dtype=dtype)
    value_cache = torch.zeros(520, 16, 2, head_dim_v, dtype=dtype)
    table = torch.arange(512, dtype=torch.int32).view(2, 256)
    lengths = torch.tensor([4096, 3000], dtype=torch.int32)
    yield "paged", validate_paged(qv, key_cache, value_cache, table, lengths, cu_q, 30, causal=True)
    decode_q = torch.zeros(2, 8, head_dim, dtype=dtype)
    cu_decode = torch.tensor([0, 1, 2], dtype=torch.int32)
    yield "paged_decode", validate_paged(decode_q, key_cache, value_cache, table, lengths, cu_decode, 1, causal=True)
    # Sinks: folded at the end of the forward kernel, in the decode combine kernel, and their gradient.
    sinks = torch.zeros(8)
    q, k, v = tensors(1024, 1024)
    yield "sinks", validate_attention(q, k, v, causal=True, sinks=sinks)
    q, k, v = tensors(1, 4096)
    yield "sinks_decode", validate_attention(q, k, v, causal=True, sinks=sinks)
    # 8-bit K/V with one float32 scale per token and KV head (as fusedattn.quantize_kv makes them).
    for kv_name, kv_dtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        for suffix, seqlen_q in (("", 1024), ("_decode", 1)):
            q, k, v = tensors(seqlen_q, 4096)
            scales = torch.ones(2, 2, 4096)
            yield (
                f"{kv_name}_kv{suffix}",
                validate_attention(q, k.to(kv_dtype), v.to(kv_dtype), causal=True, k_descale=scales, v_descale=scales),
            )
    paged_scales = torch.ones(520, 16, 2)
    yield (
        "fp8_kv_paged_decode",
        validate_paged(decode_q, key_cache.to(torch.float8_e4m3fn), value_cache.to(torch.float8_e4m3fn), table,
                       lengths, cu_decode, 1, causal=True, k_descale=paged_scales, v_descale=paged_scales),
    )  # fmt: skip


@contextlib.contextmanager
def _gpu_launchers(recorder: Recorder):
    """The launchers as on an H100 (GPU configs, 132 SMs), their launches recorded."""
    saved: list[tuple[object, str, object]] = []

    def patch(module, name, value):
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)

    for module in (attention_forward, attention_backward, attention_decode):
        patch(module, "launch", recorder)
    patch(configs, "interpreting", lambda: False)
    patch(attention_decode, "interpreting", lambda: False)
    patch(configs, "multiprocessor_count", lambda index: 132)
    if hasattr(attention_decode, "split_count"):  # split like on the GPU, although the tensors are on the CPU
        split_count = attention_decode.split_count
        patch(attention_decode, "split_count", lambda problem, block_n, device: split_count(problem, block_n, _CUDA))
    deterministic = os.environ.get("FUSEDATTN_DETERMINISTIC")
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        if deterministic is None:
            os.environ.pop("FUSEDATTN_DETERMINISTIC", None)
        else:
            os.environ["FUSEDATTN_DETERMINISTIC"] = deterministic


_CUDA = torch.device("cuda", 0)


def record(dtype: torch.dtype, head_dim: int, head_dim_v: int, cases=ALL_CASES) -> list[tuple[str, object, dict]]:
    """(case, kernel, arguments) of every launch the calls make (backward in both dQ modes)."""
    recorder = Recorder()
    entries = []
    with _gpu_launchers(recorder):
        for name, call in _calls(dtype, head_dim, head_dim_v):
            if name not in cases:
                continue
            start = len(recorder.launches)
            out, lse = attention_forward.forward(call.with_tensors(needs_grad=False))
            if name not in INFERENCE_CASES:
                for deterministic in ("0", "1"):  # atomic dQ, then the separate dQ kernel
                    os.environ["FUSEDATTN_DETERMINISTIC"] = deterministic
                    with torch.no_grad():
                        attention_backward.backward(call, torch.zeros_like(out), out, lse)
            entries += [(name, kernel, arguments) for kernel, arguments in recorder.launches[start:]]
    return entries


# ---- planning ------------------------------------------------------------------------------
def forward_configs(block_d: int, dtype: torch.dtype, heavy: bool, use_tma: bool, precision: str = "ieee") -> list:
    """The forward autotune configs a launch with / without TMA (and fp32 dot precision) tunes over."""
    function = configs.forward_configs
    parameters = inspect.signature(getattr(function, "__wrapped__", function)).parameters
    extra = {}
    if "use_tma" in parameters:
        extra["use_tma"] = use_tma
    if "precision" in parameters:
        extra["precision"] = precision
    return list(function(block_d, dtype, heavy, **extra))


def _config_options(config) -> dict:
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _family(fn, arguments: dict) -> str:
    name = fn.__name__
    if "decode" in name:
        return "decode"
    if "backward" in name:
        return "backward"
    return "forward-tma" if arguments.get("USE_TMA") else "forward"


def _base(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _variants(case: str, kernel, arguments: dict, capability: int, dtype: torch.dtype) -> list[dict]:
    """Arguments plus launch options of every compile a launch can lead to on the GPU: each
    forward autotune config with and without TMA (Hopper and newer), else the recorded one."""
    base = _base(kernel)
    if base is not attention_forward.attention_forward_kernel or case.endswith("decode"):
        return [arguments]
    # The launcher took the CPU path: compile the GPU autotune configs instead.
    heavy = arguments["MASK_KIND"] != 0 or bool(arguments["HAS_DROPOUT"]) or bool(arguments["HAS_SOFTCAP"])
    block = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
    tma_options = (False, True) if capability >= 90 and hasattr(tl, "make_tensor_descriptor") else (False,)
    if dtype == torch.float32 and arguments.get("INPUT_PRECISION", "ieee") == "ieee":
        tma_options = (False,)  # FMA dots never take the TMA path (attention_forward._run_forward_kernel)
    if arguments.get("IS_PAGED"):
        tma_options = (False,)  # paged rows never come through tensor descriptors
    variants = []
    for use_tma in tma_options:
        for config in forward_configs(block, dtype, heavy, use_tma, arguments.get("INPUT_PRECISION", "ieee")):
            variant = {k: v for k, v in arguments.items() if k not in ("num_warps", "num_stages")}
            variants.append(dict(variant, USE_TMA=use_tma, **_config_options(config)))
    return variants


def _label(capability, dtype_name, dims, case, fn, arguments, options) -> str:
    return (
        f"sm_{capability} {dtype_name} d{dims[0]}/{dims[1]} {case} {fn.__name__} "
        f"M{arguments.get('BLOCK_M', '-')} N{arguments.get('BLOCK_N', '-')} w{options.get('num_warps', 4)} "
        f"s{options.get('num_stages', 3)}{' tma' if arguments.get('USE_TMA') else ''}"
        f"{' tf32' if arguments.get('INPUT_PRECISION') == 'tf32' else ''}"
    )


def plan(
    capabilities,
    dtype_names,
    head_dims,
    cases=ALL_CASES,
    families=None,
    specialized: bool = True,
    select=None,
    check_binder: bool = True,
) -> list[dict]:
    """Compile tasks (picklable dicts), one per distinct kernel specialization."""
    tasks, seen = [], set()
    for capability in capabilities:
        backend = _backend(capability)
        for dtype_name in dtype_names:
            dtype = getattr(torch, dtype_name)
            for dims in head_dims:
                for case, kernel, recorded in record(dtype, *dims, cases=cases):
                    fn = _base(kernel)
                    parameters = {param.name for param in fn.params}
                    for variant in _variants(case, kernel, recorded, capability, dtype):
                        family = _family(fn, variant)
                        if families and family not in families:
                            continue
                        arguments = {k: v for k, v in variant.items() if k in parameters}
                        options = {k: v for k, v in variant.items() if k not in parameters}
                        signature, constants, attrs = specialize(fn, arguments, backend, specialized)
                        key = (
                            capability,
                            fn.__name__,
                            repr(sorted(signature.items())),
                            repr(sorted(constants.items())),
                        )
                        key += (repr(sorted(attrs)), repr(sorted(options.items())))
                        if key in seen:
                            continue
                        task = dict(
                            label=_label(capability, dtype_name, dims, case, fn, arguments, options),
                            module=fn.__module__,
                            name=fn.__name__,
                            family=family,
                            capability=capability,
                            dtype=dtype_name,
                            head_dim=dims[0],
                            head_dim_v=dims[1],
                            case=case,
                            config=dict(
                                BLOCK_M=arguments.get("BLOCK_M"),
                                BLOCK_N=arguments.get("BLOCK_N"),
                                num_warps=options.get("num_warps", 4),
                                num_stages=options.get("num_stages", 3),
                                USE_TMA=bool(arguments.get("USE_TMA", False)),
                            ),
                            specialized=specialized,
                            divisible=sorted(fn.params[path[0]].name for path in attrs),
                            signature=signature,
                            constants=constants,
                            attrs=attrs,
                            options=options,
                            binder=None,
                        )
                        if select is not None and not select(task):
                            continue
                        seen.add(key)
                        if check_binder and specialized:
                            expected = jit_specialization(fn, arguments, options, backend)
                            if expected is None:
                                task["binder"] = "unavailable"
                            elif expected == (signature, constants, attrs):
                                task["binder"] = "same"
                            else:
                                task["binder"] = f"differs: JIT {expected} vs {(signature, constants, attrs)}"
                        tasks.append(task)
    return tasks


# ---- slices --------------------------------------------------------------------------------
# Representative and fast (CI, about a minute on two cores): every bf16 d128 forward
# config with and without TMA, the heavy-feature configs (the most registers), a narrow,
# a ragged and the widest head dim, decode at three head dims, one backward kernel, one
# config each of sinks, an fp8 K/V forward and an int8 K/V decode, and one unspecialized
# control (the kernel the check used to build).
CI_SLICE = dict(
    targets="90",
    dtypes="bfloat16,float16",
    head_dims="128,64,72:40,256",
    cases="plain,causal,everything,decode,paged,paged_decode,sinks,sinks_decode,fp8_kv,int8_kv_decode",
)


def _ci_select(task: dict) -> bool:
    case, dtype, d, family, config = task["case"], task["dtype"], task["head_dim"], task["family"], task["config"]
    if family == "decode":
        wanted = (("bfloat16", 128), ("float16", 64), ("bfloat16", 256))
        if case == "sinks_decode":  # the sink joins in the combine kernel
            return task["name"].endswith("combine_kernel") and (dtype, d) == ("bfloat16", 128)
        if case in ("paged_decode", "int8_kv_decode"):
            return task["name"].endswith("split_kernel") and (dtype, d) == ("bfloat16", 128)
        return task["name"].endswith("split_kernel") and (dtype, d) in wanted
    if family == "forward":
        if (dtype, d) == ("bfloat16", 128):
            one_config = config["BLOCK_M"] == 128 and config["num_stages"] == 3
            return case in ("plain", "everything") or (case in ("paged", "sinks", "fp8_kv") and one_config)
        if (dtype, d, case) == ("float16", 64, "causal"):
            return True
        return (dtype, d, case) == ("float16", 72, "causal") and (config["BLOCK_M"], config["BLOCK_N"]) == (128, 64)
    if family == "forward-tma":
        return (dtype, case) == ("bfloat16", "plain") and d == 128 or (dtype, d, case) == ("float16", 256, "causal")
    if family == "backward":
        name = task["name"]
        return (
            (dtype, d, case) == ("bfloat16", 128, "plain")
            and name.endswith("dkdv_kernel")
            and task["constants"].get("ATOMIC_DQ")
        )
    return False


SLICES = {
    "ci": (CI_SLICE, _ci_select),
    "full": (
        dict(targets="90", dtypes="bfloat16,float16,float32", head_dims="64,128,72:40,256", cases=",".join(ALL_CASES)),
        None,
    ),
}


# ---- compiling -----------------------------------------------------------------------------
_PTXAS_NUMBERS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas(capability: int):
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(capability).path
    except TypeError:  # Triton before 3.5: one ptxas for every arch
        return get_ptxas().path


def ptxas_version(capability: int) -> str:
    """The release line of `ptxas --version` for this target (3.9 uses its newer ptxas for sm_90 too)."""
    import subprocess

    try:
        text = subprocess.run([_ptxas(capability), "--version"], capture_output=True, text=True, check=True).stdout
    except Exception as error:  # noqa: BLE001
        return f"unknown ({error})"
    return next((line.strip() for line in text.splitlines() if "release" in line), text.strip()[-200:])


def _resources(log: str, cubin: bytes | None, capability: int) -> dict:
    """Registers and local memory from ptxas -v (printed with TRITON_DUMP_PTXAS_LOG), else
    from cuobjdump --dump-resource-usage of the cubin."""
    found = {key: pattern.search(log) for key, pattern in _PTXAS_NUMBERS.items()}
    if all(found.values()):
        return {key: int(match.group(1)) for key, match in found.items()}
    numbers = dict.fromkeys(_PTXAS_NUMBERS)
    if cubin:
        try:
            import subprocess

            cuobjdump = os.path.join(os.path.dirname(_ptxas(capability)), "cuobjdump")
            with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                handle.write(cubin)
                handle.flush()
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True
                ).stdout
            registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
            numbers["registers"] = int(registers.group(1)) if registers else None
            numbers["stack"] = int(stack.group(1)) if stack else None
        except Exception:  # noqa: BLE001 - numbers stay unknown
            pass
    return numbers


def compile_task(task: dict) -> dict:
    """Compile one task in this process; the result dict of the JSON."""
    fn = getattr(importlib.import_module(task["module"]), task["name"])
    capability = task["capability"]
    source = ASTSource(fn, task["signature"], task["constants"], task["attrs"])
    with contextlib.suppress(Exception):
        triton.knobs.nvidia.dump_ptxas_log = True
    printed = io.StringIO()
    started = time.perf_counter()
    resources, shared, features = dict.fromkeys(_PTXAS_NUMBERS), None, []
    try:
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=task["options"])
        shared = compiled.metadata.shared
        ptx = compiled.asm.get("ptx", "")
        features = [name for name, pattern in PTX_FEATURES.items() if pattern.search(ptx)]
        resources = _resources(printed.getvalue(), compiled.asm.get("cubin"), capability)
        limit = SHARED_MEMORY_LIMIT.get(capability, 227 * 1024)
        status = "ok" if shared <= limit else f"shared memory {shared} > {limit}"
    except Exception as error:  # report every failure, keep going
        message = str(error)
        if "Repro command" in message:  # ptxas: its verdict and stderr, not the PTX
            message = message.split("Repro command")[0]
        status = f"error: {type(error).__name__}: {message.strip()[:1500]}"
    seconds = time.perf_counter() - started
    if task.get("binder", "same") not in ("same", "unavailable", None):
        status = f"error: specialization {task['binder'][:1500]}"
    stack = resources["stack"]
    return _result(
        task,
        status,
        seconds,
        registers=resources["registers"],
        spills=None if stack is None else stack // 4,  # compiled.n_spills: local bytes / 4
        spill_stores=resources["spill_stores"],
        spill_loads=resources["spill_loads"],
        shared=shared,
        ptx=features,
    )


def _worker(connection) -> None:
    os.setpgid(0, 0)  # its own process group: a timeout kills ptxas with it
    while True:
        task = connection.recv()
        if task is None:
            return
        connection.send(compile_task(task))


def _result(task: dict, status: str, seconds: float, **measured: object) -> dict:
    """One result row: the task's description, its status, and what ptxas measured (None
    for a kernel that did not compile)."""
    row = {
        "kernel": task["label"],
        **{key: task[key] for key in ("family", "name", "dtype", "head_dim", "head_dim_v", "case")},
        "capability": task["capability"],
        **{key: task[key] for key in ("config", "specialized", "divisible", "binder")},
        "status": status,
        "registers": None,
        "spills": None,
        "spill_stores": None,
        "spill_loads": None,
        "shared": None,
        "ptx": [],
    }
    row.update(measured)
    row["seconds"] = round(seconds, 2)
    return row


def _failed(task: dict, status: str, seconds: float) -> dict:
    return _result(task, status, seconds)


def run_tasks(tasks: list[dict], jobs: int = 2, timeout: float = 600.0, report=None, deadline=None) -> list[dict]:
    """Compile the tasks in `jobs` worker processes; a task over `timeout` seconds is
    killed (with its ptxas) and reported. Past `deadline` (time.monotonic()), the tasks
    not started are reported as skipped."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    results: list[dict | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))

    def start():
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child,), daemon=True)
        process.start()
        child.close()
        return parent, process

    def stop(process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.join()

    def finish(index: int, result: dict) -> None:
        results[index] = result
        if report:
            report(result)

    idle = [start() for _ in range(max(1, min(jobs, len(tasks))))]
    busy: dict = {}
    deaths = 0
    try:
        while pending or busy:
            while idle and pending:
                index = pending.popleft()
                if deadline is not None and time.monotonic() > deadline:
                    finish(index, _failed(tasks[index], "skipped: time box", 0.0))
                    continue
                connection, process = idle.pop()
                connection.send(tasks[index])
                busy[connection] = (process, index, time.monotonic())
            for connection in wait(list(busy), timeout=1.0):
                process, index, started = busy.pop(connection)
                try:
                    finish(index, connection.recv())
                    idle.append((connection, process))
                except (EOFError, OSError):
                    process.join()
                    seconds = time.monotonic() - started
                    finish(index, _failed(tasks[index], f"error: worker died (exit {process.exitcode})", seconds))
                    deaths += 1
                    if deaths > 3 * max(1, jobs) and deaths == sum(r is not None for r in results):
                        raise RuntimeError("every compile worker died: see its traceback above") from None
                    idle.append(start())
            now = time.monotonic()
            for connection, (process, index, started) in list(busy.items()):
                if now - started > timeout:
                    stop(process)
                    del busy[connection]
                    finish(index, _failed(tasks[index], f"error: timeout after {timeout:.0f} s", now - started))
                    idle.append(start())
    finally:
        for connection, process in idle:
            with contextlib.suppress(OSError):
                connection.send(None)
            process.join(timeout=10)
            if process.is_alive():
                stop(process)
        for process, _, _ in busy.values():
            stop(process)
    return results


# ---- summary -------------------------------------------------------------------------------
def summarize(results: list[dict]) -> dict:
    """Per family and per family x dtype: kernels, failures, kernels with spills, max
    registers / spills / shared memory."""

    def add(groups, key, result):
        group = groups.setdefault(
            key,
            dict(
                kernels=0,
                failures=0,
                skipped=0,
                with_spills=0,
                max_registers=0,
                max_spills=0,
                max_shared=0,
                seconds=0.0,
            ),
        )
        skipped = result["status"].startswith("skipped")
        group["skipped"] += skipped
        group["kernels"] += not skipped
        group["failures"] += result["status"] != "ok" and not skipped
        group["with_spills"] += bool(result["spills"] or result["spill_stores"])
        group["max_registers"] = max(group["max_registers"], result["registers"] or 0)
        group["max_spills"] = max(group["max_spills"], result["spills"] or 0)
        group["max_shared"] = max(group["max_shared"], result["shared"] or 0)
        group["seconds"] = round(group["seconds"] + result["seconds"], 1)

    by_family, by_dtype, total = {}, {}, {}
    for result in results:
        family = result["family"] + ("" if result["specialized"] else " unspecialized")
        add(by_family, family, result)
        add(by_dtype, f"{family} {result['dtype']}", result)
        if result["specialized"] or not any(r["specialized"] for r in results):  # controls stay apart
            add(total, "all", result)
    return dict(total=total.get("all", {}), by_family=by_family, by_family_dtype=by_dtype)


def _print_summary(summary: dict) -> None:
    print(
        f"{'':<36} {'kernels':>7} {'failed':>6} {'skipped':>7} {'spilling':>8} {'max regs':>8} {'max spills':>10} {'max shared':>10}"
    )
    rows = list(summary["by_family_dtype"].items()) + [("all", summary["total"])]
    for key, group in rows:
        if not group:
            continue
        print(
            f"{key:<36} {group['kernels']:>7} {group['failures']:>6} {group['skipped']:>7} {group['with_spills']:>8} "
            f"{group['max_registers']:>8} {group['max_spills']:>10} {group['max_shared']:>10}"
        )


def _sources() -> dict:
    """Which kernel sources were compiled: the git commit and a hash of the kernel modules."""
    import hashlib
    import subprocess

    folder = os.path.dirname(attention_forward.__file__)
    modules = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".py"))
    digest = hashlib.sha256()
    for path in modules:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        head, dirty = "", ""
    return dict(git_head=head or None, kernels_modified=bool(dirty), kernels_sha256=digest.hexdigest())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", choices=sorted(SLICES), default="full", help="preset set of kernels")
    parser.add_argument("--targets", default=None, help="compute capabilities, e.g. 80,90 (preset: 90)")
    parser.add_argument("--dtypes", default=None, help="e.g. bfloat16,float16,float32")
    parser.add_argument("--head-dims", default=None, help="D or D:Dv, comma separated (full: 64,128,72:40,256)")
    parser.add_argument("--cases", default=None, help=f"calls to record, of {','.join(ALL_CASES)}")
    parser.add_argument("--families", default=None, help="forward,forward-tma,backward,decode (default all)")
    parser.add_argument("--tma-only", action="store_true", help="compile only the forward TMA variants")
    parser.add_argument("--only", default=None, help="compile only the kernels whose label matches this regex")
    parser.add_argument("--no-specialize", action="store_true", help="no divisibility hints (the old, unreal kernels)")
    parser.add_argument("--control", action="store_true", help="also compile the unspecialized twin of each task")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per kernel")
    parser.add_argument("--time-box", type=float, default=None, help="stop starting compiles after this many seconds")
    parser.add_argument("--keep-cache", action="store_true", help="use Triton's cache (default: a fresh one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    preset, select = SLICES[args.slice]
    targets = [int(t) for t in (args.targets or preset["targets"]).split(",")]
    dtype_names = (args.dtypes or preset["dtypes"]).split(",")
    head_dims = []
    for dims in (args.head_dims or preset["head_dims"]).split(","):
        head_dim, _, head_dim_v = dims.partition(":")
        head_dims.append((int(head_dim), int(head_dim_v or head_dim)))
    cases = tuple((args.cases or preset["cases"]).split(","))
    families = set(args.families.split(",")) if args.families else None
    if args.tma_only:
        families = {"forward-tma"}
    if not args.keep_cache:  # fresh cache: real compile times, and ptxas runs (its log gives the registers)
        import atexit
        import shutil

        cache = tempfile.mkdtemp(prefix="triton-compile-check-")
        os.environ["TRITON_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)  # a full run leaves ~1 GB

    started = time.monotonic()
    if args.only:
        pattern, preset_select = re.compile(args.only), select

        def select(task: dict) -> bool:
            return bool(pattern.search(task["label"])) and (preset_select is None or preset_select(task))

    tasks = plan(targets, dtype_names, head_dims, cases, families, not args.no_specialize, select)
    # Half precision first: fp32 compiles (FMA dots, up to minutes each) are the ones a time box cuts.
    tasks.sort(key=lambda task: task["dtype"] == "float32")
    if args.control or args.slice == "ci":
        # The unspecialized twin of the first pipelined forward config: what the old check built.
        twins = [t for t in tasks if t["family"] == "forward" and t["config"]["num_stages"] > 1][:1]
        for twin in twins:
            control = plan(
                [twin["capability"]],
                [twin["dtype"]],
                [(twin["head_dim"], twin["head_dim_v"])],
                (twin["case"],),
                {"forward"},
                specialized=False,
                select=lambda t, twin=twin: t["config"] == twin["config"],
            )
            tasks += control
    print(f"triton {triton.__version__}: {len(tasks)} kernels to compile ({args.jobs} jobs)", flush=True)

    def report(result: dict) -> None:
        print(
            f"{' | '.join(result['status'].splitlines())[:100]:<40} {result['kernel']}{'' if result['specialized'] else ' unspecialized'} "
            f"regs={result['registers']} spills={result['spills']} shared={result['shared']} "
            f"{'+'.join(result['ptx'])} ({result['seconds']:.1f}s)",
            flush=True,
        )

    deadline = started + args.time_box if args.time_box else None
    results = run_tasks(tasks, args.jobs, args.timeout, report, deadline)
    wall = time.monotonic() - started
    summary = summarize(results)
    _print_summary(summary)
    failures = summary["total"].get("failures", 0)
    skipped = summary["total"].get("skipped", 0)
    if args.json:
        document = dict(
            triton=triton.__version__,
            torch=torch.__version__,
            target=[f"cuda sm_{capability} (GPUTarget('cuda', {capability}, 32))" for capability in targets],
            ptxas={f"sm_{capability}": ptxas_version(capability) for capability in targets},
            slice=args.slice,
            dtypes=dtype_names,
            head_dims=[f"{d}:{dv}" for d, dv in head_dims],
            cases=list(cases),
            specialization="off"
            if args.no_specialize
            else "as the JIT: ints == 1 constexpr, ints % 16 == 0 and 16-byte aligned pointers tt.divisibility=16",
            date=datetime.date.today().isoformat(),
            sources=_sources(),
            jobs=args.jobs,
            wall_seconds=round(wall, 1),
            summary=summary,
            results=results,
        )
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=1)
    print(f"{len(results) - skipped} kernels compiled, {failures} failed, {skipped} skipped (time box), {wall:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
