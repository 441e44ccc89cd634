"""Shared checks of docs/semantics.md, "NaN and Inf inputs", run on every backend by
test_cpu_backend, test_reference and test_triton_backend (under the interpreter)."""

from __future__ import annotations

import fusedattn
import torch


def _run(backend: str, q, k, v, **options):
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fusedattn.attention(*inputs, return_lse=True, backend=backend, **options)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, inputs, grad_out)
    return out, lse, dq


def assert_hidden_nan_row_has_zero_gradient(backend: str, device: str, dtype: torch.dtype) -> None:
    """A NaN query on a fully masked row, with softcap: out 0, lse -inf, dq 0 (softcap is
    never differentiated at a hidden score), every other row finite."""
    q, k, v = (torch.randn(2, 2, 6, 16, dtype=dtype, device=device) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")  # row 3 sees no key (mask)
    q[1, 0, 2, 7] = float("nan")  # batch 1 has no keys (key_lengths)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=device)
    mask[:, :, 3] = False
    key_lengths = torch.tensor([6, 0], device=device)
    for options in ({"softcap": 5.0}, {"softcap": 5.0, "dropout_p": 0.5, "dropout_seed": 7}, {}):
        out, lse, dq = _run(backend, q, k, v, attn_mask=mask, key_lengths=key_lengths, **options)
        assert torch.all(out[0, :, 3] == 0) and torch.all(lse[0, :, 3] == float("-inf")), options
        assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf")), options
        assert torch.all(dq[0, :, 3] == 0) and torch.all(dq[1] == 0), options
        assert torch.isfinite(out).all() and torch.isfinite(dq).all(), options


def assert_minus_infinite_scores_mask_the_row(backend: str, device: str, dtype: torch.dtype) -> None:
    """Scores that are -inf by value (an -Inf in q against positive key components, no
    softcap) make a fully masked row: out 0, lse -inf, dq 0; a NaN score makes a NaN row."""
    q, v = (torch.randn(1, 1, 4, 8, dtype=dtype, device=device) for _ in range(2))
    k = torch.rand(1, 1, 4, 8, dtype=dtype, device=device) + 0.5
    q[0, 0, 1, 2] = -float("inf")  # every score of row 1 is -inf
    q[0, 0, 2, 2] = float("nan")
    out, lse, dq = _run(backend, q, k, v)
    assert torch.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == float("-inf")
    assert torch.all(dq[0, 0, 1] == 0)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(lse[0, 0, 2])
    assert torch.isfinite(out[0, 0, [0, 3]]).all() and torch.isfinite(dq[0, 0, [0, 3]]).all()
