"""Compiled runs: torch.compile(fullgraph=True, backend="aot_eager", dynamic=False).

Compiling costs about a second, so wrappers are kept and reused: one per (entry point,
function, backend, non-tensor arguments). Tensors are the wrapper's inputs; a new shape,
dtype or stride recompiles inside the same wrapper (dynamic=False), up to RECOMPILE_LIMIT
graphs; past MAX_WRAPPERS wrappers every cache is dropped (torch._dynamo.reset()).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .case import Case

MAX_WRAPPERS = 48
RECOMPILE_LIMIT = 64
_WRAPPERS: dict[str, Callable[..., Any]] = {}
_STATS = {"compiled_wrappers": 0, "resets": 0}


class _Slot:
    """Where a tensor sits in the flattened arguments."""

    def __repr__(self) -> str:
        return "<tensor>"


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot()
    if isinstance(value, tuple):
        return tuple(_flatten(v, tensors) for v in value)
    if isinstance(value, list):
        return [_flatten(v, tensors) for v in value]
    if isinstance(value, dict):
        return {k: _flatten(v, tensors) for k, v in value.items()}
    return value


def _fill(template: Any, tensors: list[Any]) -> Any:
    if isinstance(template, _Slot):
        return tensors.pop(0)
    if isinstance(template, tuple):
        return tuple(_fill(v, tensors) for v in template)
    if isinstance(template, list):
        return [_fill(v, tensors) for v in template]
    if isinstance(template, dict):
        return {k: _fill(v, tensors) for k, v in template.items()}
    return template


def call_compiled(case: Case) -> Any:
    """case.function(*case.args, **case.kwargs) through a (cached) compiled wrapper."""
    tensors: list[torch.Tensor] = []
    template = _flatten((case.args, case.kwargs), tensors)
    key = f"{case.entry}|{id(case.function)}|{case.backend}|{template!r}"
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        if len(_WRAPPERS) >= MAX_WRAPPERS:
            reset()
        function = case.function

        def call(*inputs: torch.Tensor) -> Any:
            args, kwargs = _fill(template, list(inputs))
            return function(*args, **kwargs)

        wrapper = torch.compile(call, fullgraph=True, backend="aot_eager", dynamic=False)
        _WRAPPERS[key] = wrapper
        _STATS["compiled_wrappers"] += 1
    return wrapper(*tensors)


def reset() -> None:
    _WRAPPERS.clear()
    torch._dynamo.reset()
    _STATS["resets"] += 1


def configure() -> None:
    # Faulty calls fail inside fake-tensor propagation; torch logs each at ERROR level.
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_recompile_limit = 100_000


def stats() -> dict[str, int]:
    return dict(_STATS)
