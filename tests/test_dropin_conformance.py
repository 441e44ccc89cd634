"""The torch drop-ins against the installed torch, on a generated grid of calls (issue 22).

fusedattn.scaled_dot_product_attention and fusedattn.nn.MultiheadAttention take torch's
arguments. Every call of the grid, valid or not, runs through torch and through the
drop-in, and torch decides: where torch returns, the drop-in returns the same result
(within the dtype's tolerance; with dropout, which draws other random masks, the same
shape and finite values) and, where the call asks for them, the same gradients; where
torch raises, the drop-in raises an instance of torch's exception class, with a message
that names an argument. The differences docs/swap-in.md lists are asserted as such, so a
torch release that changes one shows up here.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fusedattn
import fusedattn.nn
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

N, H, L, S, E, EV = 2, 2, 3, 4, 4, 5  # batch, heads, query and key lengths, head dims
KDIM, VDIM = 5, 3
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, *FLOATS, torch.complex64)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "attn_mask", "is_causal", "in_proj", "weight", "bias")


@dataclass
class Call:
    """One call of the grid: the same args and kwargs go to torch and to the drop-in."""

    label: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: bool = False  # also compare the gradients of a random projection of the outputs
    random: bool = False  # dropout: compare shapes and finiteness only
    module: dict[str, Any] = field(default_factory=dict)  # MultiheadAttention's constructor options
    training: bool = False
    no_grad: bool = False  # run both under torch.no_grad() (torch's MHA fast path)
    change: Callable[[torch.nn.Module], None] | None = None  # applied to both modules after loading
    torch_nan_rows: bool = False  # torch gives NaN on fully masked rows here (docs/swap-in.md)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.7
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 3, shape, generator=generator).to(dtype)


def _mask(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 7, attend: bool = True) -> torch.Tensor:
    """A random mask that leaves every row a visible key (key 0): bool True = attend for SDPA
    (attend=True), True = ignore for MultiheadAttention (attend=False); float additive."""
    mask = _tensor(shape, dtype, seed)
    if len(shape) and shape[-1] > 0:
        if dtype == torch.bool:
            mask[..., 0] = attend
        elif dtype.is_floating_point:
            mask[..., 0] = 0
    return mask


# ---- scaled_dot_product_attention ------------------------------------------------------------
def _lead(rank: int, heads: int = H) -> tuple[int, ...]:
    """The dims before (length, head dim) of a rank-`rank` input; dim -3 holds the heads."""
    return {1: (), 2: (), 3: (heads,), 4: (N, heads), 5: (N, 3, heads)}[rank]


def _qkv(
    rank: int,
    dtype: torch.dtype = torch.float32,
    lengths: tuple[int, int] = (L, S),
    heads: tuple[int, int, int] = (H, H, H),
    dims: tuple[int, int] = (E, EV),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if rank == 1:
        return _tensor((dims[0],), dtype, 1), _tensor((dims[0],), dtype, 2), _tensor((dims[1],), dtype, 3)
    shapes = (
        _lead(rank, heads[0]) + (lengths[0], dims[0]),
        _lead(rank, heads[1]) + (lengths[1], dims[0]),
        _lead(rank, heads[2]) + (lengths[1], dims[1]),
    )
    return tuple(_tensor(shape, dtype, seed) for seed, shape in enumerate(shapes, 1))  # type: ignore[return-value]


def sdpa_calls() -> list[Call]:
    calls: list[Call] = []

    def add(label: str, qkv: tuple[Any, ...], grad: bool = False, random: bool = False, **kwargs: Any) -> None:
        calls.append(Call(label, tuple(qkv), kwargs, grad=grad, random=random))

    for rank, dtype, causal, lengths, dims in itertools.product(
        range(1, 6), FLOATS, (False, True), ((L, S), (S, L)), ((E, EV), (E, E))
    ):
        add(f"rank {rank} {dtype} is_causal={causal} L,S={lengths} dims {dims}", _qkv(rank, dtype, lengths, dims=dims),
            grad=dtype == torch.float64, is_causal=causal)  # fmt: skip
    # torch's fused CPU kernel takes 4-D inputs of one head dim (E == Ev), its math kernel the rest.
    for rank, dims in ((2, (E, EV)), (3, (E, EV)), (4, (E, EV)), (4, (E, E)), (5, (E, EV))):
        lead = _lead(rank)
        mask_shapes = {lead + (L, S), (L, S), (S,), (1, S), (L, 1), (), (1,) * len(lead) + (L, S), (3, *lead, L, S),
                  lead[:1] + (1,) * len(lead[1:]) + (L, S), (L, S + 2), (L + 2, S), (2, 1) + (L, S)}  # fmt: skip
        for shape, dtype, causal in itertools.product(sorted(mask_shapes), (torch.bool, torch.float64), (False, True)):
            add(f"rank {rank} dims {dims} attn_mask {dtype} {shape} is_causal={causal}",
                _qkv(rank, torch.float64, dims=dims),
                grad=True, attn_mask=_mask(shape, dtype), is_causal=causal)  # fmt: skip
    for mask_dtype, dtype, causal, dims in itertools.product(MASK_DTYPES, FLOATS, (False, True), ((E, EV), (E, E))):
        add(f"attn_mask {mask_dtype} with {dtype} query is_causal={causal} dims {dims}", _qkv(4, dtype, dims=dims),
            attn_mask=_mask((L, S), mask_dtype), is_causal=causal)  # fmt: skip
    big = torch.full((L, S), -1e9)
    big[0, 1:] = -1e5  # finite entries beyond float16's range: torch adds them in float32
    for dtype, dims in itertools.product((torch.float16, torch.bfloat16), ((E, EV), (E, E))):
        add(f"float32 mask beyond {dtype}'s range, dims {dims}", _qkv(4, dtype, dims=dims), attn_mask=big)
    for rank, (row, fill) in itertools.product((3, 4), ((False, torch.bool), (-math.inf, torch.float32))):
        mask = torch.ones(L, S, dtype=torch.bool) if fill == torch.bool else torch.zeros(L, S)
        mask[1] = row
        add(f"rank {rank} fully masked row ({fill})", _qkv(rank), attn_mask=mask)
    for (rank, dims), p in itertools.product(((3, (E, EV)), (4, (E, EV)), (4, (E, E))),
                                             (0.0, 0.5, 1.0, -0.5, 1.5, math.nan, "0.1", 1, True, None)):  # fmt: skip
        add(f"rank {rank} dims {dims} dropout_p={p!r}", _qkv(rank, dims=dims),
            random=isinstance(p, float) and 0 < p < 1, dropout_p=p)  # fmt: skip
    for scale in (None, 0.5, -1.0, 0.0, 2, "0.5", [1.0], True):
        add(f"scale={scale!r}", _qkv(4, torch.float64), grad=True, scale=scale)
    heads_grid = ((4, 2, 2), (4, 1, 1), (4, 2, 1), (4, 3, 3), (4, 2, 4), (4, 4, 4), (2, 4, 4), (4, 4, 2), (3, 2, 2))
    for rank, heads, gqa in itertools.product((2, 3, 4, 5), heads_grid, (False, True)):
        if rank == 2 and heads != (4, 2, 2):
            continue
        add(f"rank {rank} heads {heads} enable_gqa={gqa}", _qkv(rank, torch.float64, heads=heads), grad=True,
            enable_gqa=gqa)  # fmt: skip
    for gqa, causal in itertools.product((False, True), (False, True)):
        for dims in ((E, EV), (E, E)):
            add(f"GQA (4, 2, 2) dims {dims} with (N, 1, L, S) mask, is_causal={causal} enable_gqa={gqa}",
                _qkv(4, torch.float64, heads=(4, 2, 2), dims=dims), grad=True,
                attn_mask=_mask((N, 1, L, S), torch.bool), is_causal=causal, enable_gqa=gqa)  # fmt: skip
    f32, f16, f64 = torch.float32, torch.float16, torch.float64
    for rank, dtypes in itertools.product((3, 4), ((f32, f16, f32), (f32, f32, f64), (f16, f32, f32),
                                                   (torch.bfloat16, f16, f16), (torch.int64,) * 3,
                                                   (torch.int32,) * 3, (torch.complex64,) * 3, (torch.bool,) * 3)):  # fmt: skip
        add(f"rank {rank} dtypes {dtypes}", tuple(t.to(d) for t, d in zip(_qkv(rank), dtypes)))
    q, k, v = _qkv(4)
    shapes = {
        "key on meta": (q, k.to("meta"), v.to("meta")),
        "head dims 4 and 3": (q, k[..., :3], v),
        "value length 5": (q, k, _tensor((N, H, S + 1, EV))),
        "key batch 3": (q, _tensor((3, H, S, E)), _tensor((3, H, S, EV))),
        "key batch 1 (broadcast)": (q, k[:1], v[:1]),
        "query batch 1 (broadcast)": (q[:1], k, v),
        "key heads 1 (broadcast)": (q, k[:, :1], v[:, :1]),
        "query 3-D, key 4-D": (q[0], k, v),
        "query 4-D, key 3-D": (q, k[0], v[0]),
        "query 4-D, key 2-D": (q, k[0, 0], v[0, 0]),
        "query 5-D, key 4-D": (q[None].expand(2, -1, -1, -1, -1), k, v),
        "head dim 0": _qkv(4, dims=(0, EV)),
        "value head dim 0": _qkv(4, dims=(E, 0)),
        "L 0": _qkv(4, lengths=(0, S)),
        "S 0": _qkv(4, lengths=(L, 0)),
        "N 0": (q[:0], k[:0], v[:0]),
        "non-contiguous": (q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(-1, -2).contiguous().mT, v),
        "head dims 600": _qkv(4, dims=(600, 600)),
    }
    # torch returns zeros, before most checks, when there is no query row or no value.
    qe, ke, ve = _qkv(4, dims=(E, E))
    m = _mask((L, S), torch.bool)
    empties = {
        "L 0": (qe[:, :, :0], ke, ve), "S 0": (qe, ke[:, :, :0], ve[:, :, :0]), "N 0": (qe[:0], ke[:0], ve[:0]),
        "value head dim 0": (qe, ke, ve[..., :0]), "head dim 0": (qe[..., :0], ke[..., :0], ve),
        "heads 0": (qe[:, :0], ke[:, :0], ve[:, :0]), "key batch 0": (qe, ke[:0], ve[:0]),
    }  # fmt: skip
    faults = {"": {}, "with is_causal and a mask": {"is_causal": True, "attn_mask": m}, "dropout_p 1.5": {"dropout_p": 1.5},
              "with a 1-D mask": {"attn_mask": m[0]}, "with a mask of 2 extra rows": {"attn_mask": torch.ones(L + 2, S, dtype=torch.bool)},
              "with key head dim 3": "key", "with an int64 mask": {"attn_mask": m.long()}}  # fmt: skip
    for (name, (qx, kx, vx)), (fault, kwargs) in itertools.product(empties.items(), faults.items()):
        if kwargs == "key":
            kx, kwargs = kx[..., :3], {}
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() and (qx.shape[-2], kx.shape[-2]) != (L, S):
            kwargs = {
                **kwargs,
                "attn_mask": mask[..., : qx.shape[-2], : kx.shape[-2]] if mask.dim() == 2 else mask[: kx.shape[-2]],
            }
        add(f"{name} {fault}", (qx, kx, vx), **kwargs)
    for (name, qkv), causal in itertools.product(shapes.items(), (False, True)):
        add(f"{name} is_causal={causal}", qkv, is_causal=causal)
    others = {"query list": ([[1.0]], k, v), "key None": (q, None, v), "value float": (q, k, 1.0)}
    for name, qkv in others.items():
        add(name, qkv)
    for name, kwargs in {"attn_mask list": {"attn_mask": [[True] * S] * L}, "attn_mask str": {"attn_mask": "mask"},
                         "is_causal 1": {"is_causal": 1}, "is_causal None": {"is_causal": None},
                         "enable_gqa 1": {"enable_gqa": 1}, "attn_mask 0-D float": {"attn_mask": torch.tensor(0.5)}
                         }.items():  # fmt: skip
        add(name, (q, k, v), **kwargs)
    for factory, lengths, size, causal, rank in itertools.product(
        (causal_upper_left, causal_lower_right), ((L, S), (S, L), (L, L)), ("same", "other", "one row"),
        (False, True), (3, 4),
    ):  # fmt: skip
        bias_size = {"same": lengths, "other": (lengths[0], lengths[1] + 1), "one row": (1, lengths[1])}[size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # causal_lower_right warns when L > S
            bias = factory(*bias_size)
        add(f"rank {rank} {factory.__name__}{bias_size} for L,S={lengths} is_causal={causal}",
            _qkv(rank, torch.float64, lengths), grad=True, attn_mask=bias, is_causal=causal)  # fmt: skip
    for factory, lengths in itertools.product((causal_upper_left, causal_lower_right), ((L, S), (L, L))):
        q, k, v = _qkv(4, lengths=lengths)
        add(f"{factory.__name__} with key float16", (q, k.half(), v), attn_mask=factory(*lengths))
    return calls


# ---- nn.MultiheadAttention -----------------------------------------------------------------
def _inputs(kind: str, batch_first: bool, dims: tuple[int, int] = (E, E), dtype: torch.dtype = torch.float32):
    def make(length: int, features: int, seed: int) -> torch.Tensor:
        if kind == "unbatched":
            return _tensor((length, features), dtype, seed)
        return _tensor((N, length, features) if batch_first else (length, N, features), dtype, seed)

    query = make(L, E, 1)
    if kind == "self":
        return query, query, query
    return query, make(S, dims[0], 2), make(S, dims[1], 3)


def _mha_masks(lq: int, lk: int) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
    """key_padding_mask forms (batched, unbatched) and attn_mask forms for L = lq, S = lk."""
    padding = {
        None: None, "bool (N, S)": _mask((N, lk), torch.bool, attend=False), "float (N, S)": _mask((N, lk), torch.float32),
        "float64 (N, S)": _mask((N, lk), torch.float64), "uint8 (N, S)": torch.zeros(N, lk, dtype=torch.uint8),
        "int64 (N, S)": torch.zeros(N, lk, dtype=torch.int64), "bool (N, S + 1)": torch.zeros(N, lk + 1, dtype=torch.bool),
        "bool (S,)": torch.zeros(lk, dtype=torch.bool), "bool (1, S)": torch.zeros(1, lk, dtype=torch.bool),
        "bool (N, 1, S)": torch.zeros(N, 1, lk, dtype=torch.bool),
    }  # fmt: skip
    unbatched = {None: None, "bool (S,)": _mask((lk,), torch.bool, attend=False), "float (S,)": _mask((lk,), torch.float32),
                 "uint8 (S,)": torch.zeros(lk, dtype=torch.uint8), "bool (1, S)": torch.zeros(1, lk, dtype=torch.bool),
                 "bool (S + 1,)": torch.zeros(lk + 1, dtype=torch.bool)}  # fmt: skip
    masks = {
        None: None, "bool (L, S)": _mask((lq, lk), torch.bool, attend=False), "float (L, S)": _mask((lq, lk), torch.float32),
        "bool (N*H, L, S)": _mask((N * H, lq, lk), torch.bool, attend=False),
        "float (N*H, L, S)": _mask((N * H, lq, lk), torch.float32),
        "bool (1, L, S)": _mask((1, lq, lk), torch.bool, attend=False),
        "bool (H, L, S)": _mask((H, lq, lk), torch.bool, attend=False), "bool (S,)": torch.zeros(lk, dtype=torch.bool),
        "bool (1, S)": torch.zeros(1, lk, dtype=torch.bool), "bool (L, 1)": torch.zeros(lq, 1, dtype=torch.bool),
        "int64 (L, S)": torch.zeros(lq, lk, dtype=torch.int64), "uint8 (L, S)": torch.zeros(lq, lk, dtype=torch.uint8),
        "bool (1, 1, L, S)": torch.zeros(1, 1, lq, lk, dtype=torch.bool), "float64 (L, S)": _mask((lq, lk), torch.float64),
        "float16 (L, S)": _mask((lq, lk), torch.float16), "bool (L, S + 1)": torch.zeros(lq, lk + 1, dtype=torch.bool),
        "causal (L, S)": torch.ones(lq, lk, dtype=torch.bool).triu(1),
    }  # fmt: skip
    return padding, unbatched, masks


def _set(name: str, dtype: torch.dtype) -> Callable[[torch.nn.Module], None]:
    """Give a module's parameter `name` (dotted) another dtype."""

    def change(module: torch.nn.Module) -> None:
        owner, _, attribute = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        setattr(target, attribute, torch.nn.Parameter(getattr(target, attribute).detach().to(dtype)))

    return change


