"""The reference backend: docs/semantics.md written in plain PyTorch ops.

It runs on any device and dtype, materializes the (Sq x Sk) score matrix, and is the
oracle for every test and for the parity harness (which calls :func:`reference_attention`
in float64). reference_attention's gradients differentiate that formula with autograd, so
they share no code path with the hand-written backward passes of the fast kernels. The
backend's backward honours the out and lse it is handed, as every backend's does
(FlashAttention's: P from the given lse, D from the given out), by autograd through the
same score formula; a ring of blocks merged by their lse (fusedattn.distributed) relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import semantics
from ..semantics import AttentionCall
from .base import Backend, Capabilities


@dataclass(frozen=True)
class _Problem:
    """One dense attention problem: the whole call (dense), or one varlen or paged
    sequence as a batch of one. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) in
    the compute dtype; tokens is the sequence's range of packed rows (None when dense)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    key_lengths: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    sequence_index: torch.Tensor  # (B,): the batch or varlen sequence index the dropout hash uses
    tokens: tuple[int, int] | None

    def rows(self, per_row: torch.Tensor, heads_first: bool = False) -> torch.Tensor:
        """This problem's rows of a call-shaped tensor, as (B, Hq, Sq, ...): out or grad_out
        ((T, Hq, Dv) varlen), or lse with heads_first ((Hq, T) varlen)."""
        if self.tokens is None:
            return per_row
        start, end = self.tokens
        if heads_first:
            return per_row[:, start:end][None]
        return per_row[start:end].transpose(0, 1)[None]


