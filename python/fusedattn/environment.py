"""Every environment variable fusedattn reads, in one table, read only through here.

Values are read when a call needs them (a dict lookup), so a process may change them
between calls, as the tests do; a value outside a setting's choices raises a ValueError
naming the variable instead of being ignored. The README's "Environment variables"
table lists the same settings (a test keeps the two equal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    choices: tuple[str, ...] | None  # None: free text
    reader: str  # who reads it: "python", "C++ extension", "build", "Triton"
    description: str
    chooses_backend: bool = False  # backend selection (or a backend's refusal) depends on it


SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting("FUSEDATTN_BACKEND", "auto", None, "python",
                "forces a backend by name for calls whose backend argument is 'auto'", chooses_backend=True),
        Setting("FUSEDATTN_DETERMINISTIC", "0", ("0", "1"), "python",
                "1: bitwise-reproducible Triton backward (dQ in its own kernel, no atomics); "
                "torch.use_deterministic_algorithms(True) does the same"),
        Setting("FUSEDATTN_TRITON_DECODE", "auto", ("auto", "always", "never"), "python",
                "the Triton split-KV decode kernel: automatic, forced, or off"),
        Setting("FUSEDATTN_TRITON_TMA", "auto", ("auto", "0", "1"), "python",
                "Hopper tensor descriptors for K/V: automatic, off, or also under the interpreter"),
        Setting("FUSEDATTN_TRITON_WRAP", "1", ("0", "1"), "python",
                "0: launch Triton kernels directly instead of through torch.library.wrap_triton "
                "(outside torch.compile traces)"),
        Setting("FUSEDATTN_CPU_ISA", "", None, "C++ extension",
                "generic|avx2|avx512|avx512bf16: the CPU kernels' instruction set (default: the best this CPU runs)"),
        Setting("FUSEDATTN_CPU_BYTE_TABLES", "1", ("0", "1"), "C++ extension",
                "0: the avx512bf16 8-bit decode converts without its vpermi2b byte tables (tests reach both paths)"),
        Setting("FUSEDATTN_CMAKE_ARGS", "", None, "build",
                "extra CMake arguments for pip install, e.g. -DFUSEDATTN_CUDA=OFF"),
        Setting("TRITON_INTERPRET", "0", None, "Triton",
                "Triton's own switch: 1 runs kernels on CPU tensors through its interpreter (the tests)",
                chooses_backend=True),
    )
}  # fmt: skip


def get(name: str) -> str:
    """The value of a setting: the environment's, or its default when unset or empty."""
    setting = SETTINGS[name]
    value = os.environ.get(name, "") or setting.default
    if setting.choices is not None and value not in setting.choices:
        raise ValueError(f"{name}: expected one of {', '.join(setting.choices)}, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return get("TRITON_INTERPRET") not in ("", "0")


_CHOOSING = tuple(name for name, setting in SETTINGS.items() if setting.chooses_backend)


# os.environ's own table (bytes on POSIX): a lookup there costs a tenth of os.environ.get,
# which encodes the name and decodes the value on every call.
_RAW_ENVIRONMENT = getattr(os.environ, "_data", None) if os.name == "posix" else None
_CHOOSING_RAW = tuple(os.fsencode(name) for name in _CHOOSING)


def backend_choice_key() -> tuple[str | bytes | None, ...]:
    """The raw values of the settings backend selection depends on (chooses_backend):
    equal keys, equal settings (asked before every call, so it must be cheap)."""
    if isinstance(_RAW_ENVIRONMENT, dict):
        return tuple(map(_RAW_ENVIRONMENT.get, _CHOOSING_RAW))
    return tuple(os.environ.get(name, "") for name in _CHOOSING)
