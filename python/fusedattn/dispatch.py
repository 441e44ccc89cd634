"""Choosing a backend for a call, and saying why the others were not chosen.

The dispatcher knows backends only through their declared capabilities: it discovers
every module under ``fusedattn.backends`` that defines ``BACKEND``, so adding a backend
is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from . import backends as _backends_package
from . import environment
from .backends.base import Backend, CallProfile
from .semantics import AttentionCall

ENVIRONMENT_VARIABLE = "FUSEDATTN_BACKEND"
AUTO = "auto"


class UnsupportedCallError(ValueError):
    """A forced backend cannot serve this call; the message names the reason."""


_REGISTRY: dict[str, Backend] | None = None
_DECISIONS: dict[tuple, tuple[str, str]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_AVAILABILITY: dict[str, tuple[bool, str]] = {}


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
        _AVAILABILITY.clear()
        _DECISIONS.clear()
    return _REGISTRY


def registry_key() -> tuple[int, ...]:
    """Identity of the registered backends: remembered decisions hold while it is equal
    (tests and extensions may add or replace entries of the registry dict)."""
    if _REGISTRY is None:
        registry()
    return tuple(map(id, _REGISTRY.values()))


def choice_context(cuda: bool) -> tuple:
    """What a remembered backend choice depends on besides the call itself: the settings
    that choose backends (which may change between calls), the current CUDA device for a
    CUDA call (cuda=True; a backend may refuse by the device's limits) and the registered
    backends."""
    cuda_device = torch.cuda.current_device() if cuda else None
    return (environment.backend_choice_key(), cuda_device, registry_key())


def import_errors() -> dict[str, str]:
    registry()
    return dict(_IMPORT_ERRORS)


def availability(backend: Backend) -> tuple[bool, str]:
    """backend.availability(), asked once per process: it may import modules or probe
    devices, which must not happen while torch.compile traces a call."""
    if backend.name not in _AVAILABILITY:
        _AVAILABILITY[backend.name] = backend.availability()
    return _AVAILABILITY[backend.name]


def refusal(backend: Backend, call: AttentionCall | CallProfile) -> str | None:
    """Why backend cannot serve call, or None when it can."""
    profile = call if isinstance(call, CallProfile) else CallProfile.of(call)
    available, reason = availability(backend)
    if not available:
        return f"not available: {reason}"
    capabilities = backend.capabilities
    if profile.device not in capabilities.devices:
        return f"device {profile.device!r} is not supported (supported: {sorted(capabilities.devices)})"
    if profile.dtype not in capabilities.dtypes:
        supported = sorted(str(d).removeprefix("torch.") for d in capabilities.dtypes)
        return f"dtype {str(profile.dtype).removeprefix('torch.')} is not supported (supported: {supported})"
    largest = max(profile.head_dim, profile.head_dim_v)
    if largest > capabilities.max_head_dim:
        return f"head_dim {largest} is over this backend's limit of {capabilities.max_head_dim}"
    missing = sorted(profile.features - capabilities.features)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        return f"feature {names} is not supported" if len(missing) == 1 else f"features {names} are not supported"
    not_differentiated = sorted(profile.differentiated_options - capabilities.differentiable_options)
    if not_differentiated:
        names = ", ".join(not_differentiated)
        return f"no gradient for {names} (it requires grad)"
    return backend.refuse(profile)


def requested_backend(backend: str) -> str:
    """The backend argument, with FUSEDATTN_BACKEND standing in for 'auto'."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or 'auto', got {type(backend).__name__}")
    if backend == AUTO:
        return environment.get(ENVIRONMENT_VARIABLE)
    return backend


def select_backend(call: AttentionCall, backend: str = AUTO) -> Backend:
    """The backend that runs call: the forced one, or the highest-priority eligible one."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name or 'auto', got {type(backend).__name__}")
    profile = CallProfile.of(call)
    arguments = (
        profile.device, profile.dtype, profile.head_dim, profile.head_dim_v,
        tuple(sorted(profile.features)), tuple(sorted(profile.differentiated_options)), bool(call.is_empty), backend,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        name, error = _select_name(*arguments)
    else:
        # Eager calls repeat the same few decisions: remembered with their choice_context.
        key = (*arguments, *choice_context(profile.device == "cuda"))
        decided = _DECISIONS.get(key)
        if decided is None:
            decided = _DECISIONS[key] = _select_name(*arguments)
        name, error = decided
    if error:
        # Raised here, not inside _select_name: an exception there would surface from a
        # torch.compile trace as an internal error instead of this one.
        raise (UnsupportedCallError if name else ValueError)(error)
    return registry()[name]


@torch.compiler.assume_constant_result
def _select_name(
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    features: tuple[str, ...],
    differentiated_options: tuple[str, ...],
    empty: bool,
    backend: str,
) -> tuple[str, str]:
    """(name, "") for the backend that serves the call, or (name or "", error message):
    a forced backend that cannot serve it, or "" for an unknown name."""
    # Plain values in, plain strings out: torch.compile runs this once while tracing and
    # keeps the answer as a constant, instead of tracing through the registry.
    profile = CallProfile(device, dtype, head_dim, head_dim_v, frozenset(features), frozenset(differentiated_options))
    name = requested_backend(backend)
    backends = registry()
    if name != AUTO:
        if name not in backends:
            if name in _IMPORT_ERRORS:
                return name, f"backend: {name!r} failed to import ({_IMPORT_ERRORS[name]})"
            return "", f"backend: expected one of {sorted(backends) + [AUTO]}, got {name!r}"
        reason = refusal(backends[name], profile)
        if reason is not None:
            return name, f"backend {name!r} cannot serve this call: {reason}"
    if empty:
        # No rows or no keys: the answer (zeros, lse -inf) needs no kernel, and the
        # reference gives it on every device.
        return "reference", ""
    if name != AUTO:
        return name, ""
    eligible = [b for b in backends.values() if refusal(b, profile) is None]
    # The reference serves every valid call, so eligible is never empty.
    return max(eligible, key=lambda b: b.capabilities.priority.get(device, 0)).name, ""


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
