"""Checking a backend against the float64 reference: the rule every test and the parity
harness use.

A tensor passes when
  * it holds no NaN, and every -inf of the oracle's lse is -inf in it (and only there);
  * max|actual - oracle| <= max(2 * max|lowprec - oracle|, floor[dtype] * max(1, max|oracle|)),
    where lowprec is the reference computed entirely in the input dtype
    (FlashAttention's test rule, with a floor as FlashAttention 3 adds);
  * ||actual - oracle|| / ||oracle|| <= max(relative_bound[dtype], 2 * the same ratio for lowprec).
Outputs are poisoned (filled with NaN) before the backend runs, so an element a kernel
never wrote fails the NaN check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .api import attention, attention_varlen
from .backends.base import poisoned_outputs
from .backends.reference import reference_attention
from .semantics import AttentionCall
from .validation import validate_attention, validate_varlen

ABSOLUTE_FLOOR = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-5,
    torch.float64: 1e-10,
}
RELATIVE_BOUND = {
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
}

__all__ = ["TensorCheck", "check_tensor", "check_backend", "poisoned_outputs", "ABSOLUTE_FLOOR", "RELATIVE_BOUND"]


@dataclass(frozen=True)
class TensorCheck:
    """The comparison of one output tensor against the oracle."""

    name: str
    passed: bool
    max_error: float
    bound: float
    reference_error: float
    relative_error: float
    relative_bound: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite_max(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def check_tensor(
    name: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    lowprec: torch.Tensor,
    dtype: torch.dtype,
    magnitude: float = 1.0,
) -> TensorCheck:
    """Compare actual with the float64 oracle, given the same-precision reference lowprec.

    magnitude: the floor is ABSOLUTE_FLOOR[dtype] * max(magnitude, max|oracle|); raise it
    above 1 for a tensor whose true value cancels to zero while the terms it is computed
    from do not (see check_backend).
    """
    relative_bound = RELATIVE_BOUND[dtype]
    if tuple(actual.shape) != tuple(oracle.shape):
        return TensorCheck(name, False, math.inf, 0.0, 0.0, math.inf, relative_bound,
                           f"shape {tuple(actual.shape)} != {tuple(oracle.shape)}")  # fmt: skip
    actual = actual.detach().to("cpu", torch.float64)
    oracle = oracle.detach().to("cpu", torch.float64)
    lowprec = lowprec.detach().to("cpu", torch.float64)
    nan_count = int(torch.isnan(actual).sum())
    if nan_count:
        return TensorCheck(name, False, math.nan, 0.0, 0.0, math.nan, relative_bound,
                           f"{nan_count} NaN element(s) (unwritten outputs are poisoned with NaN)")  # fmt: skip
    # -inf marks fully masked rows in lse; it must match exactly.
    oracle_infinite = torch.isinf(oracle)
    if not torch.equal(oracle_infinite, torch.isinf(actual)) or not torch.equal(
        oracle[oracle_infinite], actual[oracle_infinite]
    ):
        mismatched = int((oracle_infinite != torch.isinf(actual)).sum())
        return TensorCheck(name, False, math.inf, 0.0, 0.0, math.inf, relative_bound,
                           f"{mismatched} element(s) infinite in one of actual and oracle only")  # fmt: skip
    finite = ~oracle_infinite
    actual, oracle, lowprec = actual[finite], oracle[finite], lowprec[finite]
    max_error = _finite_max((actual - oracle).abs())
    reference_error = _finite_max((lowprec - oracle).abs())
    scale = max(1.0, magnitude, _finite_max(oracle.abs()))
    bound = max(2.0 * reference_error, ABSOLUTE_FLOOR[dtype] * scale)
    norm = float(oracle.norm())
    # An all-zero oracle has no relative error; the max-error bound alone judges it.
    relative_error = float((actual - oracle).norm()) / norm if norm > 0 else 0.0
    # The 2x rule applies to the error norm too: a tensor that is mostly cancellation
    # (rows that see a single key) has a large relative error in any low-precision run.
    reference_relative_error = float((lowprec - oracle).norm()) / norm if norm > 0 else 0.0
    relative_bound = max(relative_bound, 2.0 * reference_relative_error)
    passed = max_error <= bound and relative_error <= relative_bound
    reason = ""
    if max_error > bound:
        reason = f"max error {max_error:.3g} > bound {bound:.3g}"
    elif relative_error > relative_bound:
        reason = f"relative error {relative_error:.3g} > bound {relative_bound:.3g}"
    return TensorCheck(name, passed, max_error, bound, reference_error, relative_error, relative_bound, reason)


_VARLEN_ARGUMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _split_varlen(kwargs: dict[str, Any]) -> tuple[list[Any] | None, dict[str, Any]]:
    """(positional varlen arguments or None, the remaining keyword arguments)."""
    if "cu_seqlens_q" not in kwargs:
        return None, kwargs
    return [kwargs[n] for n in _VARLEN_ARGUMENTS], {n: x for n, x in kwargs.items() if n not in _VARLEN_ARGUMENTS}


def check_backend(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: bool = True,
    oracle_device: torch.device | str | None = None,
    **kwargs: Any,
) -> list[TensorCheck]:
    """Run backend on (q, k, v, **kwargs) and compare out, lse and (with grad) dq, dk, dv
    with the float64 reference. kwargs are those of fusedattn.attention, or of
    attention_varlen when they include cu_seqlens_q. Inputs must not require grad.
    """
    kwargs = dict(kwargs)
    if kwargs.get("dropout_p", 0.0) > 0 and kwargs.get("dropout_seed") is None:
        kwargs["dropout_seed"] = 1234  # the oracle must draw the same mask
    dtype = q.dtype
    varlen, options = _split_varlen(kwargs)
    inputs = [_leaf_copy(t, grad) for t in (q, k, v)]
    with poisoned_outputs():
        if varlen is not None:
            out, lse = attention_varlen(*inputs, *varlen, return_lse=True, backend=backend, **options)
        else:
            out, lse = attention(*inputs, return_lse=True, backend=backend, **options)
        grad_out = torch.randn_like(out) if grad else None
        if grad:
            dq, dk, dv = torch.autograd.grad(out, inputs, grad_out)

    if varlen is not None:
        call = validate_varlen(q.detach(), k.detach(), v.detach(), *varlen, **options)
    else:
        call = validate_attention(q.detach(), k.detach(), v.detach(), **options)
    oracle_call = call
    if oracle_device is not None:
        oracle_call = _to_device(call, torch.device(oracle_device))
        grad_out_oracle = None if grad_out is None else grad_out.to(oracle_device)
    else:
        grad_out_oracle = grad_out
    ref_out, ref_lse, ref_grads = reference_attention(oracle_call, torch.float64, grad_out_oracle)
    low_out, low_lse, low_grads = reference_attention(call, dtype, grad_out)
    checks = [
        check_tensor("out", out, ref_out, low_out, dtype),
        check_tensor("lse", lse, ref_lse, low_lse, dtype),
    ]
    if grad:
        # dq and dk are exactly zero when every row sees a single key (dS = P * (dP - D)
        # cancels), but a kernel computing D = rowsum(dO * O) from the rounded output
        # leaves rounding noise of the size of the cancelled terms: |D| times the score
        # scale times the largest input, or the largest gradient if that is larger.
        delta = (grad_out.detach().double() * out.detach().double()).sum(-1).abs()
        largest_input = max(_finite_max(t.detach().abs().double()) for t in (q, k))
        cancelled = _finite_max(delta) * call.scale * largest_input
        gradient_scale = max(cancelled, *(_finite_max(g.detach().abs()) for g in ref_grads))
        for name, actual, oracle, lowprec in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads):
            magnitude = gradient_scale if _finite_max(oracle.detach().abs()) == 0.0 else 1.0
            checks.append(check_tensor(name, actual, oracle, lowprec, dtype, magnitude=magnitude))
    return checks


def _leaf_copy(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A leaf copy with tensor's exact strides: clone() would make a non-dense view (a
    slice of a packed QKV buffer, say) contiguous, and hide layout bugs from the check."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor.detach()).requires_grad_(requires_grad)


def _to_device(call: AttentionCall, device: torch.device) -> AttentionCall:
    fields = {}
    for name in ("q", "k", "v", "attn_mask", "key_lengths", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"):
        value = getattr(call, name)
        if value is not None:
            fields[name] = value.to(device)
    return call.with_tensors(**fields)


def assert_backend_matches(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> None:
    """pytest helper: check_backend, raising AssertionError listing every failed tensor."""
    failures = [c for c in check_backend(backend, q, k, v, **kwargs) if not c.passed]
    if failures:
        raise AssertionError("; ".join(f"{c.name}: {c.reason}" for c in failures))
