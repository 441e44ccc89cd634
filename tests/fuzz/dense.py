"""fusedattn.attention, fusedattn.attention_varlen and fusedattn.scaled_dot_product_attention."""

from __future__ import annotations

import math
from typing import Any

import fusedattn
import torch
import torch.nn.functional as F
from fusedattn.semantics import MAX_HEAD_DIM
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import faults as fl
from .case import Case
from .oracle import compare
from .problem import (
    BACKENDS,
    SEQLENS,
    all_keys_visible,
    check_attention,
    empty_problem,
    expand_mask,
    leaf,
    mask_hides_keys,
    masks,
    options,
    oracle_call,
    sizes,
    tensor_layout,
)
from .tensors import float_dtypes, make_tensor

QKV = ("q", "k", "v")


def _pick_fault(draw: st.DrawFn, faults: list[fl.Fault], arguments: fl.Arguments) -> tuple[str | None, str | None]:
    """Half the cases are valid; the others get one fault. Returns (target, description)."""
    if draw(st.integers(0, 1)) == 0:
        return None, None
    before = dict(arguments.values)
    applied = faults[draw(st.integers(0, len(faults) - 1))](draw, arguments)
    if applied is None:  # the fault does not apply: whatever it changed is undone, the case stays valid
        arguments.values.clear()
        arguments.values.update(before)
        return None, None
    return applied


def _one_fault(
    backend: str, dtype: torch.dtype, target: str | None, fault: str | None, values: dict[str, Any]
) -> tuple[str, str | None, str | None]:
    """(backend, target, fault) with forcing the cpu backend for float64 as the fault.

    The cpu backend has no float64: forcing it is refused (UnsupportedCallError, a
    ValueError naming backend), empty problems included; only backend="auto" serves an
    empty problem with the reference whatever the dtype (docs/semantics.md). A case has one
    fault: when another one was drawn, the backend becomes reference."""
    if backend != "cpu" or dtype != torch.float64 or target == "backend":
        return backend, target, fault
    if target is None:
        return backend, "backend", "cpu forced for float64"
    if "backend" in values:
        values["backend"] = "reference"
    return "reference", target, fault


def _features(call: Any, extra: dict[str, bool]) -> frozenset[str]:
    return call.features() | {name for name, on in extra.items() if on}


