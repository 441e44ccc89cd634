"""torch.library custom ops and autograd, generated once for every backend.

Each backend NAME gets two ops, ``fusedattn::NAME_forward`` and ``fusedattn::NAME_backward``,
with one shared schema, a fake (meta) implementation for torch.compile, and autograd
that routes the forward's gradient to the backend's backward op. Backends only write
plain forward/backward functions on an AttentionCall; this module turns the op's flat
arguments back into that call.

A backend that sets ``triton_op=True`` gets its two ops from ``torch.library.triton_op``
instead (same names, arguments, fake implementations and autograd): torch.compile then
traces into their bodies and sees the Triton kernels they launch through
``torch.library.wrap_triton``. (Its schema spells the int options SymInt, as triton_op
infers it from Python annotations.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import semantics
from .backends.base import Backend
from .semantics import DIFFERENTIABLE_OPTIONS, AttentionCall, lse_dtype
from .validation import metadata_guard, poison_if_invalid

_UNBOUNDED = -1  # window side encoding in the op schema: -1 = unbounded


def _seed_tensor(seed: int | torch.Tensor | None) -> torch.Tensor | None:
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64)


@dataclass(frozen=True)
class OpOption:
    """One option of the op schema: its name and type there, how it is encoded from the
    AttentionCall field it carries, and decoded back into it."""

    name: str
    schema_type: str
    field: str
    encode: Callable[[Any], Any] = lambda value: value  # noqa: E731  (the identity by default)
    decode: Callable[[Any], Any] = lambda value: value  # noqa: E731


def _encode_side(side: int | None) -> int:
    return _UNBOUNDED if side is None else side


def _decode_side(side: int) -> int | None:
    return None if side == _UNBOUNDED else side


# The one table of options after q, k, v: the op schema, op_arguments, the call rebuilt
# from the op's arguments, the fake implementation and the backends' native argument
# lists (option_values, by name) all derive from it.
OPTIONS: tuple[OpOption, ...] = (
    OpOption("attn_mask", "Tensor?", "attn_mask"),
    OpOption("key_lengths", "Tensor?", "key_lengths"),
    OpOption("cu_seqlens_q", "Tensor?", "cu_seqlens_q"),
    OpOption("cu_seqlens_k", "Tensor?", "cu_seqlens_k"),
    OpOption("alibi_slopes", "Tensor?", "alibi_slopes"),
    OpOption("sinks", "Tensor?", "sinks"),
    OpOption("block_table", "Tensor?", "block_table"),
    OpOption("cache_lengths", "Tensor?", "cache_lengths"),
    OpOption("max_seqlen_q", "SymInt", "max_seqlen_q"),
    OpOption("max_seqlen_k", "SymInt", "max_seqlen_k"),
    OpOption("scale", "float", "scale"),
    OpOption("causal", "bool", "causal"),
    OpOption("bottom_right", "bool", "causal_alignment", lambda alignment: alignment == "bottom_right",
             lambda bottom_right: "bottom_right" if bottom_right else "top_left"),
    OpOption("window_left", "int", "window_left", _encode_side, _decode_side),
    OpOption("window_right", "int", "window_right", _encode_side, _decode_side),
    OpOption("query_start", "int", "query_start"),
    OpOption("key_start", "int", "key_start"),
    OpOption("k_descale", "Tensor?", "k_descale"),
    OpOption("v_descale", "Tensor?", "v_descale"),
    OpOption("softcap", "float", "softcap", lambda cap: 0.0 if cap is None else cap,
             lambda cap: None if cap == 0.0 else cap),
    OpOption("dropout_p", "float", "dropout_p"),
    OpOption("dropout_seed", "Tensor?", "dropout_seed", lambda seed: _seed_tensor(seed)),
    OpOption("metadata_checked", "bool", "metadata_checked"),
)  # fmt: skip
_OPTION_PARAMETERS: tuple[tuple[str, str], ...] = tuple((option.name, option.schema_type) for option in OPTIONS)
_OPTION_POSITIONS = {option.name: position for position, option in enumerate(OPTIONS)}
# The backward op returns one gradient per differentiable option after dq, dk, dv (an
# empty tensor where none was asked for); its last arguments, one bool per differentiable
# option (NAME_gradient), say which are asked for.
_DIFFERENTIABLE_POSITIONS = tuple(_OPTION_POSITIONS[name] for name in DIFFERENTIABLE_OPTIONS)
_WANTED_PARAMETERS = tuple((f"{name}_gradient", "bool") for name in DIFFERENTIABLE_OPTIONS)


def option_values(call: AttentionCall) -> dict[str, Any]:
    """The op's option values by name (what a backend passes to its native op)."""
    return {option.name: option.encode(getattr(call, option.field)) for option in OPTIONS}


