"""What a backend is: a name, declared capabilities, and forward/backward functions.

A backend module in this package defines one module-level ``BACKEND`` object of type
:class:`Backend`. The dispatcher discovers it by scanning the package, compares the
declared :class:`Capabilities` with the call, and knows nothing else about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..outputs import allocate_output, poisoned_outputs
from ..semantics import DIFFERENTIABLE_OPTIONS, FEATURES, AttentionCall

# Backends allocate every output through allocate_output (fusedattn.outputs, where the
# Triton kernels import it from); re-exported here for the backends and the tests.
__all__ = ["Backend", "Capabilities", "CallProfile", "allocate_output", "poisoned_outputs"]


@dataclass(frozen=True)
class CallProfile:
    """What the dispatcher decides on: a call reduced to plain values (no tensors), so
    that the decision is a constant while torch.compile traces."""

    device: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    features: frozenset[str]
    differentiated_options: frozenset[str] = frozenset()

    @classmethod
    def of(cls, call: AttentionCall) -> CallProfile:
        return cls(
            call.device.type,
            call.dtype,
            int(call.head_dim),
            int(call.head_dim_v),
            call.features(),
            call.differentiated_options(),
        )


ForwardFn = Callable[[AttentionCall], tuple[torch.Tensor, torch.Tensor]]
"""(call) -> (out, lse): out (*q.shape[:-1], Dv) in q's dtype, lse float32 (see AttentionCall)."""

BackwardFn = Callable[..., tuple[torch.Tensor, ...]]
"""(call, grad_out, out, lse) -> (dq, dk, dv), shaped like q, k, v.

A backend that lists differentiable_options is also called with the keyword
option_gradients=(names...) (a subset of its list, in semantics.DIFFERENTIABLE_OPTIONS
order) and then returns (dq, dk, dv, *one gradient per name, shaped like that option)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve. Anything not listed is refused with a reason."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    features: frozenset[str]
    max_head_dim: int = 256
    # Option tensors (of semantics.DIFFERENTIABLE_OPTIONS) whose gradient the backward returns.
    differentiable_options: frozenset[str] = frozenset()
    # Speed rank per device type for backend="auto": higher wins among eligible backends.
    priority: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}; known: {FEATURES}")
        unknown = set(self.differentiable_options) - set(DIFFERENTIABLE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown differentiable options {sorted(unknown)}; known: {DIFFERENTIABLE_OPTIONS}")


@dataclass(frozen=True)
class Backend:
    """One attention implementation.

    availability() says whether it can run in this process at all (extension built,
    triton importable, a GPU present) and why not; it is asked once per process.
    refuse(profile) may add reasons the capability table cannot express (for example
    a limit that depends on the device); it returns None to accept.

    triton_op=True defines the backend's ops with torch.library.triton_op, so
    torch.compile traces into their Triton kernels instead of treating them as opaque.
    Such a backend's forward/backward must be traceable with fake tensors: they only
    call torch operators and kernels launched through torch.library.wrap_triton, and
    receive call.dropout_seed as the op's 0-d int64 tensor (never read on the host).
    prepare_forward, when given, serves repeated plain eager calls (fusedattn.repeat_calls):
    it returns a function of (q, k, v, k_descale=None, v_descale=None) alone for calls
    that differ from call only in those tensors' values (the scales as the caller passed
    them, an 8-bit cache's), or None where it cannot.
    reads_metadata_on_host=True says the backend reads cu_seqlens / key_lengths values on
    the host anyway (it synchronizes): the op layer then checks unverified values there and
    raises, instead of flagging them on the device (validation.metadata_guard).
    """

    name: str
    capabilities: Capabilities
    forward: ForwardFn
    backward: BackwardFn | None
    availability: Callable[[], tuple[bool, str]] = lambda: (True, "")
    refuse: Callable[[CallProfile], str | None] = lambda profile: None
    description: str = ""
    triton_op: bool = False
    reads_metadata_on_host: bool = False
    # prepare_forward(call) -> run(q, k, v, k_descale=None, v_descale=None) -> (out, lse):
    # the forward of calls equal to call in everything but those tensors' values
    # (fusedattn.repeat_calls), holding no tensor.
    # None: repeated calls take the full path.
    prepare_forward: Callable[[AttentionCall], Callable[..., tuple[torch.Tensor, torch.Tensor]] | None] | None = None