# ---- fusedattn.attention ---------------------------------------------------------------------
@st.composite
def attention_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes())
    dtype = draw(float_dtypes())
    backend = draw(st.sampled_from(BACKENDS))
    opts = draw(options(s.heads_q, s.batch, dtype))
    target4 = (s.batch, s.heads_q, s.seqlen_q, s.seqlen_k)
    mask = draw(st.one_of(st.none(), st.none(), masks(target4, dtype)))
    key_lengths = None
    if draw(st.integers(0, 3)) == 0:
        values = torch.tensor([draw(st.integers(0, s.seqlen_k)) for _ in range(s.batch)], dtype=torch.int64)
        key_lengths = values.to(draw(st.sampled_from([torch.int32, torch.int64])))
    kv_specials = all_keys_visible(opts, mask_hides_keys(mask) or key_lengths is not None)
    q = make_tensor((s.batch, s.heads_q, s.seqlen_q, s.head_dim), dtype, tensor_layout(draw, True))
    k = make_tensor((s.batch, s.heads_kv, s.seqlen_k, s.head_dim), dtype, tensor_layout(draw, kv_specials))
    v = make_tensor((s.batch, s.heads_kv, s.seqlen_k, s.head_dim_v), dtype, tensor_layout(draw, kv_specials))
    return_lse = draw(st.booleans())
    values: dict[str, Any] = {"q": q, "k": k, "v": v, **opts.as_kwargs()}
    if mask is not None:
        values["attn_mask"] = mask
    if key_lengths is not None:
        values["key_lengths"] = key_lengths
    if return_lse:
        values["return_lse"] = True
    if backend != "auto" or draw(st.booleans()):
        values["backend"] = backend
    arguments = fl.Arguments(values, QKV)
    faults = [
        fl.wrong_dtype(QKV), fl.mismatched_dtype(("k", "v")), fl.wrong_rank(QKV), fl.not_a_tensor(QKV),
        fl.on_meta(("k", "v")), fl.resize("k", 0, lambda n: [n + 1], also=("v",)), fl.resize("v", 0, lambda n: [n + 1]),
        fl.resize("v", 2, lambda n: [n + 1, max(n - 1, 0)]), fl.resize("k", 3, lambda n: [n + 1, n - 1]),
        fl.resize("q", 3, lambda n: [0, MAX_HEAD_DIM + 1, 600], also=("k",)), fl.resize("v", 3, lambda n: [0, MAX_HEAD_DIM + 1]),
        fl.resize("k", 1, lambda n: _bad_heads(s.heads_q), also=("v",)),
        fl.resize("v", 1, lambda n: [n + 1]),
        fl.SCALE, fl.CAUSAL, fl.ALIGNMENT, fl.WINDOW, fl.SOFTCAP, fl.DROPOUT_P, fl.DROPOUT_SEED, fl.RETURN_LSE,
        fl.BACKEND, fl.alibi_faults(s.heads_q, s.batch), _mask_fault(target4, dtype),
        fl.int_tensor_faults("key_lengths", lambda a: (s.batch,), 0, s.seqlen_k),
    ]  # fmt: skip
    target, fault = _pick_fault(draw, faults, arguments)
    empty = empty_problem(q, s.seqlen_k)
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    grad = target is None and not empty and draw(st.integers(0, 7)) == 0
    if grad:
        values.update(q=leaf(q), k=leaf(k), v=leaf(v))
    call = oracle_call(
        q, k, v, opts, attn_mask=expand_mask(mask, target4),
        key_lengths=None if key_lengths is None else key_lengths.to(torch.int32),
    )  # fmt: skip
    if grad:
        call = call.with_tensors(needs_grad=True)
    leaves = (values["q"], values["k"], values["v"]) if grad else None
    args, kwargs = arguments.split()
    return Case(
        entry="attention", function=fusedattn.attention, args=args, kwargs=kwargs, backend=backend,
        check=lambda result: check_attention(call, result, return_lse, leaves, kv_specials),
        features=_features(call, {"empty": empty, "strided": _strided(q, k, v)}), target=target, fault=fault,
    )  # fmt: skip


def _bad_heads(heads_q: int, zero: bool = True) -> list[int]:
    """KV head counts that Hq is not a multiple of. With Hq = 0 there is none (0 is a
    multiple of every count; Hkv = 0 with Hq = 0 is an empty problem, not a fault)."""
    if heads_q == 0:
        return []
    return [heads_q + 1, 0] if zero else [heads_q + 1]


def _strided(*tensors: torch.Tensor) -> bool:
    return any(not t.is_contiguous() or t.storage_offset() for t in tensors)


def _mask_fault(target4: tuple[int, int, int, int], dtype: torch.dtype) -> fl.Fault:
    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str]:
        kind = draw(st.sampled_from(["dtype", "shape", "rank", "device", "list"]))
        if kind == "dtype":
            bad = draw(st.sampled_from([d for d in (torch.int32, torch.uint8, torch.float16, torch.float64,
                                                     torch.float32, torch.bfloat16) if d != dtype]))  # fmt: skip
            a.values["attn_mask"] = torch.zeros(target4, dtype=bad)
        elif kind == "shape":
            dim = draw(st.integers(0, 3))
            shape = list(target4)
            # + 2 when the size is 0: a 1 would broadcast to it, which is valid.
            shape[dim] = target4[dim] + draw(st.sampled_from([1, 2] if target4[dim] else [2]))
            a.values["attn_mask"] = torch.ones(shape, dtype=torch.bool)
        elif kind == "rank":
            a.values["attn_mask"] = torch.ones((1, *target4), dtype=torch.bool)
        elif kind == "device":
            a.values["attn_mask"] = torch.ones(target4, dtype=torch.bool, device="meta")
        else:
            a.values["attn_mask"] = [[True]]
        return "attn_mask", kind

    return fault


