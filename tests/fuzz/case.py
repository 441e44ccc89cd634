"""What a strategy draws: one call of one entry point, with at most one deliberate fault.

A valid case (``target is None``) must give a result that matches its oracle. A faulty
case breaks exactly one rule of one argument (``target``, the name the refusal must
use); everything else about it is valid, so the refusal can only be about that argument.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .tensors import describe

Check = Callable[[Any], "str | None"]
"""(result) -> None when it matches the oracle, else the reason it does not."""


@dataclass
class Case:
    """One call of one entry point and everything needed to judge its outcome."""

    entry: str
    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    check: Check
    backend: str = "auto"
    # Entry points without a backend argument (compat, nn, sdpa) get it from FUSEDATTN_BACKEND.
    backend_by_environment: bool = False
    features: frozenset[str] = frozenset()
    target: str | None = None
    fault: str | None = None
    # Other names a refusal may use for an argument (sdpa's query is q inside fusedattn).
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Drop-ins: run the same call through torch; returns torch's exception, or None.
    torch_oracle: Callable[[], BaseException | None] | None = None
    # After a refusal: None, or why the refusal was not clean (a cache written, say).
    after_refusal: Callable[[], str | None] | None = None
    compilable: bool = True
    # Under torch.compile the call is refused whatever its arguments (compat's paged varlen:
    # keys are packed by tensor values): (argument, why). Replaces target and fault there.
    compiled_refusal: tuple[str, str] | None = None
    # Under torch.compile a faulty *value* of integer metadata cannot be read while tracing:
    # the call returns instead of refusing. (result) -> None when that result is the one the
    # spec gives (all NaN, caches untouched), else why not. None: a result is wrong.
    compiled_fault_check: Check | None = None
    # nn.MultiheadAttention: refuse exactly what torch refuses, with the same exception class
    # (the message may differ); accept exactly what torch accepts.
    same_class_as_torch: bool = False

    @property
    def names(self) -> frozenset[str]:
        """The names a refusal of this case may give for the faulty argument."""
        if self.target is None:
            return frozenset()
        return frozenset((self.target, *self.aliases.get(self.target, ())))

    def feature_key(self) -> str:
        return "+".join(sorted(self.features)) or "plain"

    def describe(self) -> str:
        parts = [describe(a) for a in self.args]
        parts += [f"{name}={describe(value)}" for name, value in self.kwargs.items()]
        backend = f" [FUSEDATTN_BACKEND={self.backend}]" if self.backend_by_environment else ""
        fault = f"  # fault: {self.target}: {self.fault}" if self.target else ""
        return f"{self.entry}({', '.join(parts)}){backend}{fault}"

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """FUSEDATTN_BACKEND set for entry points that take no backend argument."""
        if not self.backend_by_environment:
            yield
            return
        previous = os.environ.get("FUSEDATTN_BACKEND")
        os.environ["FUSEDATTN_BACKEND"] = self.backend
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("FUSEDATTN_BACKEND", None)
            else:
                os.environ["FUSEDATTN_BACKEND"] = previous


def clone_arguments(value: Any) -> Any:
    """A deep copy of tensors (with their strides) inside args/kwargs, for calls that write
    into their inputs (KV caches) and must be replayed on the same values."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or 0 in value.stride():
            return value  # nothing to copy, or an expanded view that cannot be written
        copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return copy.copy_(value) if value.numel() else copy
    if isinstance(value, tuple):
        return tuple(clone_arguments(v) for v in value)
    if isinstance(value, list):
        return [clone_arguments(v) for v in value]
    if isinstance(value, dict):
        return {k: clone_arguments(v) for k, v in value.items()}
    return value


def flags(**named: bool) -> set[str]:
    """The names whose value is true: flags(paged=True, empty=False) == {"paged"}."""
    return {name for name, on in named.items() if on}
