"""Building blocks shared by the entry points: sizes, options, masks, and the faults that
break exactly one rule of one argument."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from fusedattn.backends.reference import reference_attention
from fusedattn.semantics import AttentionCall
from fusedattn.testing import flash_backward_bounds, logit_rounding_bounds
from hypothesis import strategies as st

from .oracle import compare, first_failure
from .tensors import Layout, layouts, make_tensor

BACKENDS = ("auto", "cpu", "reference")
# Sequence lengths: mostly tiny, sometimes past a kernel tile.
SEQLENS = st.one_of(st.integers(0, 9), st.sampled_from([16, 33, 64, 65, 129]))
HEAD_DIMS = st.sampled_from([8, 16, 1, 3, 32, 64, 80, 128, 256, 512])
SCALES = st.sampled_from([None, None, 0.125, 1.0, 0.0, -0.7, 3.5, 1e-3, 1e3, 2])
WIDEST = 2**30  # window sides at least this wide hide nothing (docs/semantics.md)
# Python values of the wrong type for an option.
WRONG_TYPES = st.sampled_from(["1", b"x", [1.0], {"a": 1}, object(), 1j, torch.tensor(1.0)])


@dataclass
class Sizes:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int


@st.composite
def sizes(draw: st.DrawFn, max_batch: int = 3) -> Sizes:
    heads_kv = draw(st.sampled_from([1, 2, 1]))
    group = draw(st.sampled_from([1, 2, 3, 1, 0]))
    head_dim = draw(HEAD_DIMS)
    head_dim_v = draw(st.one_of(st.just(head_dim), st.just(head_dim), HEAD_DIMS))
    return Sizes(draw(st.integers(0, max_batch)), heads_kv * group, heads_kv, draw(SEQLENS), draw(SEQLENS),
                 head_dim, head_dim_v)  # fmt: skip


@dataclass
class Options:
    """fusedattn.attention's options, valid; the oracle reads them from here."""

    causal: bool = False
    causal_alignment: str = "bottom_right"
    scale: float | None = None
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    alibi_slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None

    def as_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for name in ("causal", "causal_alignment", "scale", "window", "softcap", "alibi_slopes", "sinks"):
            value = getattr(self, name)
            if value is not None and value is not False and value != "bottom_right":
                kwargs[name] = value
        if self.dropout_p:
            kwargs.update(dropout_p=self.dropout_p, dropout_seed=self.dropout_seed)
        return kwargs


def window_sides(draw: st.DrawFn) -> tuple[int | None, int | None] | None:
    side = st.one_of(st.none(), st.integers(0, 12), st.sampled_from([0, 2**30, 2**31 - 1, 2**40, 2**63]))
    return draw(st.one_of(st.none(), st.tuples(side, side)))


@st.composite
def options(draw: st.DrawFn, heads_q: int, batch: int, dtype: torch.dtype) -> Options:
    dropout = draw(st.sampled_from([0.0, 0.0, 0.0, 0.3, 0.9, 1.0]))
    slopes = None
    if draw(st.booleans()) and draw(st.booleans()):
        shape = draw(st.sampled_from([(heads_q,), (batch, heads_q)]))
        slope_dtype = draw(st.sampled_from([torch.float32, torch.float64, dtype]))
        slopes = make_tensor(shape, slope_dtype, draw(layouts(allow_specials=False))).abs() * 0.5
    sinks = None
    if draw(st.integers(0, 4)) == 0:
        sink_dtype = draw(st.sampled_from([torch.float32, torch.float64, dtype]))
        sinks = make_tensor((heads_q,), sink_dtype, draw(layouts(allow_specials=False)), scale=3.0)
        if heads_q > 0 and draw(st.booleans()):
            sinks[0] = -math.inf  # a sink of -inf is no sink
    return Options(
        causal=draw(st.booleans()),
        causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])),
        scale=draw(SCALES),
        window=window_sides(draw),
        softcap=draw(st.sampled_from([None, None, 0.0, 0.5, 5.0, 30.0])),
        dropout_p=dropout,
        dropout_seed=draw(st.integers(0, 2**63 - 1)) if dropout else None,
        alibi_slopes=slopes,
        sinks=sinks,
    )


def all_keys_visible(opts: Options, masked: bool) -> bool:
    """Whether every row sees every key: only then may K and V hold NaN or Inf. The spec does
    not say whether a kernel reads keys a row cannot see (0 * NaN), so a NaN there has no
    single right answer."""
    return not (masked or opts.causal or opts.window is not None or opts.dropout_p > 0)


def tensor_layout(draw: st.DrawFn, specials: bool) -> Layout:
    return draw(layouts(allow_specials=specials))


# ---- masks --------------------------------------------------------------------------------
@st.composite
def masks(draw: st.DrawFn, target: tuple[int, ...], dtype: torch.dtype, min_ndim: int = 0) -> torch.Tensor:
    """A bool (True = attend) or additive mask broadcastable to target: any number of leading
    dims dropped, any dim 1 or full, any layout; some rows fully masked."""
    ndim = draw(st.integers(min_ndim, len(target)))
    shape = tuple(draw(st.sampled_from([1, size])) for size in target[len(target) - ndim :])
    layout = draw(layouts(allow_specials=False))
    generator = torch.Generator().manual_seed(layout.seed)
    if draw(st.booleans()):
        keep = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
        values = torch.rand(shape, generator=generator) < keep
        return make_tensor(shape, torch.bool, layout, values=values)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    masked = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    values = values.masked_fill(masked, -math.inf)
    special = draw(st.sampled_from([None, None, "huge", "nan", "inf"]))
    return make_tensor(shape, dtype, Layout(layout.kind, special, layout.seed), values=values)