# ---- fusedattn.attention_varlen ----------------------------------------------------------------
def _offsets(lengths: list[int]) -> list[int]:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets


def offset_rule_target(offsets: list[int], total: int, longest_allowed: int, side: str) -> str | None:
    """Which argument an offsets list breaks (docs/semantics.md), checked independently of
    fusedattn: cu_seqlens_<side> for the offset rules, max_seqlen_<side> for a sequence
    longer than it, None when valid."""
    if not offsets or offsets[0] != 0 or offsets[-1] != total:
        return f"cu_seqlens_{side}"
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        return f"cu_seqlens_{side}"
    if any(b - a > longest_allowed for a, b in zip(offsets, offsets[1:])):
        return f"max_seqlen_{side}"
    return None


def _offset_fault(side: str) -> fl.Fault:
    name = f"cu_seqlens_{side}"

    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str] | None:
        cu = a.values[name]
        kind = draw(st.sampled_from(["first", "last", "decreasing", "huge", "dtype", "shape", "device", "count"]))
        offsets = cu.tolist()
        total = a.facts[f"total_{side}"]
        if kind == "first":
            offsets[0] = draw(st.sampled_from([1, -1, 3, 2**31 - 1]))
        elif kind == "last":
            offsets[-1] = offsets[-1] + draw(st.sampled_from([1, -1, 4000]))
        elif kind == "decreasing" and len(offsets) >= 3:
            offsets[1] = offsets[-1] + draw(st.integers(1, 5))
        elif kind == "huge" and len(offsets) >= 2:
            offsets[draw(st.integers(1, len(offsets) - 1))] = draw(st.sampled_from([2**31 - 1, 2**32 + 4, 2**40]))
        elif kind == "dtype":
            a.values[name] = cu.to(draw(st.sampled_from([torch.float32, torch.int16, torch.bool, torch.uint8])))
            return name, "dtype"
        elif kind == "shape":
            a.values[name] = draw(st.sampled_from([cu[None], cu.new_zeros(0), cu[0]]))
            return name, f"shape {tuple(a.values[name].shape)}"
        elif kind == "device":
            a.values[name] = cu.to("meta")
            return name, "on the meta device"
        elif kind == "count" and side == "k":
            a.values[name] = torch.cat([cu, cu[-1:]])
            return name, "one offset more than cu_seqlens_q"
        else:
            return None
        dtype = torch.int64 if any(not -(2**31) <= o < 2**31 for o in offsets) else cu.dtype
        a.values[name] = torch.tensor(offsets, dtype=dtype)
        target = offset_rule_target(offsets, total, a.values[f"max_seqlen_{side}"], side)
        return (target, f"offsets {offsets}") if target else None

    return fault


def _max_seqlen_fault(side: str) -> fl.Fault:
    name = f"max_seqlen_{side}"

    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str] | None:
        longest = a.facts[f"longest_{side}"]
        choices: list[Any] = [-1, -(2**40), 2.0, "4", None, True, torch.tensor(4)]
        if longest > 0:
            choices.append(longest - 1)
        a.values[name] = draw(st.sampled_from(choices))
        return name, repr(a.values[name])

    return fault