# The option arguments of every native operator (cpu_forward / cpu_backward,
# cuda_attention_forward / cuda_attention_backward), in their schemas' one order
# (csrc/native_options.h): the table's options, with dropout as the integers the kernels
# hash with instead of dropout_p / dropout_seed. tests/test_ops.py checks the schemas.
NATIVE_OPTIONS: tuple[str, ...] = (
    *(option.name for option in OPTIONS if option.name not in ("dropout_p", "dropout_seed", "metadata_checked")),
    "dropout_threshold",
    "dropout_keep_scale",
    "dropout_seed_key",
)


def native_option_values(call: AttentionCall) -> tuple[Any, ...]:
    """The values of NATIVE_OPTIONS for call (ALiBi slopes and sinks contiguous float32)."""
    values = option_values(call)
    for name in ("alibi_slopes", "sinks"):
        if values[name] is not None:
            values[name] = values[name].to(torch.float32).contiguous()
    dropout = call.dropout_p > 0.0
    values["dropout_threshold"] = semantics.dropout_threshold(call.dropout_p) if dropout else 0
    values["dropout_keep_scale"] = semantics.dropout_keep_scale(call.dropout_p) if dropout else 1.0
    values["dropout_seed_key"] = semantics.dropout_seed_key(int(call.dropout_seed)) if dropout else 0
    return tuple(values[name] for name in NATIVE_OPTIONS)


def op_arguments(call: AttentionCall) -> tuple[Any, ...]:
    """The flat argument tuple of a forward op (and the tail of a backward op)."""
    return (call.q, call.k, call.v, *option_values(call).values())


def _call_from_arguments(arguments: tuple[Any, ...], read_seed: bool = True) -> AttentionCall:
    """The AttentionCall of a forward op's arguments. read_seed=False keeps the seed as the
    op's 0-d tensor (triton_op backends: a traced body cannot read tensor values)."""
    q, k, v, *values = arguments
    fields = {option.field: option.decode(value) for option, value in zip(OPTIONS, values, strict=True)}
    if read_seed and fields["dropout_seed"] is not None:
        fields["dropout_seed"] = int(fields["dropout_seed"].item())
    return AttentionCall(q=q, k=k, v=v, **fields)


def _fake_outputs(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    out = call.q.new_empty(call.out_shape)
    lse = call.q.new_empty(call.lse_shape, dtype=lse_dtype(call.dtype))
    return out, lse


_OPS: dict[str, tuple[Any, Any]] = {}


_FORWARD_TENSORS = ("q", "k", "v")
_BACKWARD_TENSORS = ("grad_out", "out", "lse", "q", "k", "v")
_BACKWARD_RETURNS = 3 + len(DIFFERENTIABLE_OPTIONS)


def _no_gradient(like: torch.Tensor) -> torch.Tensor:
    """The backward op's output for an option whose gradient was not asked for: an empty
    tensor made from no graph input (one made from grad_out, say, would tie a constant to
    the backward inputs, which AOT autograd's partitioner cannot place)."""
    return torch.empty(0, dtype=like.dtype, device=like.device)


def _wanted_options(flags: tuple[bool, ...]) -> tuple[str, ...]:
    """The differentiable options whose gradient the backward op is asked for."""
    return tuple(name for name, wanted in zip(DIFFERENTIABLE_OPTIONS, flags, strict=True) if wanted)


def backward_arguments(call: AttentionCall, option_gradients: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """The tail of a backward op's arguments after (grad_out, out, lse): the forward's
    arguments, then one flag per differentiable option."""
    return (*op_arguments(call), *(name in option_gradients for name in DIFFERENTIABLE_OPTIONS))


# Python annotations of the schema types: triton_op infers its schema from them.
_ANNOTATIONS = {
    "Tensor": torch.Tensor,
    "Tensor?": torch.Tensor | None,
    "SymInt": int,
    "int": int,
    "float": float,
    "bool": bool,
}


def _parameters(tensor_names: tuple[str, ...], backward: bool) -> list[tuple[str, str]]:
    return [(name, "Tensor") for name in tensor_names] + list(_OPTION_PARAMETERS) + list(_WANTED_PARAMETERS * backward)


def _schema(tensor_names: tuple[str, ...], returns: int, backward: bool = False) -> str:
    parameters = [f"{kind} {name}" for name, kind in _parameters(tensor_names, backward)]
    return f"({', '.join(parameters)}) -> ({', '.join(['Tensor'] * returns)})"


def _with_signature(function: Any, tensor_names: tuple[str, ...], returns: int, backward: bool = False) -> Any:
    """Give a (*arguments) function the op's typed signature, for triton_op's schema inference."""
    parameters = _parameters(tensor_names, backward)
    function.__signature__ = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[kind])
            for name, kind in parameters
        ],  # fmt: skip
        return_annotation=tuple[(torch.Tensor,) * returns],
    )
    return function


