"""The C++ CPU backend: fused flash-style attention kernels in fusedattn._C.

The kernels (csrc/cpu/) tile over queries and keys with an online softmax, never build
the (Sq x Sk) score matrix, run in parallel with OpenMP and use the widest SIMD variant
the CPU supports, chosen at run time (FUSEDATTN_CPU_ISA=generic|avx2|avx512|avx512bf16
forces one). Every feature of the semantics is served, forward and backward, for float32,
bfloat16 and float16 (accumulating in float32).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import semantics
from .._native import native, native_error
from ..ops import NATIVE_OPTIONS, native_option_values
from ..outputs import poisoning
from ..semantics import AttentionCall
from ..validation import expanded_descale
from .base import Backend, CallProfile, Capabilities, allocate_output


def _available() -> tuple[bool, str]:
    if native() is None:
        return False, native_error() or "fusedattn._C is not built"
    if not hasattr(native(), "cpu_forward") or not hasattr(torch.ops.fusedattn_native, "cpu_forward"):
        return False, "fusedattn._C was built without the CPU kernels"
    return True, ""


def selected_isa() -> str:
    """Name of the kernel variant the native code runs on this CPU (e.g. 'avx512')."""
    native()
    return torch.ops.fusedattn_native.cpu_isa()


# The kernels are called through fusedattn._C's direct bindings of the operators' own
# functions (csrc/cpu/direct_calls.cpp): same arguments, same checks, without the
# dispatcher's argument boxing. The fusedattn_native operators stay for torch.ops users.


def forward(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """out (*q.shape[:-1], Dv) in q's dtype and lse float32 (B, Hq, Sq) or (Hq, Tq)."""
    if poisoning():
        out = allocate_output(call.out_shape, call.dtype, call.device)
    else:  # as the plans allocate it: a large output fresh from the OS in 2 MiB pages
        out = native().cpu_empty_output(list(call.out_shape), call.dtype)
    lse = allocate_output(call.lse_shape, torch.float32, call.device)
    native().cpu_forward(call.q, call.k, call.v, out, lse, *native_option_values(call))
    return out, lse


# Option tensors a plan takes with each call instead of keeping them.
_PER_CALL_OPTIONS = ("k_descale", "v_descale")


def prepare_forward(call: AttentionCall):
    """forward for calls that differ from call only in the values of q, k, v (and of the
    8-bit scales k_descale, v_descale, passed as the call passes them): the native
    argument list built once (plain calls carry no other option tensor; None otherwise)."""
    options = tuple(
        None if name in _PER_CALL_OPTIONS else value
        for name, value in zip(NATIVE_OPTIONS, native_option_values(call), strict=True)
    )
    if any(isinstance(value, torch.Tensor) for value in options):
        return None
    planned = native().CpuForwardPlan(list(call.out_shape), list(call.lse_shape), *options)
    # The plan keeps no tensor of the call it was made from (it may be a large cache).
    call_without_tensors = dataclasses.replace(call, q=None, k=None, v=None, k_descale=None, v_descale=None)

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_descale: torch.Tensor | None = None,
        v_descale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if poisoning():  # outputs must come from allocate_output
            scales = {
                name: None if scale is None else expanded_descale(scale, cache)
                for name, scale, cache in (("k_descale", k_descale, k), ("v_descale", v_descale, v))
            }
            return forward(dataclasses.replace(call_without_tensors, q=q, k=k, v=v, **scales))
        return planned(q, k, v, k_descale, v_descale)

    return run


def backward(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) shaped like (q, k, v); dk/dv summed over each GQA group. With
    option_gradients=("sinks",) also d sinks (Hq,) float32, from lse and delta: the
    kernels' P already holds the sinks (through lse), so dq, dk, dv need nothing else."""
    grad_q = allocate_output(tuple(call.q.shape), call.dtype, call.device)
    grad_k = allocate_output(tuple(call.k.shape), call.dtype, call.device)
    grad_v = allocate_output(tuple(call.v.shape), call.dtype, call.device)
    native().cpu_backward(
        grad_out.to(call.dtype), call.q, call.k, call.v, out, lse, grad_q, grad_k, grad_v, *native_option_values(call)
    )
    if "sinks" in option_gradients:
        return grad_q, grad_k, grad_v, semantics.call_sink_gradient(call, grad_out, out, lse)
    return grad_q, grad_k, grad_v


def refuse(profile: CallProfile) -> str | None:
    if {"paged_kv", "backward"} <= profile.features:
        return "no backward over a paged KV cache (inference only; the reference backend differentiates it)"
    if {"quantized_kv", "backward"} <= profile.features:
        return "no backward with 8-bit K/V (inference only; the reference backend differentiates it)"
    return None


BACKEND = Backend(
    name="cpu",
    description="fused C++ CPU kernels: tiled online softmax, OpenMP, SIMD chosen at run time",
    capabilities=Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        features=frozenset(semantics.FEATURES),
        max_head_dim=semantics.MAX_HEAD_DIM,
        differentiable_options=frozenset({"sinks"}),
        priority={"cpu": 20},
    ),
    forward=forward,
    backward=backward,
    availability=_available,
    refuse=refuse,
    prepare_forward=prepare_forward,
)
