"""Strategies for the tensors of a case: dtypes, memory layouts and special values.

Structural choices (shape, dtype, layout, which special value) are hypothesis draws, so a
failure shrinks towards small, contiguous, plain inputs. Bulk values come from a torch
generator seeded by one draw: shrinking them element by element would not help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WRONG_DTYPES = (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8)
# contiguous; a permuted storage viewed back; every other element of a wider buffer; a
# storage offset; a size-1 dimension expanded (zero stride).
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded")
# Values placed into a few elements of one tensor. "huge" is 1e30 (inf in float16).
SPECIALS = ("nan", "inf", "-inf", "huge", "denormal")

Draw = st.DrawFn


@dataclass(frozen=True)
class Layout:
    """How one tensor is laid out in memory, and which special value it holds (if any)."""

    kind: str = "contiguous"
    special: str | None = None
    seed: int = 0


def layouts(allow_specials: bool = True) -> st.SearchStrategy[Layout]:
    special = st.sampled_from(SPECIALS) if allow_specials else st.nothing()
    return st.builds(
        Layout,
        kind=st.sampled_from(LAYOUTS),
        special=st.one_of(st.none(), st.none(), st.none(), special) if allow_specials else st.none(),
        seed=st.integers(0, 2**31 - 1),
    )


def special_value(name: str, dtype: torch.dtype) -> float:
    if name == "nan":
        return math.nan
    if name == "inf":
        return math.inf
    if name == "-inf":
        return -math.inf
    if name == "huge":
        return 1e30
    if name == "denormal":
        return torch.finfo(dtype).tiny / 4  # a subnormal of that dtype
    raise ValueError(f"special: unknown name {name!r}")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def make_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: Layout = Layout(),
    *,
    scale: float = 1.0,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """A tensor of shape and dtype laid out as layout says, random N(0, scale) values (or
    the given values), with the special value in 1 or 2 elements."""
    generator = torch.Generator().manual_seed(layout.seed)
    expanded_dim = None
    if layout.kind == "expanded":
        candidates = [d for d, size in enumerate(shape) if size > 1] or list(range(len(shape)))
        if candidates:
            expanded_dim = candidates[layout.seed % len(candidates)]
    if expanded_dim is not None and values is not None and values.shape[expanded_dim] == 0:
        expanded_dim = None  # no element to expand from: given values of size 0 stay as they are
    value_shape = list(shape)
    if expanded_dim is not None:
        value_shape[expanded_dim] = 1
    if values is None:
        if dtype.is_floating_point or dtype.is_complex:
            data = torch.randn(value_shape, generator=generator, dtype=torch.float64) * scale
        elif dtype == torch.bool:
            data = torch.randint(0, 2, value_shape, generator=generator).bool()
        else:
            data = torch.randint(-3, 4, value_shape, generator=generator)
        data = data.to(dtype)
    else:
        data = values.to(dtype)
        if expanded_dim is not None:
            data = data.narrow(expanded_dim, 0, 1)
    if layout.special is not None and data.numel() > 0 and dtype.is_floating_point:
        flat = data.reshape(-1).clone()
        for index in torch.randint(0, flat.numel(), (1 + layout.seed % 2,), generator=generator).tolist():
            flat[index] = special_value(layout.special, dtype)
        data = flat.reshape(data.shape)
    if expanded_dim is not None:
        return data.expand(shape)
    return _lay_out(data, layout)


def _lay_out(data: torch.Tensor, layout: Layout) -> torch.Tensor:
    shape, ndim = tuple(data.shape), data.dim()
    if layout.kind == "transposed" and ndim >= 2:
        order = list(range(ndim))
        # A fixed derangement-ish permutation from the seed: rotate, then swap a pair.
        shift = 1 + layout.seed % (ndim - 1)
        order = order[shift:] + order[:shift]
        base = data.permute(order).contiguous()
        inverse = [order.index(d) for d in range(ndim)]
        return base.permute(inverse)
    if layout.kind == "strided" and ndim >= 1:
        dim = ndim - 1 - layout.seed % ndim
        wide = list(shape)
        wide[dim] = shape[dim] * 2
        base = (
            torch.full(wide, math.nan, dtype=data.dtype)
            if data.dtype.is_floating_point
            else torch.zeros(wide, dtype=data.dtype)
        )
        view = base.narrow(dim, 0, shape[dim] * 2)[(slice(None),) * dim + (slice(None, None, 2),)]
        view.copy_(data)
        return view
    if layout.kind == "offset":
        offset = 1 + layout.seed % 7
        flat = torch.empty(max(data.numel(), 1) + offset, dtype=data.dtype)
        view = flat.as_strided(shape, _contiguous_strides(shape), offset)
        view.copy_(data)
        return view
    return data.contiguous()


def describe(value: object) -> str:
    """A short, reproducible description of an argument for reports."""
    if isinstance(value, torch.Tensor):
        text = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        if value.device.type != "cpu":
            text += f"@{value.device.type}"
        if not value.is_contiguous() or value.storage_offset():
            text += f" stride={tuple(value.stride())} offset={value.storage_offset()}"
        if value.device.type == "cpu" and not value.dtype.is_floating_point and value.numel() <= 24:
            text += f" values={value.tolist()}"
        elif value.device.type == "cpu" and value.dtype.is_floating_point and value.numel():
            bad = [name for name, test in (("nan", torch.isnan), ("inf", torch.isinf)) if bool(test(value).any())]
            if bad:
                text += f" with {'+'.join(bad)}"
        return text
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES)


def wrong_dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(WRONG_DTYPES)


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """The same tensor on the meta device: the one other device every machine has."""
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
