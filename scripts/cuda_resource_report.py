#!/usr/bin/env python3
"""Resource report of the compiled CUDA kernels (scripts/cuda_check.sh runs it after the build).

Reads the objects that `make cuda-check` built (build/cuda-check) with cuobjdump:
--dump-resource-usage for registers, stack and local (spill) memory per kernel and
architecture, -sass for instruction counts (HMMA, LDGSTS, LDSM, BAR, LDS, STS, ...). Adds
each configuration's threads and dynamic shared memory per block, which the objects do not
record, from csrc/cuda/emulation/shared_memory_sizes.cpp (compiled with the host compiler).

Asserts, and exits 1 when one fails:
  * no kernel has a stack frame or local memory (no spills), on any architecture;
  * the main loop of every fp16/bf16 forward and backward kernel (MMA_KERNELS) has HMMA,
    LDGSTS (cp.async) and LDSM (ldmatrix);
  * every kernel's shared memory lets two blocks share an sm_90 SM at D <= 128
    (2 x (bytes + 1 KB reserved) <= 228 KB) and every block fits sm_80 (163 KB).
Reports, without asserting it, how many blocks the registers allow (column blk/SM regs).
Writes the report as JSON and markdown (benchmarks/results/cuda-resource-report/).

usage: cuda_resource_report.py BUILD_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED_PER_SM = 228 * 1024
SM80_SHARED_PER_BLOCK = 163 * 1024
RESERVED_PER_BLOCK = 1024  # shared memory the driver reserves per block (sm_80 and later)
REGISTERS_PER_SM = 65536
# Kernels in FlashAttention 2's structure: their main loops must use mma.sync, cp.async, ldmatrix.
MMA_KERNELS = ("attention_forward_mma_kernel", "attention_backward_mma_kernel")
COUNTED = ("HMMA", "LDGSTS", "LDSM", "BAR", "LDS", "STS", "LDG", "STG", "SHFL", "MUFU", "FFMA", "DEPBAR", "RED", "REDG")


def find_tool(name: str) -> str:
    """A CUDA binary tool: on PATH, next to nvcc, or the copy shipped inside Triton's wheel."""
    found = shutil.which(name)
    if found:
        return found
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    candidate = Path(nvcc).parent / name
    if candidate.exists():
        return str(candidate)
    for venv in (".venv", ".venv-triton36"):
        for candidate in (ROOT / venv).glob(f"lib/python*/site-packages/triton/backends/nvidia/bin/{name}"):
            return str(candidate)
    sys.exit(f"cuda resource report: {name} not found (CUDA toolkit, or Triton's bundled copy in .venv)")


def shown(path: Path) -> str:
    """path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool:
        sys.exit("cuda resource report: c++filt not found (binutils): kernels are recognized by their names")
    if not names:
        return {}
    output = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, output.splitlines()))


def resource_usage(cuobjdump: str, obj: Path) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, mangled function) -> REG, STACK, SHARED, LOCAL."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], capture_output=True, text=True, check=True)
    usage, arch, function = {}, None, None
    for line in text.stdout.splitlines():
        if match := re.match(r"\s*arch = (sm_\d+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function (\S+):", line):
            function = match.group(1)
        elif function and "REG:" in line:
            fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
            usage[arch, function] = {key: int(value) for key, value in fields.items()}
            function = None
    return usage


INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def main_loop(instructions: list[tuple[int, str, str]]) -> Counter:
    """Opcodes of the main loop: the backward branch whose span holds the most HMMA (then
    the most instructions). Static counts of one iteration's code, every path included."""
    best, best_key = Counter(), (-1, -1)
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target is None or int(target.group(1), 16) >= address:
            continue
        start = int(target.group(1), 16)
        span = Counter(op for at, op, _ in instructions if start <= at <= address)
        key = (span["HMMA"], sum(span.values()))
        if key > best_key:
            best, best_key = span, key
    return best


def instruction_counts(cuobjdump: str, obj: Path) -> dict[tuple[str, str], tuple[Counter, Counter]]:
    """(arch, mangled function) -> opcode counts (without modifiers) of the whole function
    and of its main loop (main_loop)."""
    text = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True)
    listings, arch, function = {}, None, None
    for line in text.stdout.splitlines():
        if match := re.match(r"\s*arch = (sm_\d+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function : (\S+)", line):
            function = match.group(1)
            listings[arch, function] = []
        elif function and (match := INSTRUCTION.match(line)):
            listings[arch, function].append((int(match.group(1), 16), match.group(2), match.group(3)))
    return {
        key: (Counter(op for _, op, _ in instructions), main_loop(instructions))
        for key, instructions in listings.items()
    }


