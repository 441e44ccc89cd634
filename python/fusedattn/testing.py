"""Checking a backend against the float64 reference: the rule every test and the parity
harness use.

A tensor passes when
  * it holds no NaN, and every -inf of the oracle's lse is -inf in it (and only there);
  * max|actual - oracle| <= max(2 * max|lowprec - oracle|, floor[dtype] * max(1, max|oracle|)),
    where lowprec is the reference computed entirely in the input dtype
    (FlashAttention's test rule, with a floor as FlashAttention 3 adds);
  * ||actual - oracle|| / ||oracle|| <= max(relative_bound[dtype], 2 * the same ratio for lowprec);
  * for dq, dk, dv both bounds are raised by the error FlashAttention's backward leaves by
    design and an autograd reference does not (flash_backward_bounds: negligible unless
    the logits are in the hundreds or more).
Outputs are poisoned (filled with NaN) before the backend runs, so an element a kernel
never wrote fails the NaN check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .api import attention, attention_paged, attention_varlen
from .backends.reference import reference_attention
from .dispatch import registry
from .outputs import poisoned_outputs
from .quantization import quantize_kv
from .semantics import QUANTIZED_KV_DTYPES, AttentionCall, within_key_lengths
from .validation import validate_attention, validate_paged, validate_varlen

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

__all__ = [
    "TensorCheck",
    "check_tensor",
    "check_backend",
    "validated_call",
    "paged_case",
    "poison_storage_past_lengths",
    "quantize_test_cache",
    "flash_backward_bounds",
    "FEATURE_CASES",
    "SHAPE_FEATURES",
    "feature_case",
    "poisoned_outputs",
    "ABSOLUTE_FLOOR",
    "RELATIVE_BOUND",
]


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
    noise: float = 0.0,
) -> TensorCheck:
    """Compare actual with the float64 oracle, given the same-precision reference lowprec.

    magnitude: the floor is ABSOLUTE_FLOOR[dtype] * max(magnitude, max|oracle|); raise it
    above 1 for a tensor whose true value cancels to zero while the terms it is computed
    from do not (see check_backend).
    noise: an absolute error per element the algorithm itself leaves, whatever the
    kernel (see flash_backward_bounds); it raises both bounds.
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
    bound = max(2.0 * reference_error, ABSOLUTE_FLOOR[dtype] * scale, noise)
    norm = float(oracle.norm())
    # An all-zero oracle has no relative error; the max-error bound alone judges it.
    relative_error = float((actual - oracle).norm()) / norm if norm > 0 else 0.0
    # The 2x rule applies to the error norm too: a tensor that is mostly cancellation
    # (rows that see a single key) has a large relative error in any low-precision run.
    reference_relative_error = float((lowprec - oracle).norm()) / norm if norm > 0 else 0.0
    noise_relative = noise * math.sqrt(oracle.numel()) / norm if norm > 0 else 0.0
    relative_bound = max(relative_bound, 2.0 * reference_relative_error, noise_relative)
    passed = max_error <= bound and relative_error <= relative_bound
    reason = ""
    if max_error > bound:
        reason = f"max error {max_error:.3g} > bound {bound:.3g}"
    elif relative_error > relative_bound:
        reason = f"relative error {relative_error:.3g} > bound {relative_bound:.3g}"
    return TensorCheck(name, passed, max_error, bound, reference_error, relative_error, relative_bound, reason)