def expand_mask(mask: torch.Tensor | None, target: tuple[int, int, int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(target)


def mask_hides_keys(mask: torch.Tensor | None) -> bool:
    if mask is None:
        return False
    return mask.dtype == torch.bool or bool(torch.isinf(mask).any()) or bool(torch.isnan(mask).any())


# ---- the oracle of fusedattn.attention / attention_varlen -----------------------------------
def oracle_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: Options, **tensors: Any) -> AttentionCall:
    """The AttentionCall the semantics define for these inputs, built without fusedattn's
    validation (so a normalization bug there cannot hide in the oracle)."""
    window = opts.window or (None, None)
    left, right = (None if side is None else min(side, WIDEST) for side in window)
    slopes = opts.alibi_slopes
    if slopes is not None:
        slopes = slopes.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    sinks = opts.sinks
    if sinks is not None:
        sinks = sinks.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return AttentionCall(
        q=q, k=k, v=v, scale=opts.scale if opts.scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        causal=opts.causal, causal_alignment=opts.causal_alignment, window_left=left, window_right=right,
        alibi_slopes=slopes, sinks=sinks, softcap=opts.softcap or None, dropout_p=opts.dropout_p,
        dropout_seed=opts.dropout_seed if opts.dropout_p else None, **tensors,
    )  # fmt: skip


def check_attention(
    call: AttentionCall,
    result: Any,
    return_lse: bool,
    grad_inputs: tuple[torch.Tensor, ...] | None = None,
    every_key_visible: bool = True,
) -> str | None:
    """Compare fusedattn's (out[, lse]) and, with grad_inputs (the leaves the call used),
    dq, dk, dv with the float64 reference and the same-precision reference.

    every_key_visible=False (masks, causal, window, key lengths or dropout hide pairs):
    whether a NaN or Inf in q reaches dk and dv through a hidden pair is not specified
    (docs/semantics.md, "NaN and Inf inputs"), so with a non-finite q their non-finite
    elements are not judged (their finite ones are)."""
    dtype = call.dtype
    out, lse = result if return_lse else (result, None)
    if not isinstance(out, torch.Tensor):
        return f"out: expected a tensor, got {type(out).__name__}"
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype) if grad_inputs is not None else None
    ref_out, ref_lse, ref_grads = reference_attention(call, torch.float64, grad_out)
    low_out, low_lse, low_grads = reference_attention(call, dtype, grad_out)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out_noise, lse_noise = logit_rounding_bounds(call, ref_out)
    failure = first_failure(
        compare("out", out, ref_out, low_out, dtype, expected_dtype=dtype, noise=out_noise),
        compare("lse", lse, ref_lse, low_lse, dtype, expected_dtype=lse_dtype, noise=lse_noise) if return_lse else None,
    )
    if failure or grad_inputs is None:
        return failure
    from fusedattn.backends.base import poisoned_outputs

    with poisoned_outputs():
        grads = torch.autograd.grad(out, grad_inputs, grad_out, allow_unused=True)
    if bool((torch.isfinite(ref_lse) & (ref_lse.abs() >= LSE_LIMIT)).any()):
        return None  # gradients not specified (docs/semantics.md, "Precision of the backward pass")
    # As fusedattn.testing.check_backend: a gradient that cancels to zero is judged against
    # the size of the terms that cancel.
    delta = (grad_out.double() * out.detach().double()).sum(-1).abs()
    largest = max(_finite_max(t.detach().double().abs()) for t in (call.q, call.k))
    scale = abs(call.scale) if math.isfinite(call.scale) else 1.0
    gradient_scale = max(_finite_max(delta) * scale * largest, *(_finite_max(g.abs()) for g in ref_grads))
    noise = flash_backward_bounds(call, grad_out, out, ref_out, ref_lse, ref_grads, lse)
    for name, actual, oracle, lowprec, leaf, bound in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads,
                                                          grad_inputs, noise):  # fmt: skip
        if actual is None:
            actual = torch.zeros_like(leaf)
        magnitude = 1.0
        if _finite_max(oracle.abs()) <= CANCELLED * gradient_scale:
            # Exact cancellation (every key alike, say): float64 leaves noise of ~1e-17 times
            # the terms, and a relative error of noise against noise means nothing. Judged
            # as the exact zero it is, against the size of the cancelled terms.
            # NaN and Inf stay where they are: only the finite noise is the cancelled zero.
            oracle = torch.where(torch.isfinite(oracle), torch.zeros_like(oracle), oracle)
            magnitude = gradient_scale
        unspecified = name != "dq" and not every_key_visible and not bool(torch.isfinite(call.q).all())
        failure = compare(name, actual, oracle, lowprec, dtype, expected_dtype=dtype, magnitude=magnitude,
                          nonfinite_unspecified=unspecified, noise=bound)  # fmt: skip
        if failure:
            return failure
    return None


CANCELLED = 1e-12
LSE_LIMIT = 2.0**24  # float32 cannot hold lse = max + log(sum) beyond


def _finite_max(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.max()) if finite.numel() else 0.0


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor requiring grad with tensor's exact strides (as fusedattn.testing does); an
    expanded view stays an expanded view of a leaf."""
    if 0 in tensor.stride():
        index = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride())
        return tensor.detach()[index].clone().requires_grad_(True).expand(tensor.shape)
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
    return copy.copy_(tensor.detach()).requires_grad_(True)


def empty_problem(q: torch.Tensor, seqlen_k: int) -> bool:
    return q.numel() == 0 or seqlen_k == 0
