"""Attention probabilities from the reference backend, for callers that ask to see them.

The fused kernels never form the (Sq x Sk) probability matrix. When a drop-in API must
return it (``need_weights=True`` of torch's MultiheadAttention, ``return_attn_probs=True``
of FlashAttention), the reference backend recomputes it from the same validated call: with
the identity matrix as V, attention's output *is* the probability matrix. The dropout
pattern comes from :mod:`fusedattn.semantics`, the hash every backend reproduces.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import semantics
from ..backends.reference import differentiable_reference, reference_attention
from ..semantics import AttentionCall


def attention_probabilities(
    call: AttentionCall, differentiable: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities of a dense call, and its dropout keep mask.

    Args:
        call: a validated dense call (q (B, Hq, Sq, D), k (B, Hkv, Sk, D)).
        differentiable: put the probabilities on autograd's graph (from q, k and a float
            mask) when grad mode is on, as torch's MultiheadAttention weights are.

    Returns:
        probabilities (B, Hq, Sq, Sk) in q's dtype, before dropout, 0 on fully masked rows;
        keep (B, Hq, Sq, Sk) bool, True where dropout kept the probability, or None
        without dropout.
    """
    batch, heads_q, seqlen_q = call.q.shape[:3]
    heads_kv, seqlen_k = call.k.shape[1], call.k.shape[2]
    identity = torch.eye(seqlen_k, dtype=call.dtype, device=call.device).expand(batch, heads_kv, seqlen_k, seqlen_k)
    without_dropout = replace(call, v=identity, dropout_p=0.0, dropout_seed=None, needs_grad=False)
    if differentiable and torch.is_grad_enabled():
        probabilities = differentiable_reference(without_dropout)
    else:
        probabilities, _, _ = reference_attention(without_dropout)
    keep = None
    if call.dropout_p > 0.0:
        sequence = torch.arange(batch, device=call.device)
        keep = semantics.dropout_keep_mask(
            int(call.dropout_seed), call.dropout_p, sequence, heads_q, seqlen_q, seqlen_k
        )
    return probabilities.to(call.dtype), keep
