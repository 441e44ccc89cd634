"""Choosing a backend for a call, and saying why the others were not chosen.

The dispatcher knows backends only through their declared capabilities: it discovers
every module under ``fusedattn.backends`` that defines ``BACKEND``, so adding a backend
is adding a module.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass

from . import backends as _backends_package
from .backends.base import Backend
from .semantics import AttentionCall

ENVIRONMENT_VARIABLE = "FUSEDATTN_BACKEND"
AUTO = "auto"


class UnsupportedCallError(ValueError):
    """A forced backend cannot serve this call; the message names the reason."""


_REGISTRY: dict[str, Backend] | None = None
_IMPORT_ERRORS: dict[str, str] = {}


def registry() -> dict[str, Backend]:
    """Every backend module's BACKEND, by name. Modules that fail to import are recorded."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Backend] = {}
        for module_info in pkgutil.iter_modules(_backends_package.__path__):
            if module_info.name.startswith("_") or module_info.name == "base":
                continue
            try:
                module = importlib.import_module(f"{_backends_package.__name__}.{module_info.name}")
            except Exception as error:  # a broken optional backend must not break the package
                _IMPORT_ERRORS[module_info.name] = f"{type(error).__name__}: {error}"
                continue
            backend = getattr(module, "BACKEND", None)
            if isinstance(backend, Backend):
                found[backend.name] = backend
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def import_errors() -> dict[str, str]:
    registry()
    return dict(_IMPORT_ERRORS)


def refusal(backend: Backend, call: AttentionCall) -> str | None:
    """Why backend cannot serve call, or None when it can."""
    available, reason = backend.availability()
    if not available:
        return f"not available: {reason}"
    capabilities = backend.capabilities
    device = call.device.type
    if device not in capabilities.devices:
        return f"device {device!r} is not supported (supported: {sorted(capabilities.devices)})"
    if call.dtype not in capabilities.dtypes:
        supported = sorted(str(d).removeprefix("torch.") for d in capabilities.dtypes)
        return f"dtype {str(call.dtype).removeprefix('torch.')} is not supported (supported: {supported})"
    largest = max(call.head_dim, call.head_dim_v)
    if largest > capabilities.max_head_dim:
        return f"head_dim {largest} is over this backend's limit of {capabilities.max_head_dim}"
    missing = sorted(call.features() - capabilities.features)
    if missing:
        return f"feature {', '.join(repr(m) for m in missing)} is not supported"
    return backend.refuse(call)


def requested_backend(backend: str) -> str:
    """The backend argument, with FUSEDATTN_BACKEND standing in for 'auto'."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or 'auto', got {type(backend).__name__}")
    if backend == AUTO:
        return os.environ.get(ENVIRONMENT_VARIABLE, AUTO) or AUTO
    return backend


def _priority(backend: Backend, call: AttentionCall) -> int:
    return backend.capabilities.priority.get(call.device.type, 0)


def select_backend(call: AttentionCall, backend: str = AUTO) -> Backend:
    """The backend that runs call: the forced one, or the highest-priority eligible one."""
    name = requested_backend(backend)
    backends = registry()
    if call.is_empty:
        # No rows or no keys: the answer (zeros, lse -inf) needs no kernel, and the
        # reference gives it on every device.
        return backends["reference"]
    if name != AUTO:
        if name not in backends:
            known = sorted(backends) + [AUTO]
            if name in _IMPORT_ERRORS:
                raise UnsupportedCallError(f"backend: {name!r} failed to import ({_IMPORT_ERRORS[name]})")
            raise ValueError(f"backend: expected one of {known}, got {name!r}")
        reason = refusal(backends[name], call)
        if reason is not None:
            raise UnsupportedCallError(f"backend {name!r} cannot serve this call: {reason}")
        return backends[name]
    eligible = [b for b in backends.values() if refusal(b, call) is None]
    # The reference serves every valid call, so eligible is never empty.
    return max(eligible, key=lambda b: _priority(b, call))


@dataclass(frozen=True)
class Explanation:
    """Which backend would run a call, and why every other one would not."""

    chosen: str | None
    refusals: dict[str, str | None]
    error: str | None = None

    def __str__(self) -> str:
        lines = [f"chosen: {self.chosen}" if self.chosen else f"no backend: {self.error}"]
        for name, reason in self.refusals.items():
            if name == self.chosen:
                continue
            lines.append(f"  {name}: {reason or 'eligible, lower priority'}")
        return "\n".join(lines)


def explain_call(call: AttentionCall, backend: str = AUTO) -> Explanation:
    refusals = {name: refusal(b, call) for name, b in registry().items()}
    for name, error in import_errors().items():
        refusals[name] = f"failed to import: {error}"
    try:
        chosen = select_backend(call, backend).name
    except ValueError as error:
        return Explanation(chosen=None, refusals=refusals, error=str(error))
    if call.is_empty and chosen == "reference":
        refusals = {
            n: (r if n == "reference" else r or "empty problem: served by the reference") for n, r in refusals.items()
        }
    return Explanation(chosen=chosen, refusals=refusals)
