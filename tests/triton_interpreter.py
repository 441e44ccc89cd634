"""Triton's interpreter for a test module on a machine without a GPU.

A test module imports `triton_interpreter` (an autouse module fixture) and DEVICE: the
fixture sets TRITON_INTERPRET=1 while that module's tests run (and only then, so other
test modules never see the triton backend as eligible on CPU). triton.jit reads the
variable when a function is decorated, and triton is often imported (by other test
modules) before the module: the fixture makes triton.language's own jit functions and
fusedattn's kernels interpretable whatever the import order. With a GPU it does nothing.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# In import order: a module reloaded after one that imports from it would leave stale names.
KERNEL_MODULES = ("utils", "configs", "attention_tile", "attention_decode", "attention_forward", "attention_backward")


def _interpret_triton_library() -> list[tuple[object, str, object]]:
    """Make triton.language's own @jit functions (tl.max, tl.sum, ...) interpretable.

    Triton decorates them when it is imported; when another module imported triton
    before TRITON_INTERPRET=1 was set they are compiled-mode functions, which interpreted
    kernels cannot call. Returns what was replaced, to restore afterwards.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    replaced = []
    for name, module in list(sys.modules.items()):
        if name.startswith("triton.language") and module is not None:
            for attribute, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    replaced.append((module, attribute, value))
                    setattr(module, attribute, InterpretedFunction(value.fn))
    return replaced


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """TRITON_INTERPRET=1 while this module's tests run, when there is no GPU."""
    if DEVICE == "cuda":
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    replaced = _interpret_triton_library()
    forward_module = sys.modules.get("fusedattn.kernels.attention_forward")
    if forward_module is not None and type(forward_module.attention_forward_kernel).__name__ != "InterpretedFunction":
        for name in KERNEL_MODULES:  # decorated without the interpreter: decorate again
            if f"fusedattn.kernels.{name}" in sys.modules:
                importlib.reload(sys.modules[f"fusedattn.kernels.{name}"])
    yield
    for module, attribute, value in replaced:
        setattr(module, attribute, value)
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous
