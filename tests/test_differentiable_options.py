"""The op contract's differentiable options (semantics.DIFFERENTIABLE_OPTIONS): the
generated autograd returns their gradients through the backward op, the fake
implementation knows their shapes, and a backend that does not differentiate an option
is refused, never silently skipped."""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn import UnsupportedCallError, validation
from fusedattn.ops import backward_arguments, op_arguments, ops_for
from fusedattn.semantics import DIFFERENTIABLE_OPTIONS


def _inputs(dtype=torch.float64, batch=2, heads=3, seqlen=5, head_dim=8, requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(batch, heads, seqlen, head_dim, dtype=dtype, generator=generator).requires_grad_(requires_grad)
        for _ in range(3)
    )


@pytest.mark.parametrize("mask_shape", [(5, 5), (1, 3, 5, 5), (2, 1, 1, 5)])
def test_gradcheck_additive_mask_and_alibi_slopes(mask_shape):
    q, k, v = _inputs()
    mask = torch.randn(mask_shape, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def attend(q, k, v, mask, slopes):
        return fusedattn.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, causal=True, backend="reference")

    assert torch.autograd.gradcheck(attend, (q, k, v, mask, slopes))


def test_gradcheck_alibi_slopes_per_sequence_varlen():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True) for _ in range(3))
    offsets = torch.tensor([0, 4, 9], dtype=torch.int32)
    slopes = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)

    def attend(q, slopes):
        return fusedattn.attention_varlen(q, k, v, offsets, offsets, 5, 5, causal=True, alibi_slopes=slopes)

    assert torch.autograd.gradcheck(attend, (q, slopes))


def test_mask_gradient_matches_torch_sdpa():
    # torch's SDPA differentiates a floating attn_mask: the drop-in does the same.
    q, k, v = _inputs(dtype=torch.float32, heads=4, seqlen=6, head_dim=16)
    mask = torch.randn(6, 6, requires_grad=True)
    grad_out = torch.randn(2, 4, 6, 16)
    ours = torch.autograd.grad(fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, mask), grad_out)
    theirs = torch.autograd.grad(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, mask), grad_out
    )
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_option_alone_requires_grad():
    q, k, v = _inputs(requires_grad=False)
    mask = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    fusedattn.attention(q, k, v, attn_mask=mask).sum().backward()
    assert mask.grad is not None and mask.grad.shape == (5, 5)
    # The output sums to a constant along keys' softmax: d sum(out) / d mask is generally not 0.
    assert torch.isfinite(mask.grad).all()


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_backends_without_the_gradient_are_refused(backend_name):
    backend = fusedattn.registry().get(backend_name)
    if backend is None or not fusedattn.dispatch.availability(backend)[0]:
        pytest.skip(f"{backend_name} is not available")
    q, k, v = _inputs(dtype=torch.float32)
    mask = torch.zeros(5, 5, requires_grad=True)
    with pytest.raises(UnsupportedCallError, match="no gradient for attn_mask"):
        fusedattn.attention(q, k, v, attn_mask=mask, backend=backend_name)
    # Without grad mode the gradient is no reason to refuse.
    with torch.no_grad():
        reason = fusedattn.dispatch.refusal(backend, validation.validate_attention(q, k, v, attn_mask=mask))
    assert "gradient" not in (reason or "")
    assert fusedattn.explain(q, k, v, attn_mask=mask).chosen == "reference"


def test_direct_backward_op_call_refuses_an_option_the_backend_does_not_differentiate():
    backend = fusedattn.registry()["cpu"]
    if not fusedattn.dispatch.availability(backend)[0]:
        pytest.skip("fusedattn._C is not built")
    q, k, v = (t.detach().float() for t in _inputs())
    call = validation.validate_attention(q, k, v, attn_mask=torch.zeros(5, 5))
    forward_op, backward_op = ops_for(backend)
    out, lse = forward_op(*op_arguments(call))
    with pytest.raises(NotImplementedError, match="cannot differentiate attn_mask"):
        backward_op(torch.ones_like(out), out, lse, *backward_arguments(call, ("attn_mask",)))


def test_backward_op_returns_empty_tensors_for_options_not_asked_for():
    q, k, v = (t.detach() for t in _inputs())
    call = validation.validate_attention(q, k, v, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    forward_op, backward_op = ops_for(fusedattn.registry()["reference"])
    out, lse = forward_op(*op_arguments(call))
    grads = backward_op(torch.ones_like(out), out, lse, *backward_arguments(call, ("attn_mask",)))
    assert len(grads) == 3 + len(DIFFERENTIABLE_OPTIONS)
    assert grads[3].shape == call.attn_mask.shape
    assert grads[4].numel() == 0


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_option_gradients_match_eager(compile_backend):
    q, k, v = _inputs(dtype=torch.float32)
    mask = torch.randn(5, 5, requires_grad=True)
    slopes = torch.rand(3, requires_grad=True)

    def attend(q, k, v, mask, slopes):
        return fusedattn.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, causal=True)

    compiled = torch.compile(attend, backend=compile_backend, fullgraph=True)
    expected = torch.autograd.grad(attend(q, k, v, mask, slopes).sum(), (q, mask, slopes))
    got = torch.autograd.grad(compiled(q, k, v, mask, slopes).sum(), (q, mask, slopes))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
