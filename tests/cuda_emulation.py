"""The CPU emulation of csrc/cuda (csrc/cuda/emulation), built on demand for the CUDA tests.

build() compiles csrc/cuda/emulation/emulated_ops.cpp with torch.utils.cpp_extension (once;
cached under build/cuda-emulation) and returns torch.ops.fusedattn_cuda_emulation; the test
files register it as a test backend "cuda_emulated" (tests/test_cuda_backend.py) or call its
operators directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EMULATION_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulation" / "emulated_ops.cpp"


def build() -> object:
    """torch.ops.fusedattn_cuda_emulation, built and loaded (skips the test without a compiler)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    from torch.utils import cpp_extension

    build_dir = EMULATION_SOURCE.parents[3] / "build" / "cuda-emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="fusedattn_cuda_emulation",
        sources=[str(EMULATION_SOURCE)],
        extra_cflags=["-std=c++17", "-O1", "-Wno-unknown-pragmas"],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    return torch.ops.fusedattn_cuda_emulation


@contextlib.contextmanager
def registered_backend() -> Iterator[str]:
    """The emulation registered as the test backend "cuda_emulated" (the cuda backend's
    capabilities, on CPU tensors) for the duration of the block; yields its name."""
    from fusedattn import dispatch
    from fusedattn.backends import cuda as cuda_backend
    from fusedattn.backends.base import Backend

    operators = build()
    backend = Backend(
        name="cuda_emulated",
        description="csrc/cuda kernels run by the CPU emulation (tests only)",
        capabilities=dataclasses.replace(cuda_backend.BACKEND.capabilities, devices=frozenset({"cpu"})),
        forward=functools.partial(cuda_backend.forward, operators=operators),
        backward=functools.partial(cuda_backend.backward, operators=operators),
    )
    registry = dispatch.registry()
    registry[backend.name] = backend
    try:
        yield backend.name
    finally:
        registry.pop(backend.name, None)