def mha_calls() -> list[Call]:
    calls: list[Call] = []
    weights_options = ({"need_weights": False}, {"need_weights": True}, {"average_attn_weights": False})
    for batch_first, dims, bias, bias_kv, zero_attn in itertools.product(
        (False, True), ((E, E), (KDIM, VDIM)), (True, False), (False, True), (False, True)
    ):
        module = dict(batch_first=batch_first, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
        if dims != (E, E):
            module.update(kdim=dims[0], vdim=dims[1])
        for kind, weights in itertools.product(("self", "cross", "unbatched"), weights_options):
            if kind == "self" and dims != (E, E):
                continue
            calls.append(Call(f"{module} {kind} {weights}", _inputs(kind, batch_first, dims), dict(weights),
                              grad=True, module=module))  # fmt: skip
    for batch_first, kind in ((True, "self"), (False, "cross"), (True, "unbatched")):
        padding, unbatched_padding, masks = _mha_masks(L, L if kind == "self" else S)
        paddings = unbatched_padding if kind == "unbatched" else padding
        for (pad_name, pad), (mask_name, mask), need_weights, causal in itertools.product(
            paddings.items(), masks.items(), (False, True), (False, True)
        ):
            if not batch_first and pad_name not in (None, "bool (N, S)", "float (N, S)", "uint8 (N, S)"):
                continue
            kwargs: dict[str, Any] = {"need_weights": need_weights, "is_causal": causal}
            if pad is not None:
                kwargs["key_padding_mask"] = pad
            if mask is not None:
                kwargs["attn_mask"] = mask
            calls.append(Call(f"{kind} batch_first={batch_first} key_padding_mask {pad_name} attn_mask {mask_name} "
                              f"need_weights={need_weights} is_causal={causal}", _inputs(kind, batch_first), kwargs,
                              module={"batch_first": batch_first}))  # fmt: skip
    query, key, value = _inputs("cross", True)
    wrong = {
        "query 3-D, key and value 2-D": (query, key[0], value[0]), "query 2-D, key 3-D": (query[0], key, value),
        "query 4-D": (query[None], key[None], value[None]), "query 1-D": (query[0, 0], key[0, 0], value[0, 0]),
        "query embed 5": (_tensor((N, L, E + 1)), key, value), "value length 5": (query, key, _tensor((N, S + 1, E))),
        "key batch 3": (query, _tensor((3, S, E)), _tensor((3, S, E))), "query float64": (query.double(), key, value),
        "query float16": (query.half(), key, value), "key float64": (query, key.double(), value.double()),
        "query int64": (query.long(), key.long(), value.long()), "value int64": (query, key, value.long()),
    }  # fmt: skip
    for (name, qkv), weights in itertools.product(wrong.items(), (False, True)):
        calls.append(
            Call(f"{name} need_weights={weights}", qkv, {"need_weights": weights}, module={"batch_first": True})
        )
    for (name, module), weights in itertools.product(
        {"kdim module, value batch 3": {"kdim": KDIM, "vdim": VDIM}}.items(), (False, True)
    ):
        q, k, v = _inputs("cross", True, (KDIM, VDIM))
        calls.append(Call(f"{name} need_weights={weights}", (q, k, _tensor((3, S, VDIM))), {"need_weights": weights},
                          module={"batch_first": True, **module}))  # fmt: skip
        calls.append(Call(f"kdim module, key dim 4 need_weights={weights}", (q, _tensor((N, S, E)), v),
                          {"need_weights": weights}, module={"batch_first": True, **module}))  # fmt: skip
    for dtype, training, kind, no_grad, weights in itertools.product(
        (torch.float64, torch.float16, torch.bfloat16), (False, True), ("self", "cross"), (False, True), (False, True)
    ):  # fmt: skip
        calls.append(Call(f"{dtype} module training={training} {kind} no_grad={no_grad} need_weights={weights}",
                          _inputs(kind, True, dtype=dtype), {"need_weights": weights}, grad=dtype == torch.float64,
                          module={"batch_first": True, "dtype": dtype}, training=training, no_grad=no_grad))  # fmt: skip
    changes = {"in_proj_bias float16": _set("in_proj_bias", torch.float16),
               "out_proj.bias float16": _set("out_proj.bias", torch.float16),
               "in_proj_weight float16": _set("in_proj_weight", torch.float16)}  # fmt: skip
    for (name, change), training, no_grad, weights in itertools.product(
        changes.items(), (False, True), (False, True), (False, True)
    ):
        calls.append(Call(f"float64 module, {name}, training={training} no_grad={no_grad} need_weights={weights}",
                          _inputs("self", True, dtype=torch.float64), {"need_weights": weights},
                          module={"batch_first": True, "dtype": torch.float64}, training=training, no_grad=no_grad,
                          change=change))  # fmt: skip
    for p, training, weights, kind in itertools.product((0.5, 1.0), (False, True), (False, True), ("self", "cross")):
        calls.append(Call(f"dropout {p} training={training} need_weights={weights} {kind}", _inputs(kind, True),
                          {"need_weights": weights}, module={"batch_first": True, "dropout": p}, training=training,
                          random=training and p < 1))  # fmt: skip
    padding, _, masks = _mha_masks(L, L)
    everything = torch.ones(N, L, dtype=torch.bool)
    fast_path_masks = {"none": {}, "key_padding_mask": {"key_padding_mask": padding["bool (N, S)"]},
                       "attn_mask": {"attn_mask": masks["bool (L, S)"]},
                       "fully masked": {"key_padding_mask": everything}}  # fmt: skip
    for (name, kwargs), weights, no_grad in itertools.product(fast_path_masks.items(), (False, True), (False, True)):
        calls.append(Call(f"eval self-attention {name} need_weights={weights} no_grad={no_grad}", _inputs("self", True),
                          {"need_weights": weights, **kwargs}, module={"batch_first": True}, no_grad=no_grad,
                          torch_nan_rows=name == "fully masked"))  # fmt: skip
    calls.append(Call("is_causal without attn_mask", _inputs("self", True), {"is_causal": True}, module={}))
    return calls


# ---- running a call through torch and through fusedattn ---------------------------------------
def _leaf_copies(values: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh leaves that require grad for every floating tensor (shared ones stay shared)."""
    copies: dict[int, torch.Tensor] = {}

    def copy(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or isinstance(value, CausalBias) or not value.is_floating_point():
            return value
        if id(value) not in copies:
            copies[id(value)] = value.detach().clone().requires_grad_(value.device.type != "meta")
        return copies[id(value)]

    return tuple(copy(value) for value in values), {name: copy(value) for name, value in kwargs.items()}


def _modules(call: Call) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, **call.module)
    ours = fusedattn.nn.MultiheadAttention(E, H, **call.module)
    with torch.no_grad():  # nonzero biases, so that a dropped bias shows
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn_like(parameter, dtype=torch.float32))
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        module.train(call.training)
        if call.change is not None:
            call.change(module)
    return theirs, ours


def _run(function: Callable[..., Any], call: Call, params: dict[str, torch.Tensor]) -> tuple[Any, Any, Any]:
    """(result, gradients by name, exception) of one side of a call."""
    args, kwargs = _leaf_copies(call.args, call.kwargs) if call.grad else (call.args, call.kwargs)
    try:
        with warnings.catch_warnings(), torch.set_grad_enabled(not call.no_grad):
            warnings.simplefilter("ignore")  # torch's deprecation and kernel-choice warnings
            torch.manual_seed(0)
            result = function(*args, **kwargs)
            gradients = None
            if call.grad and not call.no_grad:
                outputs = [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]
                loss = sum((t * _tensor(t.shape, t.dtype, 11)).sum() for t in outputs)
                named = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad}
                named |= {k: a for k, a in kwargs.items() if isinstance(a, torch.Tensor) and a.requires_grad}
                named |= params
                gradients = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    except Exception as error:  # noqa: BLE001  (torch's refusal, whatever its class)
        return None, None, error
    return result, gradients, None


def _differs(name: str, ours: Any, theirs: Any, call: Call) -> str | None:
    if theirs is None or ours is None:
        return None if ours is None and theirs is None else f"{name}: {type(ours)} where torch gives {type(theirs)}"
    if not isinstance(ours, torch.Tensor) or ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return f"{name}: {getattr(ours, 'dtype', type(ours))} {tuple(getattr(ours, 'shape', ()))}, torch gives " \
               f"{theirs.dtype} {tuple(theirs.shape)}"  # fmt: skip
    if theirs.device.type == "meta":
        return None
    if call.random:
        return None if bool(torch.isfinite(ours).all()) else f"{name}: not finite"
    if call.torch_nan_rows:  # documented: torch NaN, fusedattn finite, on fully masked rows
        if not bool(torch.isfinite(ours).all()):
            return f"{name}: not finite on fully masked rows"
        ours, theirs = ours[~theirs.isnan()], theirs[~theirs.isnan()]
    tolerance = TOLERANCE[theirs.dtype] * (10 if call.grad and name != "out" else 1)
    try:
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance, equal_nan=True)
    except AssertionError as error:
        return f"{name}: {str(error).splitlines()[-3:]}"
    return None


def check(call: Call, ours: Callable[..., Any], theirs: Callable[..., Any], arguments: tuple[str, ...],
          params: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})) -> tuple[str | None, bool]:  # fmt: skip
    """(the difference, or None; whether torch accepted the call)."""
    want, want_grads, torch_error = _run(theirs, call, params[0])
    got, got_grads, error = _run(ours, call, params[1])
    if torch_error is not None:
        if error is None:
            return f"{call.label}: torch raises {type(torch_error).__name__} ({torch_error}), fusedattn returns", False
        if not isinstance(error, type(torch_error)):
            return (f"{call.label}: torch raises {type(torch_error).__name__} ({torch_error}), fusedattn "
                    f"{type(error).__name__} ({error})"), False  # fmt: skip
        if not any(name in str(error) for name in arguments):
            return f"{call.label}: the message names no argument: {error}", False
        return None, False
    if error is not None:
        return f"{call.label}: torch returns, fusedattn raises {type(error).__name__}: {error}", True
    pairs = list(zip(got, want)) if isinstance(want, tuple) else [(got, want)]
    names = ("out", "weights")
    failures = [_differs(names[i], a, b, call) for i, (a, b) in enumerate(pairs)]
    if want_grads is not None and not call.random:
        failures += [_differs(f"grad {n}", got_grads.get(n), g, call) for n, g in want_grads.items()]
    failure = next((f for f in failures if f), None)
    return (f"{call.label}: {failure}" if failure else None), True


def _sdpa(call: Call) -> tuple[str | None, bool]:
    return check(call, fusedattn.scaled_dot_product_attention, F.scaled_dot_product_attention, SDPA_ARGUMENTS)


def _mha(call: Call) -> tuple[str | None, bool]:
    theirs, ours = _modules(call)
    params = tuple({n: p for n, p in m.named_parameters()} if call.grad else {} for m in (theirs, ours))
    return check(call, ours, theirs, MHA_ARGUMENTS, params)  # type: ignore[arg-type]


def run_grid(calls: list[Call], runner: Callable[[Call], tuple[str | None, bool]]) -> tuple[list[str], int, int]:
    """(failures, calls torch accepted, calls torch refused)."""
    failures, accepted = [], 0
    for call in calls:
        failure, valid = runner(call)
        accepted += valid
        if failure:
            failures.append(failure)
    return failures, accepted, len(calls) - accepted


@pytest.mark.parametrize("entry", ["scaled_dot_product_attention", "MultiheadAttention"])
def test_drop_in_behaves_like_torch_on_the_grid(entry: str) -> None:
    calls, runner = (sdpa_calls(), _sdpa) if entry == "scaled_dot_product_attention" else (mha_calls(), _mha)
    failures, accepted, refused = run_grid(calls, runner)
    assert accepted > 100 and refused > 50, (accepted, refused)  # the grid covers both kinds
    assert not failures, f"{len(failures)} of {len(calls)} calls differ:\n" + "\n".join(failures[:30])


# ---- what the grid cannot show ---------------------------------------------------------------
def test_causal_bias_runs_as_the_alignment_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    original = fusedattn.api.attention
    monkeypatch.setattr(fusedattn.api, "attention", lambda *a, **kw: seen.append(kw) or original(*a, **kw))
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    for bias, alignment in ((causal_upper_left(3, 5), "top_left"), (causal_lower_right(3, 5), "bottom_right")):
        out = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        assert seen[-1]["attn_mask"] is None and seen[-1]["causal"] and seen[-1]["causal_alignment"] == alignment
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_multihead_attention_weights_are_differentiable() -> None:
    module = fusedattn.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    query = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: module(x, x, x, average_attn_weights=False)[1], (query,))
    with torch.no_grad():
        assert not module(query, query, query)[1].requires_grad


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_is_refused_at_script_time_with_the_reason() -> None:
    class Block(torch.nn.Module):
        def __init__(self, attention: torch.nn.Module) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x)[0]

    with pytest.raises(RuntimeError, match="does not support TorchScript"):
        torch.jit.script(Block(fusedattn.nn.MultiheadAttention(E, H)))
    x = torch.randn(L, N, E)
    torch.jit.script(Block(torch.nn.MultiheadAttention(E, H)))(x)  # the way out the message names