@st.composite
def varlen_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes(max_batch=0))
    count = draw(st.integers(0, 3))
    lengths_q = [draw(st.one_of(st.integers(0, 6), SEQLENS)) for _ in range(count)]
    lengths_k = [draw(st.one_of(st.integers(0, 8), SEQLENS)) for _ in range(count)]
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    dtype = draw(float_dtypes())
    backend = draw(st.sampled_from(BACKENDS))
    opts = draw(options(s.heads_q, count, dtype))
    kv_specials = all_keys_visible(opts, False)
    q = make_tensor((total_q, s.heads_q, s.head_dim), dtype, tensor_layout(draw, True))
    k = make_tensor((total_k, s.heads_kv, s.head_dim), dtype, tensor_layout(draw, kv_specials))
    v = make_tensor((total_k, s.heads_kv, s.head_dim_v), dtype, tensor_layout(draw, kv_specials))
    offset_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    cu_q, cu_k = (torch.tensor(_offsets(n), dtype=offset_dtype) for n in (lengths_q, lengths_k))
    extra = st.sampled_from([0, 0, 1, 7, 2**31, 2**62])
    max_q, max_k = max(lengths_q, default=0) + draw(extra), max(lengths_k, default=0) + draw(extra)
    return_lse = draw(st.booleans())
    values: dict[str, Any] = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
                              "max_seqlen_q": max_q, "max_seqlen_k": max_k, **opts.as_kwargs()}  # fmt: skip
    if return_lse:
        values["return_lse"] = True
    if backend != "auto" or draw(st.booleans()):
        values["backend"] = backend
    positional = (*QKV, "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    facts = {"total_q": total_q, "total_k": total_k, "longest_q": max(lengths_q, default=0),
             "longest_k": max(lengths_k, default=0)}  # fmt: skip
    arguments = fl.Arguments(values, positional, facts)
    faults = [
        fl.wrong_dtype(QKV), fl.mismatched_dtype(("k", "v")), fl.wrong_rank(QKV), fl.not_a_tensor(QKV),
        fl.on_meta(("k", "v")), fl.resize("v", 0, lambda n: [n + 1]), fl.resize("k", 2, lambda n: [n + 1]),
        fl.resize("q", 2, lambda n: [0, MAX_HEAD_DIM + 1], also=("k",)), fl.resize("v", 2, lambda n: [0, 600]),
        fl.resize("k", 1, lambda n: _bad_heads(s.heads_q), also=("v",)),
        _offset_fault("q"), _offset_fault("k"), _max_seqlen_fault("q"), _max_seqlen_fault("k"),
        fl.SCALE, fl.CAUSAL, fl.ALIGNMENT, fl.WINDOW, fl.SOFTCAP, fl.DROPOUT_P, fl.DROPOUT_SEED, fl.RETURN_LSE,
        fl.BACKEND, fl.alibi_faults(s.heads_q, count),
    ]  # fmt: skip
    target, fault = _pick_fault(draw, faults, arguments)
    empty = q.numel() == 0 or total_k == 0
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    grad = target is None and not empty and draw(st.integers(0, 7)) == 0
    if grad:
        values.update(q=leaf(q), k=leaf(k), v=leaf(v))
    call = oracle_call(
        q, k, v, opts, cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=min(max_q, total_q), max_seqlen_k=min(max_k, total_k), needs_grad=grad,
    )  # fmt: skip
    leaves = (values["q"], values["k"], values["v"]) if grad else None
    args, kwargs = arguments.split()
    return Case(
        entry="attention_varlen", function=fusedattn.attention_varlen, args=args, kwargs=kwargs, backend=backend,
        check=lambda result: check_attention(call, result, return_lse, leaves, kv_specials),
        features=_features(call, {"empty": empty, "empty_sequence": 0 in lengths_q + lengths_k,
                                  "strided": _strided(q, k, v)}),
        target=target, fault=fault,
    )  # fmt: skip


# ---- fusedattn.scaled_dot_product_attention (torch's signature; torch is the oracle) -----------
SDPA_NAMES = ("query", "key", "value")
SDPA_ALIASES = {"query": ("q",), "key": ("k",), "value": ("v",), "is_causal": ("causal",)}


