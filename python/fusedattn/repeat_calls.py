"""Repeated plain eager calls skip validation and backend choice.

A model calls attention with the same shapes, dtypes, strides and options at every layer
(and, with a fixed-size cache, at every step). For a dense call with no option tensors
(mask, key lengths, ALiBi slopes, sinks) but an 8-bit cache's scales, and no dropout,
validation's verdict and the backend chosen depend only on those plain values (the
scales' shapes, strides and dtypes among them, not their values), so both are remembered
under them: the next identical call runs the chosen backend's prepared forward
(``Backend.prepare_forward``) directly (the SDPA drop-in's plain calls too, under keys of
their own), without rebuilding the AttentionCall, the
dispatcher's profile or the native argument list (about 30 us of a call that computes a
few). Anything else takes the full path: option tensors, a tensor that requires grad or
is not a plain strided torch.Tensor, a torch.compile or torch.jit.trace trace, a functorch transform, a
dispatch or function mode, the autograd profiler, arguments of a type other than the one
the key can tell apart (``causal=1``), or a backend without a prepared forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._native import native
from .backends.base import Backend
from .dispatch import choice_context
from .ops import plain_eager_context
from .semantics import AttentionCall

# (q, k, v[, k_descale, v_descale]) -> (out, lse)
PreparedForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Enough for every shape of a few models; a decode loop whose key length grows by one
# per step adds a key per step, so the table is emptied when it fills.
LARGEST_TABLE = 256

_PLANS: dict[tuple, PreparedForward] = {}


def dense_key(
    q: object,
    k: object,
    v: object,
    causal: object,
    causal_alignment: object,
    scale: object,
    window: object,
    softcap: object,
    query_start: object,
    key_start: object,
    backend: object,
    entry: str = "attention",
    scales: tuple[object, object] = (None, None),
) -> tuple | None:
    """The key of a plain dense call (its option tensors other than an 8-bit cache's
    scales, (k_descale, v_descale), already None, no dropout), or None when the call must
    take the full path.
    Scalars must have their exact type: the key tells ``True`` from ``1`` only that way
    (equal values, equal hashes). Written flat: it runs before every such call."""
    if (
        not plain_eager_context()  # first: a torch.compile trace stops here
        or type(causal) is not bool
        or type(causal_alignment) is not str
        or type(backend) is not str
        or type(query_start) is not int
        or type(key_start) is not int
        or (scale is not None and type(scale) is not float)
        or (softcap is not None and type(softcap) is not float)
        or (window is not None and not _plain_window(window))
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return None
    # Exactly torch.Tensor (no subclass), strided, requiring no grad: their sizes,
    # strides, dtypes and devices as one tuple of ints, else None.
    tensors = (_plain_tensors_key or _load_plain_tensors_key())(q, k, v, *scales)
    if tensors is None:
        return None
    return (
        tensors,
        causal,
        causal_alignment,
        scale,
        window,
        softcap,
        query_start,
        key_start,
        backend,
        entry,
        *choice_context(q.is_cuda),
    )


def _no_plans(q: object, k: object, v: object, k_descale: object = None, v_descale: object = None) -> None:
    return None


# fusedattn._C.plain_tensors_key (csrc/call_keys.cpp): one C++ call instead of twelve
# attribute reads. Loaded at the first call, not at import; without the native extension
# no call is remembered.
_plain_tensors_key: Callable[..., tuple | None] | None = None


def _load_plain_tensors_key() -> Callable[..., tuple | None]:
    global _plain_tensors_key
    _plain_tensors_key = getattr(native(), "plain_tensors_key", _no_plans)
    return _plain_tensors_key


def _plain_window(window: object) -> bool:
    return type(window) is tuple and all(side is None or type(side) is int for side in window)


def lookup(key: tuple) -> PreparedForward | None:
    return _PLANS.get(key)


def remember(key: tuple, backend: Backend, call: AttentionCall) -> None:
    """Keep backend's prepared forward for call under key (if it has one)."""
    if not call.needs_grad and backend.prepare_forward is not None:
        _store(key, backend.prepare_forward(call))


def remember_alias(key: tuple, planned_key: tuple | None) -> None:
    """Serve key with the plan kept under planned_key (an entry point, such as the SDPA
    drop-in, whose plain calls are attention calls but whose own checks differ: its key
    names it, and it is remembered only once its own full path accepted the call)."""
    if planned_key is not None:
        _store(key, _PLANS.get(planned_key))


def _store(key: tuple, plan: PreparedForward | None) -> None:
    if plan is None:
        return
    if len(_PLANS) >= LARGEST_TABLE:
        _PLANS.clear()
    _PLANS[key] = plan


def forget() -> None:
    """Empty the table (tests; a backend whose behaviour changed in place)."""
    _PLANS.clear()