def _expand_groups(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """K or V (B, Hkv, Sk, ·) repeated to Hq heads: the oracle may expand, the fast backends never do."""
    group = heads_q // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _scores(call: AttentionCall, problem: _Problem) -> torch.Tensor:
    """(B, Hq, Sq, Sk) scores after scale, softcap, ALiBi and an additive mask, −inf where
    the key is invisible (docs/semantics.md steps 1-5)."""
    q, k = problem.q, _expand_groups(problem.k, problem.q.shape[1])
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    attn_mask = problem.attn_mask
    allowed = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    visible = semantics.visible_keys(
        seqlen_q,
        seqlen_k,
        causal=call.causal,
        alignment=call.causal_alignment,
        window_left=call.window_left,
        window_right=call.window_right,
        device=q.device,
        query_start=call.query_start,
        key_start=call.key_start,
    )
    if visible is not None:
        allowed = visible if allowed is None else allowed & visible
    if problem.key_lengths is not None:
        in_length = semantics.within_key_lengths(problem.key_lengths.to(q.device), seqlen_k)[:, None, None, :]
        allowed = in_length if allowed is None else allowed & in_length

    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if allowed is not None and call.softcap is not None:
        # Only visible pairs carry gradient (docs/semantics.md): softcap is differentiated at
        # 0, not at a hidden NaN score (0 * (1 - tanh(NaN)^2) would be NaN).
        scores = torch.where(allowed, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    scores = semantics.apply_softcap(scores, call.softcap)
    if problem.alibi_slopes is not None:
        slopes = problem.alibi_slopes.to(scores.dtype)
        bias = semantics.alibi_bias(slopes, seqlen_q, seqlen_k, call.causal_alignment, call.query_start, call.key_start)
        scores = scores + bias
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(scores.dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _dropped(call: AttentionCall, problem: _Problem, probabilities: torch.Tensor) -> torch.Tensor:
    """probabilities (B, Hq, Sq, Sk) after dropout (step 7): kept ones scaled, others 0."""
    if call.dropout_p <= 0.0:
        return probabilities
    _, heads, rows, keys = probabilities.shape
    keep = semantics.dropout_keep_mask(
        int(call.dropout_seed),
        call.dropout_p,
        problem.sequence_index,
        heads,
        rows,
        keys,
        call.query_start,
        call.key_start,
    )
    return probabilities * keep.to(probabilities.dtype) * semantics.dropout_keep_scale(call.dropout_p)


def _attend_dense(call: AttentionCall, problem: _Problem, sinks: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) of one problem, in the compute dtype."""
    q, k, v = problem.q, problem.k, problem.v
    batch, heads_q, seqlen_q, _ = q.shape
    if k.shape[2] == 0 or q.numel() == 0:
        # No rows, or every row fully masked: output 0, lse -inf, or the sink's logit
        # (docs/semantics.md, "Empty"). The sink is added, not filled, to keep its gradient.
        out = q.new_zeros(batch, heads_q, seqlen_q, v.shape[-1])
        if sinks is not None:
            return out, q.new_zeros(batch, heads_q, seqlen_q) + sinks.to(q.dtype)[:, None]
        return out, q.new_full((batch, heads_q, seqlen_q), float("-inf"))
    scores = _scores(call, problem)

    # Softmax that gives 0 (not NaN) on fully masked rows. Subtracting the row max is
    # exact for any constant, so the max is detached. A sink is one more logit per head in
    # the denominator, with no value.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    no_keys = torch.isneginf(row_max)  # fully masked rows (before the sink joins)
    if sinks is not None:
        sink = sinks.to(scores.dtype)[:, None, None]
        row_max = torch.maximum(row_max, sink.detach())
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    exp_scores = torch.exp(scores - row_max)
    denominator = exp_scores.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denominator = denominator + torch.exp(sink - row_max)
    probabilities = exp_scores / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    lse = (row_max + torch.log(denominator)).squeeze(-1)
    out = torch.matmul(_dropped(call, problem, probabilities), _expand_groups(v, heads_q))
    # A fully masked row is 0 even when an invisible value is NaN or Inf (0 * NaN is NaN).
    return torch.where(no_keys, torch.zeros_like(out), out), lse


def _flash_objective(
    call: AttentionCall,
    problem: _Problem,
    sinks: torch.Tensor | None,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """A scalar whose gradient is FlashAttention's backward given out and lse (B, Hq, Sq, ·).

    With P = exp(s - lse) from the given lse (not renormalized) and D_i = rowsum(dO_i * O_i)
    from the given O, the objective sum_i [dO_i . (P_drop V)_i - D_i (sum_j P_ij + exp(sink - lse_i))]
    has d/dv = P_drop^T dO, d/ds = P * (dP - D) with dP = dO V^T under dropout's mask,
    and d/dsink = -sum_i exp(sink - lse_i) D_i (docs/semantics.md, Gradients); autograd
    carries d/ds through the score formula (softcap, ALiBi, masks, scale) to q, k and the options.
    """
    delta = (grad_out * out).sum(-1)
    # A fully masked row has lse -inf and every score -inf: its P is exp(-inf) = 0, not NaN.
    anchor = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    normalizer_terms = torch.zeros_like(delta)
    if sinks is not None:
        normalizer_terms = normalizer_terms + torch.exp(sinks.to(lse.dtype)[:, None] - anchor)
    value_term = delta.new_zeros(())
    if problem.k.shape[2] > 0 and problem.q.numel() > 0:
        probabilities = torch.exp(_scores(call, problem) - anchor[..., None])
        normalizer_terms = normalizer_terms + probabilities.sum(-1)
        weighted_values = torch.matmul(
            _dropped(call, problem, probabilities), _expand_groups(problem.v, problem.q.shape[1])
        )
        value_term = (grad_out * weighted_values).sum()
    return value_term - (delta * normalizer_terms).sum()


def _sequence_keys(call: AttentionCall, k: torch.Tensor, v: torch.Tensor, index: int) -> tuple[torch.Tensor, ...]:
    """(keys (Sk_i, Hkv, D), values (Sk_i, Hkv, Dv)) of varlen sequence index: a slice of the
    packed keys, or its cache_lengths[index] positions gathered from its blocks (paged)."""
    if not call.is_paged:
        start, end = int(call.cu_seqlens_k[index]), int(call.cu_seqlens_k[index + 1])
        return k[start:end], v[start:end]
    positions = torch.arange(int(call.cache_lengths[index]), device=k.device)
    blocks = call.block_table[index].to(torch.int64)[positions // call.block_size]
    rows = positions % call.block_size
    return k[blocks, rows], v[blocks, rows]


def _problems(call: AttentionCall, compute_dtype: torch.dtype) -> list[_Problem]:
    """The call as dense problems in compute_dtype: itself, or one per varlen sequence
    (each with its own Sq and Sk for the causal alignment, and its index for dropout)."""
    q, k, v = (t.to(compute_dtype) for t in (call.q, call.k, call.v))
    # 8-bit K / V: the values times their scales (docs/semantics.md, "Quantized K and V").
    if call.k_descale is not None:
        k = k * call.k_descale.to(compute_dtype)[..., None]
    if call.v_descale is not None:
        v = v * call.v_descale.to(compute_dtype)[..., None]
    if not call.is_varlen:
        if call.key_lengths is not None:
            # Rows at or past key_lengths[b] are storage, not input (docs/semantics.md): a
            # NaN left there (or in their scales) reaches no output and no gradient.
            keys = semantics.within_key_lengths(call.key_lengths.to(k.device), k.shape[2])[:, None, :, None]
            k = torch.where(keys, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(keys, v, torch.zeros((), dtype=v.dtype, device=v.device))
        index = torch.arange(q.shape[0], device=q.device)
        return [_Problem(q, k, v, call.attn_mask, call.key_lengths, call.alibi_slopes, index, None)]
    offsets_q = call.cu_seqlens_q.tolist()
    problems = []
    for index in range(len(offsets_q) - 1):
        tokens = (offsets_q[index], offsets_q[index + 1])
        q_i = q[tokens[0] : tokens[1]].transpose(0, 1)[None]
        k_i, v_i = _sequence_keys(call, k, v, index)
        slopes = call.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[index]
        sequence = torch.tensor([index], device=q.device)
        problems.append(
            _Problem(q_i, k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None], None, None, slopes, sequence, tokens)
        )
    return problems


def _compute(call: AttentionCall, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    problems = _problems(call, compute_dtype)
    if not call.is_varlen:
        return _attend_dense(call, problems[0], call.sinks)
    outs, lses = [], []
    for problem in problems:
        out_i, lse_i = _attend_dense(call, problem, call.sinks)
        outs.append(out_i[0].transpose(0, 1))
        lses.append(lse_i[0])
    q = call.q
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, q.shape[1], call.v.shape[-1], dtype=compute_dtype)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=compute_dtype)
    return out, lse


def _flash_gradients(
    call: AttentionCall,
    compute_dtype: torch.dtype,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    names: tuple[str, ...],
) -> tuple[torch.Tensor, ...]:
    """Gradients of the tensors named (q, k, v, options) given out and lse, in compute_dtype."""
    with torch.enable_grad():
        inputs = [getattr(call, name).detach().to(compute_dtype).requires_grad_(True) for name in names]
        call = call.with_tensors(**dict(zip(names, inputs)))
        grad_out, out, lse = (t.detach().to(compute_dtype) for t in (grad_out, out, lse))
        objective = lse.new_zeros(())
        for problem in _problems(call, compute_dtype):
            rows = (problem.rows(grad_out), problem.rows(out), problem.rows(lse, heads_first=True))
            objective = objective + _flash_objective(call, problem, call.sinks, *rows)
        grads = torch.autograd.grad(objective, inputs, allow_unused=True) if objective.requires_grad else ()
    grads = grads or (None,) * len(inputs)
    return tuple(torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, inputs))


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention(
    call: AttentionCall,
    compute_dtype: torch.dtype | None = None,
    grad_out: torch.Tensor | None = None,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Attention per docs/semantics.md, computed entirely in compute_dtype.

    Returns (out, lse, grads) in compute_dtype; grads is (dq, dk, dv) for grad_out, then
    the gradient of each option named in option_gradients (semantics.DIFFERENTIABLE_OPTIONS,
    shaped like that option), or None without grad_out. With compute_dtype=q.dtype this is
    the "same low precision" run of the parity rule; with float64 it is the oracle.
    """
    compute_dtype = compute_dtype or default_compute_dtype(call.dtype)
    if grad_out is None:
        with torch.no_grad():
            out, lse = _compute(call, compute_dtype)
        return out, lse, None
    with torch.enable_grad():
        names = ("q", "k", "v", *option_gradients)
        inputs = [getattr(call, name).detach().to(compute_dtype).requires_grad_(True) for name in names]
        out, lse = _compute(call.with_tensors(**dict(zip(names, inputs))), compute_dtype)
        if out.requires_grad:
            grads = torch.autograd.grad(out, inputs, grad_out.to(compute_dtype), allow_unused=True)
        else:  # no keys at all: the output is constant 0
            grads = (None,) * len(inputs)
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
    return out.detach(), lse.detach(), grads


def differentiable_reference(call: AttentionCall, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out of reference_attention on autograd's graph (in compute_dtype), for callers that
    differentiate it themselves: MultiheadAttention's attention weights."""
    out, _ = _compute(call, compute_dtype or default_compute_dtype(call.dtype))
    return out


def forward(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = reference_attention(call)
    return out.to(call.dtype), lse.to(semantics.lse_dtype(call.dtype))


def backward(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, *gradients of option_gradients), each in its input's dtype.

    FlashAttention's backward given out (*q.shape[:-1], Dv) and lse (B, Hq, Sq) or (Hq, Tq):
    P_ij = exp(s_ij - lse_i), D_i = rowsum(dO_i * O_i), dS = P * (dP - D), computed in the
    reference's compute dtype (float64 for float64 inputs). out and lse need not be this
    call's own: a block of a longer sequence is handed the merged ones of its rows.
    """
    names = ("q", "k", "v", *option_gradients)
    grads = _flash_gradients(call, default_compute_dtype(call.dtype), grad_out, out, lse, names)
    return tuple(grad.to(getattr(call, name).dtype) for name, grad in zip(names, grads))


BACKEND = Backend(
    name="reference",
    description="plain PyTorch ops; any device and dtype; materializes the score matrix",
    capabilities=Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        features=frozenset(semantics.FEATURES),
        max_head_dim=semantics.MAX_HEAD_DIM,
        priority={"cpu": 0, "cuda": 0},
        differentiable_options=frozenset(semantics.DIFFERENTIABLE_OPTIONS),
    ),
    forward=forward,
    backward=backward,
    # Its varlen path slices sequences with offsets read on the host.
    reads_metadata_on_host=True,
)