def _define(backend: Backend) -> tuple[Any, Any]:
    name = backend.name
    qualified_forward = f"fusedattn::{name}_forward"
    qualified_backward = f"fusedattn::{name}_backward"
    # A triton_op backend's body is traced with fake tensors: it keeps the seed a tensor.
    read_seed = not backend.triton_op

    def forward_impl(*arguments: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_body(backend, _call_from_arguments(arguments, read_seed))

    def backward_impl(grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *arguments: Any):
        if backend.backward is None:
            raise NotImplementedError(f"backend {name!r} has no backward")
        arguments, wanted_flags = arguments[: len(OPTIONS) + 3], arguments[len(OPTIONS) + 3 :]
        call = _call_from_arguments(arguments, read_seed)
        wanted = _wanted_options(wanted_flags)
        missing = sorted(set(wanted) - backend.capabilities.differentiable_options)
        if missing:  # the dispatcher refuses such calls; a direct op call must not drop them
            raise NotImplementedError(f"backend {name!r} cannot differentiate {', '.join(missing)}")
        invalid = metadata_guard(call, synchronize=backend.reads_metadata_on_host)
        if wanted:
            grads = backend.backward(call, grad_out, out, lse, option_gradients=wanted)
        else:
            grads = backend.backward(call, grad_out, out, lse)
        grads = poison_if_invalid(invalid, *grads)
        option_grads = dict(zip(wanted, grads[3:], strict=True))
        return tuple(g.contiguous() for g in grads[:3]) + tuple(
            option_grads[option].contiguous() if option in option_grads else _no_gradient(grad_out)
            for option in DIFFERENTIABLE_OPTIONS
        )

    def forward_fake(*arguments: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _fake_outputs(_call_from_arguments_fake(arguments))

    def backward_fake(grad_out, out, lse, q, k, v, *rest):
        options, wanted_flags = rest[: len(OPTIONS)], rest[len(OPTIONS) :]
        option_grads = []
        for position, wanted in zip(_DIFFERENTIABLE_POSITIONS, wanted_flags, strict=True):
            option = options[position]
            option_grads.append(
                torch.empty(option.shape, dtype=option.dtype, device=option.device)
                if wanted
                else _no_gradient(grad_out)
            )
        return (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
            *option_grads,
        )

    library = None
    if backend.triton_op:
        # torch.compile decomposes these ops into their bodies (torch ops + Triton kernel
        # calls) instead of treating them as opaque. The fake implementations stay ours:
        # they need no kernel, and the bodies' outputs have the same shapes and strides.
        forward_definition = torch.library.triton_op(
            qualified_forward, _with_signature(forward_impl, _FORWARD_TENSORS, 2), mutates_args=()
        )
        backward_definition = torch.library.triton_op(
            qualified_backward,
            _with_signature(backward_impl, _BACKWARD_TENSORS, _BACKWARD_RETURNS, backward=True),
            mutates_args=(),
        )
        forward_definition.register_fake(forward_fake)
        backward_definition.register_fake(backward_fake)
    else:
        library = torch.library.Library("fusedattn", "FRAGMENT")
        library.define(f"{name}_forward{_schema(_FORWARD_TENSORS, 2)}")
        library.define(f"{name}_backward{_schema(_BACKWARD_TENSORS, _BACKWARD_RETURNS, backward=True)}")
        _LIBRARIES.append(library)
        # One implementation for every device: backends route devices themselves.
        torch.library.impl(qualified_forward, "CompositeExplicitAutograd", lib=library)(forward_impl)
        torch.library.impl(qualified_backward, "CompositeExplicitAutograd", lib=library)(backward_impl)
        torch.library.register_fake(qualified_forward, lib=library)(forward_fake)
        torch.library.register_fake(qualified_backward, lib=library)(backward_fake)

    forward_op = getattr(torch.ops.fusedattn, f"{name}_forward").default
    backward_op = getattr(torch.ops.fusedattn, f"{name}_backward").default

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        out, lse = output
        q, k, v, *tensors_and_options = inputs
        tensor_positions = [i for i, x in enumerate(tensors_and_options) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(q, k, v, out, lse, *(tensors_and_options[i] for i in tensor_positions))
        ctx.tensor_positions = tensor_positions
        ctx.options = [None if isinstance(x, torch.Tensor) else x for x in tensors_and_options]
        # needs_input_grad counts q, k, v first.
        ctx.option_gradients = [ctx.needs_input_grad[3 + position] for position in _DIFFERENTIABLE_POSITIONS]
        ctx.mark_non_differentiable(lse)

    def autograd_backward(ctx: Any, grad_out: torch.Tensor | None, _grad_lse: Any):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        options = list(ctx.options)
        for position, tensor in zip(ctx.tensor_positions, saved):
            options[position] = tensor
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, *option_grads = backward_op(grad_out, out, lse, q, k, v, *options, *ctx.option_gradients)
        gradients: list[torch.Tensor | None] = [None] * len(options)
        for position, wanted, grad in zip(_DIFFERENTIABLE_POSITIONS, ctx.option_gradients, option_grads, strict=True):
            if wanted:
                gradients[position] = grad
        return (dq, dk, dv, *gradients)

    torch.library.register_autograd(qualified_forward, autograd_backward, setup_context=setup_context, lib=library)
    return forward_op, backward_op


def _call_from_arguments_fake(arguments: tuple[Any, ...]) -> AttentionCall:
    # Same as _call_from_arguments, without reading the seed's value.
    return _call_from_arguments(arguments, read_seed=False)


_LIBRARIES: list[torch.library.Library] = []


def ops_for(backend: Backend) -> tuple[Any, Any]:
    """(forward_op, backward_op) for a backend, defining them on first use."""
    if backend.name not in _OPS:
        _OPS[backend.name] = _define(backend)
    return _OPS[backend.name]


def forward_body(backend: Backend, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """What a forward op computes: metadata values not checked at validation (compiled or
    captured calls) are checked here when the host can read them, else flagged on the
    device and the outputs poisoned; then the backend's forward."""
    invalid = metadata_guard(call, synchronize=backend.reads_metadata_on_host)
    out, lse = poison_if_invalid(invalid, *backend.forward(call))
    # Fixed contiguous outputs, so the fake implementation's strides are exact.
    return out.contiguous(), lse.contiguous()


def _plain_eager(call: AttentionCall) -> bool:
    """True when the custom op would add nothing to forward_body: eager (no trace), nothing
    to differentiate, plain tensors on a real device, no functorch transform (vmap's
    batched tensors need the op's fallback) and no dispatch or function mode that must see
    the op (a FlopCounterMode, a tensor subclass)."""
    q = call.q
    if call.needs_grad or q.device.type not in ("cpu", "cuda"):
        return False
    if torch.is_grad_enabled() and call.differentiated_options():
        return False
    option_tensors = (call.attn_mask, call.alibi_slopes, call.sinks)
    if any(type(t) is not torch.Tensor for t in (q, call.k, call.v)) or any(
        t is not None and type(t) is not torch.Tensor for t in option_tensors
    ):
        return False
    return plain_eager_context()


def plain_eager_context() -> bool:
    """No torch.compile or torch.jit.trace trace, functorch transform, dispatch mode or
    function mode: nothing that must see the custom op (or trace through the caller)."""
    # The dispatch-mode stack's length counts infra modes too (make_fx's proxy mode, a
    # FakeTensorMode), as torch.utils._python_dispatch._get_current_dispatch_mode does, at a fraction
    # of its cost: this runs before every plain call.
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()  # torch.jit.trace records operators, never direct calls
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    )


def run_forward(backend: Backend, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a backend through its custom op (autograd and torch.compile aware).

    A plain eager call with nothing to differentiate runs the op's body directly: the
    dispatcher's round trip through Python (autograd wrapper, argument boxing) costs about
    20 us, as much as a small attention call itself."""
    forward_op, _ = ops_for(backend)
    if _plain_eager(call):
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(f"fusedattn::{backend.name}_forward"):
                return forward_body(backend, call)
        return forward_body(backend, call)
    return forward_op(*op_arguments(call))
