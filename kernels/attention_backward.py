"""Backward attention (FlashAttention-2 style): recompute the probabilities from lse.

Three kernels:
  * preprocess: delta = rowsum(dO * O), one float per query row;
  * dK/dV: one program per (key block, KV head or part of its GQA group, batch), in the
    transposed orientation (S^T = K Q^T: P^T and dS^T are the left operands of the dV and
    dK dots straight from registers); it loops over its query heads and over the query
    blocks that can see its keys, so dK/dV are reduced inside the program, with no
    atomics; when B * Hkv is too small to fill the GPU, a group is split over several
    programs whose float32 partial sums the launcher adds;
  * dQ: one program per (query block, query head, batch), looping over key blocks.

Default mode folds dQ into the dK/dV kernel with float32 atomic adds (one pass over the
score matrix instead of two; the order of the adds is not fixed). Deterministic mode,
selected by torch.use_deterministic_algorithms(True) or FUSEDATTN_DETERMINISTIC=1, runs
the separate dQ kernel instead: every output then has a fixed summation order and is
bitwise reproducible.

Dropout recomputes the forward's counter-based mask: dV uses the dropped, rescaled
probabilities, dP is masked and rescaled the same way, and dS = P * (dP - delta).
Softcap multiplies dS by 1 - tanh^2; ALiBi and additive masks pass gradients unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fusedattn import environment
from fusedattn.outputs import allocate_output
from fusedattn.semantics import AttentionCall

from . import configs
from .utils import (
    LOG2E,
    Problem,
    attention_logits,
    device_guard,
    dropout_keep,
    dropout_row_hash,
    feature_arguments,
    flat_grid,
    grid_position,
    key_range,
    last_dim_contiguous,
    launch,
    lse_strides,
    packed_span,
    padded_dim,
    query_range,
    score_rule,
    sequence_bounds,
    sequence_strides,
)


@triton.jit
def attention_backward_preprocess_kernel(
    Out,
    GradOut,
    Delta,
    Lse,
    Sinks,
    SinkTerms,
    CuSeqlensQ,
    stride_ob,
    stride_oh,
    stride_os,
    stride_gb,
    stride_gh,
    stride_gs,
    stride_lb,
    stride_lh,
    stride_ls,
    extent_q,
    heads_q,
    grid_rows,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d] in float32; with sinks also the row's term
    of d sink[head] = -sum_rows exp(sink - lse) * delta (the sink's probability times delta)."""
    block_m, head, batch = grid_position(tl.cdiv(grid_rows, BLOCK_M), heads_q)
    if IS_VARLEN:
        q_start, len_q = packed_span(CuSeqlensQ, batch, extent_q)
    else:
        q_start = batch * 0
        len_q = batch * 0 + extent_q
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = (rows < len_q)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    row_offsets = (q_start + rows)[:, None].to(tl.int64)
    out = tl.load(
        Out
        + batch.to(tl.int64) * stride_ob
        + head.to(tl.int64) * stride_oh
        + row_offsets * stride_os
        + offs_dv[None, :],
        mask=valid,
        other=0.0,
    )
    grad_out = tl.load(
        GradOut
        + batch.to(tl.int64) * stride_gb
        + head.to(tl.int64) * stride_gh
        + row_offsets * stride_gs
        + offs_dv[None, :],
        mask=valid,
        other=0.0,
    )
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    statistics = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ls
    tl.store(Delta + statistics + rows * stride_ls, delta, mask=rows < len_q)
    if HAS_SINKS:
        lse = tl.load(Lse + statistics + rows * stride_ls, mask=rows < len_q, other=float("-inf"))
        sink = tl.load(Sinks + head).to(tl.float32)
        # lse >= sink when the sink is finite; a -inf sink has probability 0.
        sink_probability = tl.where(lse == float("-inf"), 0.0, tl.exp(sink - lse))
        tl.store(SinkTerms + statistics + rows * stride_ls, -sink_probability * delta, mask=rows < len_q)


