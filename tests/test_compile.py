"""torch.compile(fullgraph=True) sees through fusedattn's custom ops: no graph break."""

from __future__ import annotations

import fusedattn
import torch


def _layer(q, k, v, lengths, slopes):
    out = fusedattn.attention(q * 2, k, v, causal=True, key_lengths=lengths, alibi_slopes=slopes, window=(3, None))
    return torch.nn.functional.gelu(out).sum(dim=-1)


def test_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, requires_grad=True)
    v = torch.randn(2, 2, 7, 8, requires_grad=True)
    lengths, slopes = torch.tensor([7, 3]), torch.rand(4)
    compiled = torch.compile(_layer, fullgraph=True)
    out = compiled(q, k, v, lengths, slopes)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = _layer(q, k, v, lengths, slopes)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_with_varlen_and_drawn_dropout_seed():
    torch._dynamo.reset()

    def packed(q, k, v, cu_q, cu_k):
        return fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, dropout_p=0.1)

    cu_q = torch.tensor([0, 4, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    q, k, v = torch.randn(7, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled(q, k, v, cu_q, cu_k)
    assert out.shape == (7, 2, 8) and torch.isfinite(out).all()