def shared_memory_sizes() -> dict[tuple[str, str, int], dict[str, int]]:
    """(kernel, element, head dim) -> threads, shared_bytes, from shared_memory_sizes.cpp."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    source = ROOT / "csrc" / "cuda" / "emulation" / "shared_memory_sizes.cpp"
    with tempfile.TemporaryDirectory() as directory:
        binary = Path(directory) / "sizes"
        subprocess.run([compiler, "-std=c++17", "-w", f"-I{source.parent}", str(source), "-o", str(binary)], check=True)
        rows = json.loads(subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout)
    return {(row["kernel"], row["element"], row["head_dim"]): row for row in rows}


def parse_kernel(demangled: str) -> tuple[str, str, int] | None:
    """('attention_forward_mma_kernel', '__half', 128) from the demangled name, None for others."""
    match = re.search(r"fusedattn::cuda::(\w+)<([\w:]+)(?:, (\d+))?>", demangled)
    if not match:
        return None
    return match.group(1), match.group(2), int(match.group(3) or 0)


def main() -> int:
    build_dir, output_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cuobjdump = find_tool("cuobjdump")
    objects = sorted(build_dir.glob("CMakeFiles/fusedattn_cuda_kernels.dir/*.cu.o"))
    if not objects:
        sys.exit(f"cuda resource report: no objects under {build_dir} (run scripts/cuda_check.sh first)")
    usage, counts = {}, {}
    for obj in objects:
        usage.update(resource_usage(cuobjdump, obj))
        counts.update(instruction_counts(cuobjdump, obj))
    names = demangle(sorted({function for _arch, function in usage}))
    sizes = shared_memory_sizes()
    kernels, failures = [], []
    for (arch, function), resources in sorted(usage.items(), key=lambda item: (item[0][0], names[item[0][1]])):
        demangled = names[function]
        key = parse_kernel(demangled)
        opcodes, loop = counts.get((arch, function), (Counter(), Counter()))
        size = sizes.get(key) if key else None
        threads = size["threads"] if size else 128
        # Dynamic (the launchers' request) plus static shared memory; sm_90 cubins list the
        # 1 KB the driver reserves per block as static, sm_80 cubins do not.
        static_shared = resources.get("SHARED", 0)
        shared = (size["shared_bytes"] if size else 0) + static_shared
        registers = resources.get("REG", 0)
        warps = (threads + 31) // 32
        # Registers are allocated per warp in units of 256 (8 per thread).
        per_block_registers = warps * 32 * ((registers + 7) // 8 * 8)
        blocks_by_registers = REGISTERS_PER_SM // per_block_registers if per_block_registers else 0
        blocks_by_shared = SM90_SHARED_PER_SM // (shared - static_shared + max(static_shared, RESERVED_PER_BLOCK))
        entry = {
            "arch": arch,
            "kernel": demangled,
            "registers": registers,
            "stack_bytes": resources.get("STACK", 0),
            "local_bytes": resources.get("LOCAL", 0),
            "threads": threads,
            "shared_bytes": shared,
            "blocks_per_sm90_sm_by_shared": blocks_by_shared,
            "blocks_per_sm_by_registers": blocks_by_registers,
            "instructions": {op: opcodes.get(op, 0) for op in COUNTED},
            "instructions_total": sum(opcodes.values()),
            "main_loop": {op: loop.get(op, 0) for op in COUNTED},
            "main_loop_total": sum(loop.values()),
        }
        kernels.append(entry)
        label = f"{arch} {demangled}"
        if entry["stack_bytes"] or entry["local_bytes"]:
            failures.append(f"{label}: spills ({entry['stack_bytes']} bytes stack, {entry['local_bytes']} local)")
        if key and key[0] in MMA_KERNELS:
            for op in ("HMMA", "LDGSTS", "LDSM"):
                if not loop.get(op):
                    failures.append(f"{label}: no {op} instruction in the main loop")
        if key and key[2] <= 128 and blocks_by_shared < 2:
            failures.append(f"{label}: {shared} bytes of shared memory: fewer than 2 blocks per sm_90 SM")
        if shared > SM80_SHARED_PER_BLOCK:
            failures.append(f"{label}: {shared} bytes of shared memory do not fit sm_80 ({SM80_SHARED_PER_BLOCK})")
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "nvcc"
    try:
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()[-2]
    except (OSError, IndexError):
        nvcc_version = "nvcc version unknown"
    for name in MMA_KERNELS:
        if not any(f"::{name}<" in entry["kernel"] for entry in kernels):
            failures.append(f"no {name} found in the objects")
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "nvcc": nvcc_version,
        "cuobjdump": shown(Path(cuobjdump)),
        "kernels": kernels,
        "failures": failures,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# CUDA kernel resources (scripts/cuda_resource_report.py)",
        "",
        "Written by `FUSEDATTN_CUDA_REPORT_DIR=benchmarks/results/cuda-resource-report make cuda-check`",
        f"(objects of {build_dir.name}, {nvcc_version}; {Path(cuobjdump).name} from {shown(Path(cuobjdump).parent)}).",
        "",
        "Static SASS instruction counts per kernel (whole function, not per loop iteration). shared B:",
        "dynamic + static shared memory per block; blk/SM: blocks one SM holds by shared memory",
        "(sm_90: 228 KB, 1 KB reserved per block) and by registers (65536).",
        "",
        "| arch | kernel | regs | stack | local | threads | shared B | blk/SM smem (sm_90) | blk/SM regs | "
        + " | ".join(COUNTED)
        + " |",
        "|" + "---|" * (9 + len(COUNTED)),
    ]
    for entry in kernels:
        name = entry["kernel"].replace("fusedattn::cuda::", "").replace("(fusedattn::cuda::AttentionParams)", "")
        name = name.replace("(fusedattn::cuda::AttentionBackwardParams)", "")
        lines.append(
            f"| {entry['arch']} | `{name}` | {entry['registers']} | {entry['stack_bytes']} | {entry['local_bytes']} "
            f"| {entry['threads']} | {entry['shared_bytes']} | {entry['blocks_per_sm90_sm_by_shared']} "
            f"| {entry['blocks_per_sm_by_registers']} | "
            + " | ".join(str(entry["instructions"][op]) for op in COUNTED)
            + " |"
        )
    lines += [
        "",
        "Main loop (the backward branch spanning the most HMMA; static counts of one iteration's",
        f"code, both paths of a branch included) of {', '.join(MMA_KERNELS)}:",
        "",
        "| arch | kernel | instructions | " + " | ".join(COUNTED) + " |",
        "|" + "---|" * (3 + len(COUNTED)),
    ]
    for entry in kernels:
        if any(f"::{name}<" in entry["kernel"] for name in MMA_KERNELS):
            name = entry["kernel"].replace("fusedattn::cuda::", "").replace("(fusedattn::cuda::AttentionParams)", "")
            name = name.replace("(fusedattn::cuda::AttentionBackwardParams)", "")
            lines.append(
                f"| {entry['arch']} | `{name}` | {entry['main_loop_total']} | "
                + " | ".join(str(entry["main_loop"][op]) for op in COUNTED)
                + " |"
            )
    register_bound = sorted(
        {
            f"{entry['arch']} `{entry['kernel'].split('(')[0].replace('void fusedattn::cuda::', '')}` "
            f"({entry['registers']} registers x {entry['threads']} threads)"
            for entry in kernels
            if (key := parse_kernel(entry["kernel"])) and 0 < key[2] <= 128 and entry["blocks_per_sm_by_registers"] < 2
        }
    )
    lines += [
        "",
        "Kernels at D <= 128 whose registers allow fewer than 2 blocks per SM (not asserted; "
        "blk/SM regs above): " + (", ".join(register_bound) if register_bound else "none"),
    ]
    lines += ["", "Failures: " + ("none" if not failures else ""), *(f"- {failure}" for failure in failures)]
    lines += [""]
    (output_dir / "report.md").write_text("\n".join(lines))
    for failure in failures:
        print(f"cuda resource report: FAIL {failure}", file=sys.stderr)
    print(f"cuda resource report: {len(kernels)} kernels, {len(failures)} failures -> {output_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
