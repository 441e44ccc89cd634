"""Loading the compiled extension fusedattn._C, and why it may be missing."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # noqa: F401  (the extension links against libtorch, loaded by this import)

_MODULE: ModuleType | None = None
_ERROR: str | None = None
_LOADED = False


def native() -> ModuleType | None:
    """The fusedattn._C module, or None when it was not built or fails to load."""
    global _MODULE, _ERROR, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            _MODULE = importlib.import_module("fusedattn._C")
        except ImportError as error:
            _ERROR = f"fusedattn._C did not load ({error}); rebuild with `pip install --no-build-isolation -e .`"
    return _MODULE


def native_error() -> str | None:
    native()
    return _ERROR


def build_info() -> dict[str, object]:
    """The compiled build facts (compiler, C++ standard, SIMD, OpenMP, CUDA), or {}."""
    module = native()
    return dict(module.build_info()) if module is not None else {}