def logit_rounding_bounds(call: AttentionCall, oracle_out: torch.Tensor) -> tuple[float, float]:
    """(out noise, lse noise) that computing the scores in float32 base-2 units leaves, whatever
    the kernel: scaling a logit s by log2(e) rounds it by up to u|s| (u = 2^-24), an error
    relative to |s| itself, not to s - max; the same-precision reference (natural exp of
    s - max) does not have it, so the 2x rule alone fails rows with logits in the
    hundreds or more. A logit's error d <= 4u max|s| moves lse by at most d and out_i by at
    most d * sum_j P_ij |v_j - out_i| <= d * (sum_j P_ij |v_j| + |out_i|)."""
    unit = 2.0**-53 if call.dtype == torch.float64 else 2.0**-24
    q, k = call.q.detach().double(), call.k.detach().double()
    # K's storage rows (past key_lengths, paged rows no sequence holds) may be NaN: no
    # backend reads them, so they bound no logit.
    key_norms = k.norm(dim=-1)
    key_norms = key_norms[~torch.isnan(key_norms)]
    if not torch.isfinite(q).all() or not torch.isfinite(key_norms).all() or q.numel() == 0 or key_norms.numel() == 0:
        return 0.0, 0.0
    scale = abs(call.scale) if math.isfinite(call.scale) else 0.0
    largest = scale * float(q.norm(dim=-1).max()) * float(key_norms.max())
    if call.softcap is not None:
        largest = min(largest, abs(call.softcap))
    if call.alibi_slopes is not None:
        largest += float(call.alibi_slopes.detach().double().abs().max()) * (call.seqlen_q + call.seqlen_k)
    if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        magnitudes = call.attn_mask.detach().double().abs()
        largest += _finite_max(magnitudes[torch.isfinite(magnitudes)])  # -inf entries hide keys
    logit_error = 4.0 * unit * largest
    if not 0.0 < logit_error < math.inf:
        return 0.0, 0.0
    weighted_values, _, _ = reference_attention(call.with_tensors(v=call.v.detach().abs()), torch.float64)
    out_error = logit_error * (weighted_values.to(oracle_out.device) + oracle_out.double().abs())
    return _finite_max(out_error), logit_error


