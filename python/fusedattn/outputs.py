"""Output allocation shared by every backend and the Triton kernels (a neutral module:
the kernels may import it without importing the backend layer that wraps them).

Backends allocate every output (out, lse, dq, dk, dv) through allocate_output, so a test
can fill fresh outputs with a poison value and catch elements no kernel wrote.
"""

from __future__ import annotations

import torch

__all__ = ["allocate_output", "poisoned_outputs", "poisoning"]

_POISON: list[float] = []


def allocate_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a tensor full of the poison value inside poisoned_outputs()."""
    if _POISON:
        return torch.full(shape, _POISON[-1], dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def poisoning() -> bool:
    """True inside poisoned_outputs(): outputs must come from allocate_output."""
    return bool(_POISON)


class poisoned_outputs:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Within this context, backend outputs start filled with value (NaN by default)."""

    def __init__(self, value: float = float("nan")) -> None:
        self.value = value

    def __enter__(self) -> poisoned_outputs:
        _POISON.append(self.value)
        return self

    def __exit__(self, *exc: object) -> None:
        _POISON.pop()
