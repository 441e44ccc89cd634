"""Faults: each breaks exactly one rule of one argument of an otherwise valid call.

A fault function takes the draw function and the call's Arguments, changes one argument
and returns (target, what was done); the target is the name the refusal must give. It
returns None when it does not apply to this call (a value fault on an empty tensor, say).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from .tensors import FLOAT_DTYPES, WRONG_DTYPES, meta_like

Fault = Callable[[st.DrawFn, "Arguments"], "tuple[str, str] | None"]


@dataclass
class Arguments:
    """The arguments of one call, by name, in call order; positional ones first."""

    values: dict[str, Any]
    positional: tuple[str, ...]
    # Facts a fault may need (the batch, Sk, the dtype of q, ...).
    facts: dict[str, Any] = field(default_factory=dict)

    def split(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(self.values[name] for name in self.positional)
        kwargs = {name: value for name, value in self.values.items() if name not in self.positional}
        return args, kwargs


def resized(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.randn(shape, dtype=torch.float64).to(tensor.dtype)


# ---- tensors --------------------------------------------------------------------------------
def wrong_dtype(names: tuple[str, ...]) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        name = draw(st.sampled_from(names))
        dtype = draw(st.sampled_from(WRONG_DTYPES))
        a.values[name] = a.values[name].to(dtype)
        return name, f"dtype {dtype}"

    return fault


def mismatched_dtype(names: tuple[str, ...]) -> Fault:
    """One of k, v (or a cache) in another float dtype than q."""

    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        name = draw(st.sampled_from(names))
        dtype = draw(st.sampled_from([d for d in FLOAT_DTYPES if d != a.values[name].dtype]))
        a.values[name] = a.values[name].to(dtype)
        return name, f"dtype {dtype}, unlike q"

    return fault


def wrong_rank(names: tuple[str, ...]) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        name = draw(st.sampled_from(names))
        tensor = a.values[name]
        a.values[name] = tensor[None] if draw(st.booleans()) or tensor.shape[0] == 0 else tensor[0]
        return name, f"{a.values[name].dim()}-D"

    return fault


def not_a_tensor(names: tuple[str, ...]) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        name = draw(st.sampled_from(names))
        value = a.values[name]
        replacement = draw(st.sampled_from(["list", "None", "float", "numpy"]))
        if replacement == "list" and isinstance(value, torch.Tensor):
            a.values[name] = value.tolist()
        elif replacement == "numpy" and isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16:
            a.values[name] = value.numpy()
        elif replacement == "float":
            a.values[name] = 1.5
        else:
            a.values[name] = None if replacement == "None" else "tensor"
        return name, f"a {type(a.values[name]).__name__}, not a tensor"

    return fault


def on_meta(names: tuple[str, ...]) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str] | None:
        present = [n for n in names if isinstance(a.values.get(n), torch.Tensor)]
        if not present:
            return None
        name = draw(st.sampled_from(present))
        a.values[name] = meta_like(a.values[name])
        return name, "on the meta device"

    return fault


def resize(name: str, dim: int, sizes: Callable[[int], list[int]], also: tuple[str, ...] = ()) -> Fault:
    """name (and the arguments in also, which must stay consistent with it) with dim's size
    replaced by one of sizes(current)."""

    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str] | None:
        tensor = a.values[name]
        choices = [s for s in sizes(tensor.shape[dim]) if s >= 0 and s != tensor.shape[dim]]
        if not choices:
            return None
        size = draw(st.sampled_from(choices))
        for each in (name, *also):
            a.values[each] = resized(a.values[each], dim, size)
        return name, f"size {size} in dim {dim}"

    return fault


# ---- integer tensors -------------------------------------------------------------------------
def int_tensor_faults(
    name: str, shape: Callable[[Arguments], tuple[int, ...]], low: int, high: int, scalar_valid: bool = False
) -> Fault:
    """Faults of an index tensor with values in [low, high]: dtype, shape, device, type,
    values out of range (negative, past high, 2**31 - 1, int64 values past int32).
    scalar_valid: a 0-d tensor is a valid form (flash-attn's int cache_seqlens), not a fault."""

    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        tensor = a.values.get(name)
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.full(shape(a), max(low, 0), dtype=torch.int32)
        kind = draw(st.sampled_from(["dtype", "shape", "device", "list", "value", "value", "value"]))
        if kind == "value" and tensor.numel() == 0:
            kind = "shape"
        if kind == "dtype":
            dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.bool, torch.float64, torch.uint8]))
            a.values[name] = tensor.to(dtype)
            return name, f"dtype {dtype}"
        if kind == "shape":
            new = draw(st.sampled_from(["longer", "2-D"] if scalar_valid else ["longer", "2-D", "0-D"]))
            if new == "longer":
                a.values[name] = torch.cat([tensor, tensor[:1] if tensor.numel() else tensor.new_zeros(1)])
            elif new == "2-D":
                a.values[name] = tensor[:, None] if tensor.dim() == 1 else tensor[None]
            else:
                a.values[name] = tensor.new_tensor(max(low, 0))
            return name, f"shape {tuple(a.values[name].shape)}"
        if kind == "device":
            a.values[name] = meta_like(tensor)
            return name, "on the meta device"
        if kind == "list":
            a.values[name] = tensor.tolist()
            return name, "a list"
        bad = draw(st.sampled_from([low - 1, high + 1, 2**31 - 1, -(2**31), 2**40, -(2**40), 2**32 + low]))
        dtype = torch.int64 if not -(2**31) <= bad < 2**31 else draw(st.sampled_from([torch.int32, torch.int64]))
        values = tensor.to(torch.int64).clone().reshape(-1)
        values[draw(st.integers(0, values.numel() - 1))] = bad
        a.values[name] = values.reshape(tensor.shape).to(dtype)
        return name, f"value {bad} outside [{low}, {high}]"

    return fault