def flash_backward_bounds(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    oracle_out: torch.Tensor,
    oracle_lse: torch.Tensor,
    oracle_grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lse: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """(dq, dk, dv) absolute errors that FlashAttention's backward leaves by design.

    The autograd reference differentiates softmax with D_i = sum_j P_ij dP_ij, from the
    same P and dP, so its rounding errors cancel. A FlashAttention backward (every kernel
    here, and FlashAttention itself) instead
      * takes D_i = sum_d dO[i, d] O[i, d] from the output it returned, off by at most
        e_i = |dO_i . (O_i - oracle O_i)| plus a float32 summation error; e_i enters
        dS_ij = P_ij (dP_ij - D_i) as P_ij e_i (times 1 - tanh^2 <= 1 under softcap); and
      * recomputes P_ij = exp(s_ij - lse_i) from its float32 lse, off by
        eps_i = lse_i - oracle lse_i (the float32 rounding when lse is not given), which
        scales row i of P, hence of dS, by 1 + f_i, f_i = exp(-eps_i) - 1: exactly the
        effect of grad_out row i scaled by f_i, computed with the reference.
    So |error dq_i| <= (1 + |f_i|) |scale| e_i max_d |sum_j P_ij k_j| + |f_i| |dq_i|,
       |error dk_j| <= |scale| sum_i P_ij (1 + |f_i|) e_i max_d |q_i| + |dk_j(f dO)|,
       |error dv_j| <= |dv_j(f dO)|,
    the sums over P from the float64 reference. Negligible at usual scales; dominant when
    scale * |q| * |k| is large (scale 1000, say), where dq and dk cancel, or when |lse|
    passes 2^24 (an additive mask of 1e30 on a whole row: float32 cannot hold
    lse = max + log(sum) there, and P is off by up to the number of keys; see
    docs/semantics.md, "Precision of the backward pass"). Doubled, as the rest of the
    rule is.
    """
    device = call.q.device

    def finite(t: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(t.detach().to(device, torch.float64), nan=0.0, posinf=0.0, neginf=0.0)

    grad_out, out, oracle_out, oracle_lse = (finite(t) for t in (grad_out, out, oracle_out, oracle_lse))
    q, k, v = (finite(t) for t in (call.q, call.k, call.v))
    # float32 summation of Dv terms t: about sqrt(Dv) * u * ||t||_2 (the probabilistic
    # estimate; the worst case, Dv * u * sum |t|, would loosen the rule at usual scales).
    summation = math.sqrt(out.shape[-1]) * torch.finfo(torch.float32).eps / 2
    error = (grad_out * (out - oracle_out)).sum(-1).abs() + summation * (grad_out * oracle_out).norm(dim=-1)
    stored = oracle_lse.float().double() if lse is None else finite(lse)
    if call.is_varlen:  # lse is (Hq, total), out (total, Hq, Dv)
        oracle_lse, stored = oracle_lse.transpose(0, 1), stored.transpose(0, 1)
    lse_error = torch.where(torch.isfinite(oracle_lse), stored - oracle_lse, torch.zeros_like(oracle_lse))
    factor = torch.expm1(-lse_error)  # P_kernel = P * (1 + factor), row by row
    scale = abs(call.scale) if math.isfinite(call.scale) else 0.0
    plain = replace(call.with_tensors(q=q, k=k, v=v), dropout_p=0.0, dropout_seed=None, needs_grad=False)

    weighted_keys, _, _ = reference_attention(plain.with_tensors(v=k), torch.float64)
    _, _, column_sums = reference_attention(
        plain.with_tensors(v=torch.ones_like(k[..., :1])),
        torch.float64,
        ((1 + factor.abs()) * error * q.abs().amax(-1))[..., None],
    )
    _, _, lse_effect = reference_attention(call.with_tensors(q=q, k=k, v=v), torch.float64,
                                           factor[..., None] * grad_out)  # fmt: skip
    dq = finite(oracle_grads[0])
    dq_bound = scale * _finite_max((1 + factor.abs()) * error * weighted_keys.abs().amax(-1))
    dq_bound += _finite_max(factor[..., None].abs() * dq.abs())
    dk_bound = scale * _finite_max(column_sums[2].abs()) + _finite_max(lse_effect[1].abs())
    dv_bound = _finite_max(lse_effect[2].abs())
    return 2.0 * dq_bound, 2.0 * dk_bound, 2.0 * dv_bound


_VARLEN_ARGUMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_PAGED_ARGUMENTS = ("block_table", "cache_lengths", "cu_seqlens_q", "max_seqlen_q")


def _entry(kwargs: dict[str, Any]) -> tuple[Callable, Callable, list[Any], dict[str, Any]]:
    """(entry function, its validator, positional metadata arguments, the other keyword
    arguments) for kwargs of attention, attention_varlen (they hold cu_seqlens_q) or
    attention_paged (they hold block_table)."""
    if "cu_seqlens_q" not in kwargs:
        return attention, validate_attention, [], kwargs
    if "block_table" in kwargs:
        names, function, validator = _PAGED_ARGUMENTS, attention_paged, validate_paged
    else:
        names, function, validator = _VARLEN_ARGUMENTS, attention_varlen, validate_varlen
    return function, validator, [kwargs[n] for n in names], {n: x for n, x in kwargs.items() if n not in names}


def validated_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> AttentionCall:
    """The AttentionCall of (q, k, v, options) as check_backend's kwargs describe it."""
    _, validate, positional, rest = _entry(options)
    return validate(q, k, v, *positional, **rest)


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
    with the float64 reference. kwargs are those of fusedattn.attention, of
    attention_varlen when they include cu_seqlens_q, or of attention_paged (k, v the
    caches; forward only) when they include block_table. Inputs must not require grad;
    8-bit K/V are checked forward only. With key_lengths, both runs see NaN in K, V and
    per-token scales at or past key_lengths[b] (poison_storage_past_lengths).
    """
    kwargs = dict(kwargs)
    lengths = kwargs.get("key_lengths")
    if isinstance(lengths, torch.Tensor):
        # Rows past key_lengths are storage no backend may read (docs/semantics.md): NaN
        # there, and in their per-token scales, must change nothing.
        k, v = (poison_storage_past_lengths(t, lengths) for t in (k, v))
        for name in ("k_descale", "v_descale"):
            scale = kwargs.get(name)
            if isinstance(scale, torch.Tensor) and scale.shape == k.shape[:3] and 0 not in scale.stride():
                kwargs[name] = poison_storage_past_lengths(scale, lengths)
    # Paged caches and 8-bit K/V are inference only (8-bit tensors cannot require grad).
    grad = grad and "block_table" not in kwargs and k.dtype not in QUANTIZED_KV_DTYPES
    if kwargs.get("dropout_p", 0.0) > 0 and kwargs.get("dropout_seed") is None:
        kwargs["dropout_seed"] = 1234  # the oracle must draw the same mask
    dtype = q.dtype
    run, validate, positional, options = _entry(kwargs)
    inputs = [_leaf_copy(t, grad) for t in (q, k, v)]
    # Sinks are learned: their gradient is checked too (semantics.DIFFERENTIABLE_OPTIONS).
    learned = {}
    if grad and isinstance(options.get("sinks"), torch.Tensor):
        learned["sinks"] = options["sinks"] = _leaf_copy(options["sinks"], True)
    with poisoned_outputs():
        out, lse = run(*inputs, *positional, return_lse=True, backend=backend, **options)
        grad_out = torch.randn_like(out) if grad else None
        if grad:
            dq, dk, dv, *option_grads = torch.autograd.grad(out, [*inputs, *learned.values()], grad_out)
    options = {name: (value.detach() if name in learned else value) for name, value in options.items()}

    call = validate(q.detach(), k.detach(), v.detach(), *positional, **options)
    oracle_call = call
    if oracle_device is not None:
        oracle_call = _to_device(call, torch.device(oracle_device))
        grad_out_oracle = None if grad_out is None else grad_out.to(oracle_device)
    else:
        grad_out_oracle = grad_out
    ref_out, ref_lse, ref_grads = reference_attention(oracle_call, torch.float64, grad_out_oracle, tuple(learned))
    low_out, low_lse, low_grads = reference_attention(call, dtype, grad_out, tuple(learned))
    ref_option_grads, ref_grads = (ref_grads[3:], ref_grads[:3]) if grad else ((), ref_grads)
    low_option_grads, low_grads = (low_grads[3:], low_grads[:3]) if grad else ((), low_grads)
    out_noise, lse_noise = logit_rounding_bounds(oracle_call, ref_out)
    checks = [
        check_tensor("out", out, ref_out, low_out, dtype, noise=out_noise),
        check_tensor("lse", lse, ref_lse, low_lse, dtype, noise=lse_noise),
    ]
    if grad:
        # dq and dk are exactly zero when every row sees a single key (dS = P * (dP - D)
        # cancels), but a kernel computing D = rowsum(dO * O) from the rounded output
        # leaves rounding noise of the size of the cancelled terms: |D| times the score
        # scale times the largest input, or the largest gradient if that is larger.
        delta = (grad_out.detach().double() * out.detach().double()).sum(-1).abs()
        # NaN (K's storage past key_lengths) would drop out of max() depending on its position.
        largest_input = max(_finite_max(t.detach().abs().double().nan_to_num(0.0, math.inf)) for t in (q, k))
        cancelled = _finite_max(delta) * call.scale * largest_input
        gradient_scale = max(cancelled, *(_finite_max(g.detach().abs()) for g in ref_grads))
        noise = flash_backward_bounds(call, grad_out, out, ref_out, ref_lse, ref_grads, lse)
        for name, actual, oracle, lowprec, bound in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads, noise):
            magnitude = gradient_scale if _finite_max(oracle.detach().abs()) == 0.0 else 1.0
            checks.append(check_tensor(name, actual, oracle, lowprec, dtype, magnitude=magnitude, noise=bound))
        for name, actual, oracle, lowprec in zip(learned, option_grads, ref_option_grads, low_option_grads):
            bound = sink_gradient_noise(call, grad_out, out, ref_out, ref_lse, lse) if name == "sinks" else 0.0
            checks.append(check_tensor("d" + name, actual, oracle, lowprec, dtype, magnitude=gradient_scale,
                                       noise=bound))  # fmt: skip
    return checks


def sink_gradient_noise(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    oracle_out: torch.Tensor,
    oracle_lse: torch.Tensor,
    lse: torch.Tensor,
) -> float:
    """What d sinks may differ from the oracle by through what a fast backward is allowed
    to do (docs/semantics.md, "Precision of the backward pass"): d sinks[h] is
    -sum_i exp(sink - lse_i) * D_i with D_i = rowsum(dO * O) taken from the returned,
    rounded output and the stored lse. Twice the largest per-head sum of
    p_sink_i * (|dO_i| . |O_i - O64_i| + |D_i| * |expm1(lse64_i - lse_i)|)."""
    out_error = (out.detach().double() - oracle_out.double().to(out.device)).abs()
    delta_error = (grad_out.detach().double().abs() * out_error).sum(-1)
    delta = (grad_out.detach().double() * out.detach().double()).sum(-1)
    if call.is_varlen:  # out rows are (T, Hq); lse is (Hq, T)
        delta_error, delta = delta_error.transpose(0, 1), delta.transpose(0, 1)
    oracle_lse = oracle_lse.double().to(lse.device)
    finite = torch.isfinite(oracle_lse)
    lse_error = torch.where(finite, torch.expm1((oracle_lse - lse.double()).abs()), torch.zeros_like(oracle_lse))
    heads_dim = 0 if call.is_varlen else 1
    shape = [1] * oracle_lse.dim()
    shape[heads_dim] = -1
    sink_probability = torch.where(
        finite, torch.exp(call.sinks.double().to(lse.device).view(shape) - oracle_lse), torch.zeros_like(oracle_lse)
    )
    terms = sink_probability * (delta_error + delta.abs() * lse_error)
    per_head = terms.sum(dim=[d for d in range(terms.dim()) if d != heads_dim])
    return 2.0 * _finite_max(per_head)


def _leaf_copy(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A leaf copy with tensor's exact strides: clone() would make a non-dense view (a
    slice of a packed QKV buffer, say) contiguous, and hide layout bugs from the check."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    return copy.copy_(tensor.detach()).requires_grad_(requires_grad)


def _nan_where(tensor: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """tensor (modified in place) with NaN where `where` (broadcast) is True: float8_e4m3fn
    gets its NaN byte; int8 has no NaN and is left as it is."""
    if tensor.dtype == torch.float8_e4m3fn:
        tensor.view(torch.uint8).masked_fill_(where, 0x7F)
    elif tensor.dtype != torch.int8:
        tensor.masked_fill_(where, float("nan"))
    return tensor


def poison_storage_past_lengths(tensor: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    """A copy (exact strides) of dense K or V (B, Hkv, Sk, ·), or of a per-token scale
    (B, Hkv, Sk), with NaN at every position at or past key_lengths[b]: storage, which no
    backend may read. float8_e4m3fn gets its NaN byte; int8 has no NaN and is copied as is."""
    copy = _leaf_copy(tensor, False)
    storage = ~within_key_lengths(key_lengths.to(copy.device), copy.shape[2])
    return _nan_where(copy, storage[:, None, :, None] if copy.dim() == 4 else storage[:, None, :])


def _to_device(call: AttentionCall, device: torch.device) -> AttentionCall:
    fields = {}
    metadata = ("attn_mask", "key_lengths", "cu_seqlens_q", "cu_seqlens_k", "block_table", "cache_lengths")
    for name in ("q", "k", "v", *metadata, "alibi_slopes", "sinks"):
        value = getattr(call, name)
        if value is not None:
            fields[name] = value.to(device)
    return call.with_tensors(**fields)


def assert_backend_matches(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> None:
    """pytest helper: check_backend, raising AssertionError listing every failed tensor."""
    failures = [c for c in check_backend(backend, q, k, v, **kwargs) if not c.passed]
    if failures:
        raise AssertionError("; ".join(f"{c.name}: {c.reason}" for c in failures))


# ---- feature cases shared by every backend's tests -------------------------------------------
# Options by name; tensors are symbolic ("per_head", "bool", ...) and made by feature_case for
# the inputs at hand. The backends' tests (reference, cpu, triton, cuda) run every case.
FEATURE_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "causal_bottom_right": {"causal": True},
    "causal_top_left": {"causal": True, "causal_alignment": "top_left"},
    "window": {"window": (7, 3)},
    "window_left_only_causal": {"window": (9, None), "causal": True},
    "window_top_left": {"window": (2, 6), "causal_alignment": "top_left"},
    "window_right_only_top_left": {"window": (None, 9), "causal_alignment": "top_left"},
    "alibi": {"alibi_slopes": "per_head", "causal": True},
    "alibi_per_batch_top_left": {"alibi_slopes": "per_batch", "causal_alignment": "top_left"},
    "softcap": {"softcap": 2.0},
    "dropout": {"dropout_p": 0.3},
    "dropout_causal": {"dropout_p": 0.3, "causal": True},
    "bool_mask": {"attn_mask": "bool"},
    "bool_mask_empty_rows": {"attn_mask": "bool_every_third_row_empty"},
    "additive_mask": {"attn_mask": "additive"},
    "key_lengths": {"key_lengths": "random"},
    "key_lengths_zero": {"key_lengths": "first_zero"},
    "everything": {
        "causal": True,
        "window": (9, None),
        "alibi_slopes": "per_head",
        "softcap": 3.0,
        "attn_mask": "bool",
        "key_lengths": "random",
        "dropout_p": 0.2,
    },
    "sinks": {"sinks": "per_head"},
    "sinks_causal_empty_rows": {"sinks": "per_head", "causal": True, "window": (5, None), "key_lengths": "first_zero"},
    "additive_alibi_softcap_dropout": {
        "attn_mask": "additive",
        "alibi_slopes": "per_batch",
        "softcap": 1.5,
        "dropout_p": 0.4,
        "causal": True,
        "causal_alignment": "top_left",
    },
    # A block of a longer sequence (context parallelism): global positions and dropout indices.
    "sequence_block": {
        "causal": True,
        "window": (30, None),
        "alibi_slopes": "per_head",
        "dropout_p": 0.2,
        "query_start": 50,
        "key_start": 45,
    },
}

# Features that come from the inputs' shapes, not from an option: the tests' inputs carry
# them (GQA heads, Dv != D, packed sequences, paged caches (tests/test_paged.py), gradients).
SHAPE_FEATURES = frozenset({"gqa", "value_head_dim", "varlen", "paged_kv", "quantized_kv", "backward"})


def undeclared_features(backend: str, q: torch.Tensor, k: torch.Tensor, options: dict[str, Any]) -> frozenset[str]:
    """Features of a dense call with these options that the backend does not declare (the
    shared feature cases skip them on that backend; the dispatcher refuses them)."""
    call = validate_attention(q, k, k, **options)
    return call.features() - registry()[backend].capabilities.features


def feature_case(name: str, q: torch.Tensor, k: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments of FEATURE_CASES[name] for dense q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
    on q's device and in q's dtype: masks with a fully masked row, key lengths in [1, Sk]
    (or the first 0), a fixed dropout seed."""
    batch, heads_q, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    device = q.device
    options = dict(FEATURE_CASES[name])
    slopes = options.get("alibi_slopes")
    if slopes == "per_head":
        options["alibi_slopes"] = torch.rand(heads_q, device=device) * 0.5
    elif slopes == "per_batch":
        options["alibi_slopes"] = torch.rand(batch, heads_q, device=device) * 0.5
    mask = options.get("attn_mask")
    if mask == "bool":  # broadcast over heads, row 0 fully masked
        mask = torch.rand(batch, 1, seqlen_q, seqlen_k, device=device) > 0.3
        mask[:, :, 0] = False
        options["attn_mask"] = mask
    elif mask == "bool_every_third_row_empty":
        rows = torch.arange(seqlen_q, device=device)[:, None].expand(seqlen_q, seqlen_k)
        options["attn_mask"] = rows % 3 != 0
    elif mask == "additive":  # broadcast over batch and heads, row 1 half -inf
        mask = torch.randn(seqlen_q, seqlen_k, device=device).to(q.dtype)
        mask[min(1, seqlen_q - 1), ::2] = float("-inf")
        options["attn_mask"] = mask
    if options.get("sinks") == "per_head":
        options["sinks"] = torch.randn(heads_q, device=device)
    lengths = options.get("key_lengths")
    if lengths == "random":
        options["key_lengths"] = torch.randint(1, seqlen_k + 1, (batch,), dtype=torch.int32, device=device)
    elif lengths == "first_zero":
        options["key_lengths"] = torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
        options["key_lengths"][0] = 0
    if options.get("dropout_p"):
        options["dropout_seed"] = 20261206
    return options


def quantize_test_cache(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fusedattn.quantize_kv of a test cache (K or V, any layout): rows holding NaN (storage,
    as paged_case makes them; no scale represents NaN) are quantized as 0 with NaN scales, so
    a read of them still shows. Other rows must be finite, as quantize_kv requires."""
    storage = cache.isnan().any(-1)
    quantized, descale = quantize_kv(cache.masked_fill(storage[..., None], 0.0), dtype)
    return quantized, descale.masked_fill(storage, float("nan"))


def paged_case(
    query_lengths: tuple[int, ...],
    cache_lengths: tuple[int, ...],
    *,
    block_size: int,
    heads_q: int = 4,
    heads_kv: int = 2,
    head_dim: int = 32,
    head_dim_v: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    shared_prefix_blocks: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]:
    """((q, key_cache, value_cache), attention_paged keyword arguments) for sequences with
    these query and cache lengths: blocks in shuffled order, with spare blocks nobody uses,
    table entries past each sequence's last block set to -1 (never read), and the first
    shared_prefix_blocks blocks of every sequence the same blocks (a shared prompt prefix).
    Cache rows no sequence holds (spare blocks, rows past a sequence's length) are NaN:
    storage, which no backend may read."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    sequences = len(cache_lengths)
    blocks_needed = [max(1, -(-length // block_size)) for length in cache_lengths]
    width = max(blocks_needed) + 1
    own = sum(max(0, n - shared_prefix_blocks) for n in blocks_needed)
    num_blocks = shared_prefix_blocks + own + 3  # spare blocks: read by nobody
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.full((sequences, width), -1, dtype=torch.int32)
    next_block = shared_prefix_blocks
    for index, needed in enumerate(blocks_needed):
        for slot in range(needed):
            if slot < shared_prefix_blocks:
                table[index, slot] = int(order[slot])
            else:
                table[index, slot] = int(order[next_block])
                next_block += 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    q = randn(sum(query_lengths), heads_q, head_dim)
    key_cache = randn(num_blocks, block_size, heads_kv, head_dim)
    value_cache = randn(num_blocks, block_size, heads_kv, head_dim_v)
    held = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for index, length in enumerate(cache_lengths):
        for slot in range(blocks_needed[index]):
            held[int(table[index, slot]), : max(0, min(block_size, length - slot * block_size))] = True
    held = held.to(device)[:, :, None, None]
    key_cache, value_cache = (_nan_where(cache, ~held) for cache in (key_cache, value_cache))
    offsets = [0]
    for length in query_lengths:
        offsets.append(offsets[-1] + length)
    options = dict(
        block_table=table.to(device),
        cache_lengths=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor(offsets, dtype=torch.int32, device=device),
        max_seqlen_q=max(query_lengths, default=0),
    )
    return (q, key_cache, value_cache), options


class DispatchRecorder(TorchDispatchMode):
    """A dispatch mode that records the name of every operator it sees (names: list of
    str such as "fusedattn.cpu_forward.default"), for tests that a mode still sees the op."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