@triton.jit
def _load_row_statistics(Lse, Delta, lse_base, rows, row_valid, stride_ls):
    """lse in base 2 (+inf on fully masked rows, so their probabilities are 0) and delta."""
    lse = tl.load(Lse + lse_base + rows * stride_ls, mask=row_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(Delta + lse_base + rows * stride_ls, mask=row_valid, other=0.0)
    return lse, delta


@triton.jit
def score_gradients(
    qk,
    grad_probabilities,
    lse,
    delta,
    rows,
    keys,
    heads,
    row_valid,
    row_hash,
    batch,
    key_limit,
    position_offset,
    rule,
    dropout,
    dropout_keep_scale,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """(kept probabilities, dS) of one tile, recomputed from lse, in either orientation.

    qk = q . k and grad_probabilities = dO . v come from the caller: (BLOCK_M, BLOCK_N) for
    the dQ kernel, or transposed (BLOCK_N, BLOCK_M) for the dK/dV kernel, which then uses
    P^T and dS^T straight from registers as the left operand of its dots (no round trip
    through shared memory). Every per-row and per-key operand (lse, delta, rows, heads,
    row_valid, row_hash; keys) comes shaped to broadcast in that orientation.

    kept = P with the dropout mask applied but not yet rescaled by 1 / (1 - p) (the caller
    scales dV once at the end: P / (1 - p) can pass fp16's range for p near 1); dS =
    P * (dP - delta) with dP masked and rescaled like P, times 1 - tanh^2 under softcap.
    """
    logits, softcap_tanh = attention_logits(
        qk, rows, keys, heads, row_valid, batch, key_limit, position_offset, rule, CAUSAL, HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP,
    )  # fmt: skip
    probabilities = tl.math.exp2(logits - lse)
    kept = probabilities
    if HAS_DROPOUT:
        keep = dropout_keep(row_hash, keys, dropout)
        kept = tl.where(keep, probabilities, 0.0)
        grad_probabilities = tl.where(keep, grad_probabilities * dropout_keep_scale, 0.0)
    grad_scores = probabilities * (grad_probabilities - delta)
    if HAS_SOFTCAP:
        grad_scores = grad_scores * (1.0 - softcap_tanh * softcap_tanh)
    return kept, grad_scores


@triton.jit
def attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    GradQAccumulator,
    GradK,
    GradV,
    Mask,
    KeyLengths,
    CuSeqlensQ,
    CuSeqlensK,
    Alibi,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_gb,
    stride_gh,
    stride_gs,
    stride_aqb,
    stride_aqh,
    stride_aqs,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    stride_ab,
    stride_ah,
    extent_q,
    extent_k,
    heads_kv,
    grid_keys,
    group,
    group_splits,
    scale,
    softcap,
    window_left,
    window_right,
    DropoutSeed,
    dropout_threshold,
    dropout_keep_scale,
    query_start,
    key_start,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # GQA: group_splits programs share a KV head, each over group / group_splits of its
    # query heads, into a float32 partial buffer the launcher sums (no serial loop over the
    # whole group when B * Hkv is too small to fill the GPU; no atomics: deterministic).
    block_n, program_head, batch = grid_position(tl.cdiv(grid_keys, BLOCK_N), heads_kv * group_splits)
    kv_head = program_head // group_splits
    members = group // group_splits
    first_member = (program_head % group_splits) * members
    q_start, k_start, len_q, len_k, key_limit, position_offset = sequence_bounds(
        batch, CuSeqlensQ, CuSeqlensK, KeyLengths, extent_q, extent_k, IS_VARLEN, HAS_KEY_LENGTHS, BOTTOM_RIGHT,
        False, None, query_start - key_start,
    )  # fmt: skip
    first_key = block_n * BLOCK_N
    if first_key >= len_k:
        return

    keys = first_key + tl.arange(0, BLOCK_N)
    key_valid = keys < len_k  # dK and dV are written up to Sk (0 past key_lengths)
    key_read = keys < key_limit  # K and V are read only before key_lengths
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    batch64 = batch.to(tl.int64)
    k_rows = (k_start + keys)[:, None].to(tl.int64)
    k_tile = tl.load(
        K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_rows * stride_ks + offs_d[None, :],
        mask=key_read[:, None] & d_valid[None, :],
        other=0.0,
    )
    v_tile = tl.load(
        V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_rows * stride_vs + offs_dv[None, :],
        mask=key_read[:, None] & dv_valid[None, :],
        other=0.0,
    )
    grad_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)

    lo, hi = query_range(
        first_key,
        first_key + BLOCK_N - 1,
        position_offset,
        len_q,
        key_limit,
        window_left,
        window_right,
        CAUSAL,
        HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT,
        BLOCK_M,
    )
    rule = score_rule(
        scale, softcap, window_left, window_right, Mask, stride_mb, stride_mh, stride_mq, stride_mk, Alibi, stride_ab,
        stride_ah,
    )  # fmt: skip
    for member in range(first_member, first_member + members):
        head = kv_head * group + member
        heads = tl.full((BLOCK_M,), 0, tl.int32) + head
        q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh
        grad_out_base = GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh
        lse_base = batch64 * stride_lb + head.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ls
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_valid = rows < len_q
            q_rows = (q_start + rows)[:, None].to(tl.int64)
            q = tl.load(
                q_base + q_rows * stride_qs + offs_d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0
            )
            grad_out = tl.load(
                grad_out_base + q_rows * stride_gs + offs_dv[None, :],
                mask=row_valid[:, None] & dv_valid[None, :],
                other=0.0,
            )
            lse, delta = _load_row_statistics(Lse, Delta, lse_base, rows, row_valid, stride_ls)
            row_hash = rows.to(tl.uint32)
            if HAS_DROPOUT:
                row_hash = dropout_row_hash(DropoutSeed, batch, heads, rows + query_start)
            # Transposed orientation: S^T = K Q^T, so P^T and dS^T feed dV += P^T dO and
            # dK += dS^T Q from registers.
            qk_t = tl.dot(k_tile, tl.trans(q), input_precision=INPUT_PRECISION)
            grad_probabilities_t = tl.dot(v_tile, tl.trans(grad_out), input_precision=INPUT_PRECISION)
            kept_t, grad_scores_t = score_gradients(
                qk_t, grad_probabilities_t, lse[None, :], delta[None, :], rows[None, :], keys[:, None],
                heads[None, :], row_valid[None, :], row_hash[None, :], batch, key_limit, position_offset, rule,
                (dropout_threshold, key_start), dropout_keep_scale, CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND,
                HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT,
            )  # fmt: skip
            grad_v = tl.dot(kept_t.to(grad_out.dtype), grad_out, grad_v, input_precision=INPUT_PRECISION)
            grad_scores_t = grad_scores_t.to(q.dtype)
            grad_k = tl.dot(grad_scores_t, q, grad_k, input_precision=INPUT_PRECISION)
            if ATOMIC_DQ:
                grad_q = tl.dot(tl.trans(grad_scores_t), k_tile, input_precision=INPUT_PRECISION) * scale
                accumulator_pointers = (
                    GradQAccumulator
                    + batch64 * stride_aqb
                    + head.to(tl.int64) * stride_aqh
                    + q_rows * stride_aqs
                    + offs_d[None, :]
                )
                tl.atomic_add(accumulator_pointers, grad_q, mask=row_valid[:, None] & d_valid[None, :], sem="relaxed")

    grad_k = grad_k * scale
    if HAS_DROPOUT:
        grad_v = grad_v * dropout_keep_scale
    # Rows past key_lengths get 0, not 0 * a NaN in q or dO.
    grad_k = tl.where(key_read[:, None], grad_k, 0.0)
    grad_v = tl.where(key_read[:, None], grad_v, 0.0)
    tl.store(
        GradK + batch64 * stride_dkb + program_head.to(tl.int64) * stride_dkh + k_rows * stride_dks + offs_d[None, :],
        grad_k.to(GradK.dtype.element_ty),
        mask=key_valid[:, None] & d_valid[None, :],
    )
    tl.store(
        GradV + batch64 * stride_dvb + program_head.to(tl.int64) * stride_dvh + k_rows * stride_dvs + offs_dv[None, :],
        grad_v.to(GradV.dtype.element_ty),
        mask=key_valid[:, None] & dv_valid[None, :],
    )


@triton.jit
def attention_backward_dq_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    GradQ,
    Mask,
    KeyLengths,
    CuSeqlensQ,
    CuSeqlensK,
    Alibi,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_gb,
    stride_gh,
    stride_gs,
    stride_dqb,
    stride_dqh,
    stride_dqs,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    stride_ab,
    stride_ah,
    extent_q,
    extent_k,
    heads_q,
    grid_rows,
    group,
    scale,
    softcap,
    window_left,
    window_right,
    DropoutSeed,
    dropout_threshold,
    dropout_keep_scale,
    query_start,
    key_start,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block_m, head, batch = grid_position(tl.cdiv(grid_rows, BLOCK_M), heads_q)
    kv_head = head // group
    q_start, k_start, len_q, len_k, key_limit, position_offset = sequence_bounds(
        batch, CuSeqlensQ, CuSeqlensK, KeyLengths, extent_q, extent_k, IS_VARLEN, HAS_KEY_LENGTHS, BOTTOM_RIGHT,
        False, None, query_start - key_start,
    )  # fmt: skip
    first_row = block_m * BLOCK_M
    if first_row >= len_q:
        return

    rows = first_row + tl.arange(0, BLOCK_M)
    row_valid = rows < len_q
    heads = tl.full((BLOCK_M,), 0, tl.int32) + head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    batch64 = batch.to(tl.int64)
    q_rows = (q_start + rows)[:, None].to(tl.int64)
    q = tl.load(
        Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + q_rows * stride_qs + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    grad_out = tl.load(
        GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh + q_rows * stride_gs + offs_dv[None, :],
        mask=row_valid[:, None] & dv_valid[None, :],
        other=0.0,
    )
    lse_base = batch64 * stride_lb + head.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ls
    lse, delta = _load_row_statistics(Lse, Delta, lse_base, rows, row_valid, stride_ls)
    row_hash = rows.to(tl.uint32)
    if HAS_DROPOUT:
        row_hash = dropout_row_hash(DropoutSeed, batch, heads, rows + query_start)
    k_base = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    lo, hi = key_range(
        first_row,
        first_row + BLOCK_M - 1,
        position_offset,
        key_limit,
        window_left,
        window_right,
        CAUSAL,
        HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT,
        BLOCK_N,
    )
    rule = score_rule(
        scale, softcap, window_left, window_right, Mask, stride_mb, stride_mh, stride_mq, stride_mk, Alibi, stride_ab,
        stride_ah,
    )  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        key_valid = keys < key_limit  # storage past key_lengths is never read
        key_offsets = keys.to(tl.int64)  # key * stride may pass 2**31
        k_tile = tl.load(
            k_base + key_offsets[:, None] * stride_ks + offs_d[None, :],
            mask=key_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        v_tile = tl.load(
            v_base + key_offsets[:, None] * stride_vs + offs_dv[None, :],
            mask=key_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k_tile), input_precision=INPUT_PRECISION)
        grad_probabilities = tl.dot(grad_out, tl.trans(v_tile), input_precision=INPUT_PRECISION)
        _kept, grad_scores = score_gradients(
            qk, grad_probabilities, lse[:, None], delta[:, None], rows[:, None], keys[None, :], heads[:, None],
            row_valid[:, None], row_hash[:, None], batch, key_limit, position_offset, rule, (dropout_threshold, key_start),
            dropout_keep_scale, CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP,
            HAS_DROPOUT,
        )  # fmt: skip
        grad_q = tl.dot(grad_scores.to(k_tile.dtype), k_tile, grad_q, input_precision=INPUT_PRECISION)

    grad_q = grad_q * scale
    tl.store(
        GradQ + batch64 * stride_dqb + head.to(tl.int64) * stride_dqh + q_rows * stride_dqs + offs_d[None, :],
        grad_q.to(GradQ.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


# Programs the dK/dV grid should at least have per multiprocessor before GQA is split.
PROGRAMS_PER_MULTIPROCESSOR = 2
INTERPRETER_MULTIPROCESSORS = 4  # small enough that the tests' shapes split


PREPROCESS_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) kernel


def group_splits(problem: Problem, block_n: int, device: torch.device) -> int:
    """How many programs share one KV head's dK/dV: 1 (the whole group in one program)
    unless B * Hkv * key blocks leaves the GPU idle; then the largest divisor of the
    group that fills it."""
    if problem.group == 1:
        return 1
    if device.type == "cuda":
        multiprocessors = configs.multiprocessor_count(device.index if device.index is not None else 0)
    else:
        multiprocessors = INTERPRETER_MULTIPROCESSORS
    programs = problem.batch * problem.heads_kv * triton.cdiv(problem.seqlen_k, block_n)
    wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, max(programs, 1))
    return max(d for d in range(1, problem.group + 1) if problem.group % d == 0 and d <= wanted)


def _group_partial(gradient: torch.Tensor, splits: int) -> torch.Tensor:
    """A float32 buffer like gradient with Hkv * splits heads (one slice per split),
    poisoned under the tests like every output."""
    shape = list(gradient.shape)
    shape[1] *= splits
    return allocate_output(tuple(shape), torch.float32, gradient.device)


def deterministic_requested() -> bool:
    """torch.use_deterministic_algorithms(True) or FUSEDATTN_DETERMINISTIC=1."""
    return torch.are_deterministic_algorithms_enabled() or environment.get("FUSEDATTN_DETERMINISTIC") == "1"


def _strides(prefix: str, tensor: torch.Tensor, varlen: bool) -> dict[str, int]:
    return dict(zip((prefix + "b", prefix + "h", prefix + "s"), sequence_strides(tensor, varlen)))


def _run_backward(
    call: AttentionCall, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like q, k, v for grad_out shaped like out; lse from the forward."""
    q, k, v, grad_out, out = (last_dim_contiguous(t) for t in (call.q, call.k, call.v, grad_out, out))
    lse = lse.contiguous()
    problem = Problem.of(call)
    varlen = problem.varlen
    block_d = padded_dim(problem.head_dim)
    block_dv = padded_dim(problem.head_dim_v)
    heavy = call.attn_mask is not None or call.dropout_p > 0.0 or call.softcap is not None
    ragged = problem.head_dim != block_d or problem.head_dim_v != block_dv
    dkdv_config, dq_config = configs.backward_configs(max(block_d, block_dv), q.dtype, heavy, ragged)
    features = feature_arguments(call)
    # Sinks change no score gradient (P comes from the lse, which holds them): only the
    # preprocess kernel reads them, for d sinks.
    sinks, has_sinks = features.pop("Sinks"), features.pop("HAS_SINKS")

    delta = torch.empty_like(lse)
    # Rows no sequence covers (varlen) keep a 0 term. Without sinks, unused empty tensors
    # for Lse and SinkTerms, never another argument: torch.compile's functionalization
    # may take any pointer argument for written, and two aliasing written arguments (or a
    # written forward output) break the traced graph.
    sink_terms = torch.zeros_like(lse) if has_sinks else lse.new_empty(0)
    statistics_strides = dict(zip(("stride_lb", "stride_lh", "stride_ls"), lse_strides(lse, varlen)))
    launch(
        attention_backward_preprocess_kernel,
        flat_grid(triton.cdiv(problem.seqlen_q, PREPROCESS_BLOCK_M), problem.heads_q, problem.batch),
        Out=out,
        GradOut=grad_out,
        Delta=delta,
        Lse=lse if has_sinks else lse.new_empty(0),
        Sinks=sinks,
        SinkTerms=sink_terms,
        CuSeqlensQ=features["CuSeqlensQ"],
        **_strides("stride_o", out, varlen),
        **_strides("stride_g", grad_out, varlen),
        **statistics_strides,
        extent_q=features["extent_q"],
        heads_q=problem.heads_q,
        grid_rows=problem.seqlen_q,
        HEAD_DIM_V=problem.head_dim_v,
        BLOCK_DV=block_dv,
        IS_VARLEN=varlen,
        HAS_SINKS=has_sinks,
        BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=4,
    )

    grad_q = allocate_output(tuple(q.shape), q.dtype, q.device)
    grad_k = allocate_output(tuple(k.shape), k.dtype, k.device)
    grad_v = allocate_output(tuple(v.shape), v.dtype, v.device)
    deterministic = deterministic_requested()
    # Atomic mode accumulates dQ in float32 and copies it into grad_q afterwards.
    grad_q_accumulator = grad_q if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    shared = dict(
        Q=q,
        K=k,
        V=v,
        GradOut=grad_out,
        Lse=lse,
        Delta=delta,
        **_strides("stride_q", q, varlen),
        **_strides("stride_k", k, varlen),
        **_strides("stride_v", v, varlen),
        **_strides("stride_g", grad_out, varlen),
        **statistics_strides,
        group=problem.group,
        HEAD_DIM=problem.head_dim,
        HEAD_DIM_V=problem.head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        **features,
    )
    block_n = dkdv_config["BLOCK_N"]
    splits = group_splits(problem, block_n, q.device)
    if splits > 1:
        grad_k_partial, grad_v_partial = (_group_partial(t, splits) for t in (grad_k, grad_v))
    else:
        grad_k_partial, grad_v_partial = grad_k, grad_v
    launch(
        attention_backward_dkdv_kernel,
        flat_grid(triton.cdiv(problem.seqlen_k, block_n), problem.heads_kv * splits, problem.batch),
        GradQAccumulator=grad_q_accumulator,
        GradK=grad_k_partial,
        GradV=grad_v_partial,
        **_strides("stride_aq", grad_q_accumulator, varlen),
        **_strides("stride_dk", grad_k_partial, varlen),
        **_strides("stride_dv", grad_v_partial, varlen),
        heads_kv=problem.heads_kv,
        grid_keys=problem.seqlen_k,
        group_splits=splits,
        ATOMIC_DQ=not deterministic,
        **shared,
        **dkdv_config,
    )
    if splits > 1:
        # Heads are dim 1 of (B, Hkv * splits, Sk, D) and of varlen's (T, Hkv * splits, D).
        for partial, target in ((grad_k_partial, grad_k), (grad_v_partial, grad_v)):
            shape = list(partial.shape)
            shape[1:2] = [problem.heads_kv, splits]
            target.copy_(partial.view(shape).sum(2))
    if deterministic:
        launch(
            attention_backward_dq_kernel,
            flat_grid(triton.cdiv(problem.seqlen_q, dq_config["BLOCK_M"]), problem.heads_q, problem.batch),
            GradQ=grad_q,
            **_strides("stride_dq", grad_q, varlen),
            heads_q=problem.heads_q,
            grid_rows=problem.seqlen_q,
            **shared,
            **dq_config,
        )
    else:
        grad_q.copy_(grad_q_accumulator)
    if not has_sinks:
        return grad_q, grad_k, grad_v
    # d sinks[h]: the sum of the rows' terms over every dimension but the heads (dim 1 of
    # the dense (B, Hq, Sq) statistics, dim 0 of varlen's (Hq, T)): a fixed-order reduction.
    grad_sinks = sink_terms.sum(dim=(0, 2)) if not varlen else sink_terms.sum(dim=1)
    return grad_q, grad_k, grad_v, grad_sinks


def backward(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) shaped like q, k, v for grad_out shaped like out; lse from the forward.
    With option_gradients=("sinks",) also d sinks, (Hq,) float32."""
    with device_guard(call.q):
        grads = _run_backward(call, grad_out, out, lse)
    if "sinks" in option_gradients:
        return grads
    return grads[:3]