# ---- options -------------------------------------------------------------------------------
WRONG_TYPES = ["1", b"x", [1.0], {"a": 1}, 1j, None]


def option(name: str, bad_values: list[Any]) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        value = draw(st.sampled_from(bad_values))
        a.values[name] = value
        return name, f"{value!r}"

    return fault


SCALE = option("scale", ["0.5", True, [1.0], 1j, torch.tensor(0.5)])
CAUSAL = option("causal", [1, 0, "yes", None, torch.tensor(True)])
ALIGNMENT = option("causal_alignment", ["bottom-right", "TOP_LEFT", "", None, 1, "top left"])
WINDOW = option("window", [(-1, 2), (3, -1), (-(2**40), 0), (1,), (1, 2, 3), "ab", 4, (1.5, 2), (True, 0),
                           (None, "2"), {1: 2}])  # fmt: skip
SOFTCAP = option("softcap", [-1.0, math.nan, math.inf, -math.inf, "5", True, [5.0]])
DROPOUT_P = option("dropout_p", [-0.1, 1.5, math.nan, math.inf, -math.inf, "0.1", True, None, 2])
DROPOUT_SEED = option("dropout_seed", [-1, 2**63, 2**64, 1.5, "7", True])
RETURN_LSE = option("return_lse", [1, 0, "yes", None])
BACKEND = option("backend", ["nope", "", "CPU", 3, None, "triton-typo"])


def alibi_faults(heads: int, batch: int) -> Fault:
    def fault(draw: st.DrawFn, a: Arguments) -> tuple[str, str]:
        kind = draw(st.sampled_from(["shape", "dtype", "device", "list"]))
        if kind == "shape":
            shape = draw(st.sampled_from([(heads + 1,), (batch + 1, heads), (1, heads, 1), (), (heads, batch + 2)]))
            a.values["alibi_slopes"] = torch.rand(shape)
        elif kind == "dtype":
            a.values["alibi_slopes"] = torch.ones(heads, dtype=draw(st.sampled_from([torch.int32, torch.bool])))
        elif kind == "device":
            a.values["alibi_slopes"] = torch.empty(heads, device="meta")
        else:
            a.values["alibi_slopes"] = [0.5] * heads
        return "alibi_slopes", kind

    return fault