@st.composite
def sdpa_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes())
    dtype = draw(float_dtypes())
    backend = draw(st.sampled_from(BACKENDS))
    three_d = draw(st.integers(0, 3)) == 0
    enable_gqa = s.heads_q != s.heads_kv or draw(st.booleans())
    if three_d:
        s.heads_q = s.heads_kv = 1
    full = (s.batch, s.heads_q, s.seqlen_q, s.seqlen_k)
    # torch refuses masks of fewer than 2 dims (IndexError), a torch limitation, not a rule.
    mask = draw(st.one_of(st.none(), masks(full[:1] + full[2:] if three_d else full, dtype, min_ndim=2)))
    is_causal = mask is None and draw(st.booleans())
    kv_specials = mask is None and not is_causal
    shapes = [(s.batch, s.heads_q, s.seqlen_q, s.head_dim), (s.batch, s.heads_kv, s.seqlen_k, s.head_dim),
              (s.batch, s.heads_kv, s.seqlen_k, s.head_dim_v)]  # fmt: skip
    if three_d:
        shapes = [(shape[0], *shape[2:]) for shape in shapes]
    query = make_tensor(shapes[0], dtype, tensor_layout(draw, True))
    key = make_tensor(shapes[1], dtype, tensor_layout(draw, kv_specials))
    value = make_tensor(shapes[2], dtype, tensor_layout(draw, kv_specials))
    values: dict[str, Any] = {"query": query, "key": key, "value": value}
    if mask is not None:
        values["attn_mask"] = mask
    if is_causal:
        values["is_causal"] = True
    scale = draw(st.sampled_from([None, None, 0.125, 2.0, -0.5]))
    if scale is not None:
        values["scale"] = scale
    if enable_gqa:
        values["enable_gqa"] = True
    arguments = fl.Arguments(values, SDPA_NAMES)
    sdpa_faults = [
        fl.wrong_dtype(SDPA_NAMES), fl.mismatched_dtype(("key", "value")), fl.not_a_tensor(SDPA_NAMES),
        fl.resize("key", -1, lambda n: [n + 1]), fl.resize("value", -2, lambda n: [n + 1]),
        fl.option("dropout_p", [-0.5, 1.5, math.nan, "0.1"]), fl.option("scale", ["0.5", [1.0]]),
        _sdpa_mask_fault(full, three_d),
    ]  # fmt: skip
    if not three_d:
        sdpa_faults.append(fl.resize("key", 1, lambda n: _bad_heads(s.heads_q, zero=False), also=("value",)))
    target, fault = _pick_fault(draw, sdpa_faults, arguments)
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    args, kwargs = arguments.split()

    def torch_oracle() -> BaseException | None:
        try:
            F.scaled_dot_product_attention(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (torch's refusal, whatever its class)
            return error
        return None

    # torch decides what is a fault, as for MultiheadAttention: a drawn fault torch accepts
    # (an empty problem, attn_mask with is_causal on its fused CPU kernel, a negative
    # dropout_p on its math kernel) makes a valid case, judged on its result. Not key and
    # value lengths that differ: torch's fused CPU kernel does not check them, and returns
    # garbage (docs/swap-in.md); fusedattn refuses them.
    query_arg, key_arg, value_arg = args
    lengths_differ = (
        all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in args)
        and key_arg.shape[-2] != value_arg.shape[-2]
        and query_arg.shape[-2] != 0  # torch returns zeros for empty problems before any check
        and value_arg.numel() != 0
    )
    if target is not None and target != "backend" and not lengths_differ and torch_oracle() is None:
        target, fault = None, None

    return Case(
        entry="scaled_dot_product_attention", function=fusedattn.scaled_dot_product_attention, args=args,
        kwargs=kwargs, backend=backend, backend_by_environment=True, check=lambda out: _check_sdpa(args, kwargs, out),
        features=frozenset({f"{'3d' if three_d else '4d'}", "causal_top_left" if is_causal else "",
                            "mask" if mask is not None else "", "gqa" if s.heads_q != s.heads_kv else "",
                            "empty" if empty_problem(query, s.seqlen_k) else ""}) - {""},
        target=target, fault=fault, aliases=SDPA_ALIASES, torch_oracle=torch_oracle,
    )  # fmt: skip


def _sdpa_mask_fault(full: tuple[int, int, int, int], three_d: bool) -> fl.Fault:
    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str]:
        kind = draw(st.sampled_from(["dtype", "shape", "with_causal"]))
        shape = (full[0], full[2], full[3]) if three_d else full
        if kind == "dtype":
            a.values["attn_mask"] = torch.zeros(shape, dtype=draw(st.sampled_from([torch.int32, torch.uint8])))
        elif kind == "shape":
            bad = list(shape)
            bad[-1] += 2  # +1 would broadcast when S is 0
            a.values["attn_mask"] = torch.ones(bad, dtype=torch.bool)
        else:
            a.values["attn_mask"] = torch.ones(shape, dtype=torch.bool)
            a.values["is_causal"] = True
        return "attn_mask", kind

    return fault


def _fully_masked_rows(
    out_shape: tuple[int, ...], kwargs: dict[str, Any], key: torch.Tensor, query: torch.Tensor
) -> torch.Tensor:
    """(..., L, 1) True where every score of torch's row is -inf (torch gives NaN there,
    fusedattn 0 by design, docs/semantics.md): Sk = 0, a mask or is_causal hiding every
    key, a float mask whose -inf entries cover the row, or scores that are -inf by value
    (an Inf in the query against keys of one sign). A score that is NaN or +inf is not
    masked: the row is NaN by IEEE arithmetic, in both."""
    if key.shape[-2] == 0:
        return torch.ones(out_shape[:-1], dtype=torch.bool)[..., None]
    if math.prod(out_shape) == 0:  # no rows (0 query heads with enable_gqa, say)
        return torch.zeros(out_shape[:-1], dtype=torch.bool)[..., None]
    q, k = query.double(), key.double()
    if k.dim() == q.dim() and k.dim() >= 3 and 0 < k.shape[-3] < q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # enable_gqa (else: broadcast)
    scale = kwargs.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    elif mask is not None:
        scores = scores + mask.double()
    if kwargs.get("is_causal"):
        length_q, length_k = scores.shape[-2:]
        visible = torch.ones(length_q, length_k, dtype=torch.bool).tril()
        scores = scores.masked_fill(~visible, -math.inf)
    return (scores == -math.inf).all(-1).expand(out_shape[:-1])[..., None]


def _math_kwargs(kwargs: dict[str, Any], query: torch.Tensor, key: torch.Tensor) -> dict[str, Any]:
    """kwargs for torch's math kernel, which refuses attn_mask with is_causal (its fused CPU
    kernel applies both): the causal mask folded into attn_mask."""
    mask = kwargs.get("attn_mask")
    if not kwargs.get("is_causal") or mask is None:
        return kwargs
    visible = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).tril()
    mask = mask & visible if mask.dtype == torch.bool else mask.masked_fill(~visible, -math.inf)
    return {**kwargs, "attn_mask": mask, "is_causal": False}


def _check_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> str | None:
    query, key, value = args
    if query.shape[-2] == 0 or value.numel() == 0:
        # torch returns zeros (..., L, Ev) here, before any other check.
        zeros = query.new_zeros(*query.shape[:-1], value.shape[-1])
        return compare("out", out, zeros.double(), zeros, query.dtype, expected_dtype=query.dtype)
    kwargs = _math_kwargs(kwargs, query, key)
    wide = {name: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
            for name, v in kwargs.items()}  # fmt: skip
    # torch's math kernel is the oracle: its fused CPU kernel is not IEEE on NaN and Inf (a
    # NaN in the query gives a finite row; a negative scale with is_causal gives NaN rows).
    with sdpa_kernel(SDPBackend.MATH):
        oracle = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), **wide)
        lowprec = F.scaled_dot_product_attention(query, key, value, **kwargs)
    rows = _fully_masked_rows(tuple(oracle.shape), kwargs, key, query)
    oracle, lowprec = oracle.masked_fill(rows, 0.0), lowprec.masked_fill(rows, 0.0)
    return compare("out", out, oracle, lowprec, query.dtype, expected_dtype=query.dtype)
