"""Decode attention: few query rows against a long KV, split over the keys (split-KV).

With Sq <= 16 the forward kernel would run one mostly empty query block per head and
leave most of the GPU idle. Here one program serves a (KV split, KV head, batch) triple:
its rows are all the query rows of all the query heads of the GQA group (each K/V tile
is loaded once for the whole group), and it covers one slice of the keys. Each program
writes a partial output normalized by its own softmax sum, plus that slice's lse; the
combine kernel merges the slices through their lse. Every feature of the forward
kernel is supported (same per-tile rules); fully masked rows give 0 and lse -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fusedattn.semantics import AttentionCall

from . import configs
from .attention_tile import attend_tile
from .utils import (
    LN2,
    Problem,
    descale_arguments,
    descale_pointers,
    dropout_row_hash,
    feature_arguments,
    flat_grid,
    grid_position,
    interpreting,
    key_range,
    key_strides,
    launch,
    lse_strides,
    padded_dim,
    paging_arguments,
    score_rule,
    sequence_bounds,
    sequence_strides,
)


@triton.jit
def attention_decode_split_kernel(
    Q,
    K,
    V,
    PartialOut,
    PartialLse,
    Mask,
    KeyLengths,
    CuSeqlensQ,
    CuSeqlensK,
    Alibi,
    BlockTable,
    CacheLengths,
    KDescale,
    VDescale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    stride_ab,
    stride_ah,
    stride_table,
    stride_kblock,
    stride_vblock,
    last_block,
    stride_kdb,
    stride_kdh,
    stride_kds,
    stride_kdblock,
    stride_vdb,
    stride_vdh,
    stride_vds,
    stride_vdblock,
    extent_q,
    extent_k,
    heads_q,
    heads_kv,
    group,
    splits,
    keys_per_split,
    rows_per_batch,
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
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_K_DESCALE: tl.constexpr,
    HAS_V_DESCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split, kv_head, batch = grid_position(splits, heads_kv)
    q_start, k_start, len_q, len_k, key_limit, position_offset = sequence_bounds(
        batch, CuSeqlensQ, CuSeqlensK, KeyLengths, extent_q, extent_k, IS_VARLEN, HAS_KEY_LENGTHS, BOTTOM_RIGHT,
        IS_PAGED, CacheLengths, query_start - key_start,
    )  # fmt: skip
    paging = (BlockTable + batch.to(tl.int64) * stride_table, stride_kblock, stride_vblock, last_block)
    descales = descale_pointers(
        KDescale, VDescale, batch, kv_head, k_start, stride_kdb, stride_kdh, stride_kds, stride_kdblock, stride_vdb,
        stride_vdh, stride_vds, stride_vdblock,
    )  # fmt: skip
    # Row r of this program is query row r % Sq of query head kv_head * group + r // Sq
    # (a varlen sequence may have no rows: nothing is valid then).
    slots = tl.arange(0, BLOCK_M)
    row_valid = slots < group * len_q
    rows = slots % tl.maximum(len_q, 1)
    heads = kv_head * group + slots // tl.maximum(len_q, 1)
    heads = tl.where(row_valid, heads, kv_head * group)
    tokens = q_start + rows  # packed token (varlen) or row (dense) of each slot
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    batch64 = batch.to(tl.int64)
    q = tl.load(
        Q
        + batch64 * stride_qb
        + heads[:, None].to(tl.int64) * stride_qh
        + tokens[:, None].to(tl.int64) * stride_qs
        + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    k_base = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    row_hash = rows.to(tl.uint32)
    if HAS_DROPOUT:
        row_hash = dropout_row_hash(DropoutSeed, batch, heads, rows + query_start)
    lo, hi = key_range(
        len_q * 0,
        len_q - 1,
        position_offset,
        key_limit,
        window_left,
        window_right,
        CAUSAL,
        HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT,
        BLOCK_N,
    )
    lo = tl.maximum(lo, split * keys_per_split)
    hi = tl.minimum(hi, (split + 1) * keys_per_split)
    rule = score_rule(
        scale, softcap, window_left, window_right, Mask, stride_mb, stride_mh, stride_mq, stride_mk, Alibi, stride_ab,
        stride_ah,
    )  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        accumulator, row_max, row_sum = attend_tile(
            q, accumulator, row_max, row_sum, start_n, k_base, v_base, stride_ks, stride_vs, paging, descales, rows, heads,
            row_valid, row_hash, batch, key_limit, position_offset, rule, (dropout_threshold, key_start), offs_d, offs_dv,
            d_valid, dv_valid, CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP,
            HAS_DROPOUT, INPUT_PRECISION, True, False, IS_PAGED, PAGE_SIZE, HAS_K_DESCALE, HAS_V_DESCALE, BLOCK_N,
        )  # fmt: skip

    empty = row_sum == 0.0
    # A slice with no key is 0, not 0 * a NaN value its tiles met (its lse -inf drops it).
    out = tl.where(empty[:, None], 0.0, accumulator / tl.where(empty, 1.0, row_sum)[:, None])
    if HAS_DROPOUT:
        out = out * dropout_keep_scale
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(tl.where(empty, 1.0, row_sum))) * LN2)
    # Partial results: (tokens, Hq, splits) lse and (tokens, Hq, splits, Dv) out, contiguous;
    # tokens are B * Sq rows (dense) or the packed query tokens (varlen).
    partial_index = ((batch64 * rows_per_batch + tokens) * heads_q + heads) * splits + split
    tl.store(PartialLse + partial_index, lse, mask=row_valid)
    tl.store(
        PartialOut + partial_index[:, None] * HEAD_DIM_V + offs_dv[None, :],
        out,
        mask=row_valid[:, None] & dv_valid[None, :],
    )


@triton.jit
def attention_decode_combine_kernel(
    PartialOut,
    PartialLse,
    Out,
    Lse,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    Sinks,
    heads_q,
    seqlen_q,
    splits,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s, one (token, head)
    per program; token = batch * seqlen_q + row (varlen: seqlen_q is the packed count).
    A head's sink joins here, once, as one more slice with lse = sink and output 0."""
    row_index = tl.program_id(0)
    head = row_index % heads_q
    token = row_index // heads_q
    row = token % seqlen_q
    batch = token // seqlen_q
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_valid = offs_s < splits
    partial_lse = tl.load(PartialLse + row_index.to(tl.int64) * splits + offs_s, mask=split_valid, other=float("-inf"))
    largest = tl.max(partial_lse, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + head).to(tl.float32)
        largest = tl.maximum(largest, sink)
    safe_largest = tl.where(largest == float("-inf"), 0.0, largest)
    weights = tl.exp(partial_lse - safe_largest)
    total = tl.sum(weights, 0)
    if HAS_SINKS:
        total += tl.exp(sink - safe_largest)
    # The partial outputs SPLIT_CHUNK slices at a time: all of them at once would hold
    # BLOCK_SPLITS x BLOCK_DV floats in registers (spills at Dv 512).
    out = tl.zeros((BLOCK_DV,), tl.float32)
    for first in range(0, splits, SPLIT_CHUNK):
        offs_c = first + tl.arange(0, SPLIT_CHUNK)
        chunk_valid = offs_c < splits
        chunk_lse = tl.load(
            PartialLse + row_index.to(tl.int64) * splits + offs_c, mask=chunk_valid, other=float("-inf")
        )
        partial_out = tl.load(
            PartialOut + (row_index.to(tl.int64) * splits + offs_c[:, None]) * HEAD_DIM_V + offs_dv[None, :],
            mask=chunk_valid[:, None] & (offs_dv < HEAD_DIM_V)[None, :],
            other=0.0,
        )
        out += tl.sum(partial_out * tl.exp(chunk_lse - safe_largest)[:, None], 0)
    empty = total == 0.0
    out = out / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("-inf"), safe_largest + tl.log(tl.where(empty, 1.0, total)))
    batch64 = batch.to(tl.int64)
    tl.store(
        Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + row.to(tl.int64) * stride_os + offs_dv,
        out.to(Out.dtype.element_ty),
        mask=offs_dv < HEAD_DIM_V,
    )
    tl.store(Lse + batch64 * stride_lb + head.to(tl.int64) * stride_lh + row.to(tl.int64) * stride_ls, lse)


def split_count(problem: Problem, block_n: int, device: torch.device) -> int:
    """How many key slices: enough programs to fill the GPU twice, at least two tiles each."""
    tiles = triton.cdiv(problem.seqlen_k, block_n)
    if interpreting() or device.type != "cuda":
        return max(1, min(3, tiles))
    target = 2 * configs.multiprocessor_count(device.index or 0)
    wanted = triton.cdiv(target, problem.batch * problem.heads_kv)
    return max(1, min(wanted, triton.cdiv(tiles, 2), 128))


def run_decode(call: AttentionCall, problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out and lse for a call with few query rows per sequence: dense (B, Hq, Sq, Dv)
    and (B, Hq, Sq), or varlen (T, Hq, Dv) and (Hq, T)."""
    q, k, v = call.q, call.k, call.v
    block_d = padded_dim(problem.head_dim)
    block_dv = padded_dim(problem.head_dim_v)
    config = configs.decode_config(max(block_d, block_dv), q.dtype)
    block_n = config["BLOCK_N"]
    splits = split_count(problem, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(problem.seqlen_k, block_n), splits) * block_n
    varlen = problem.varlen
    tokens = q.shape[0] if varlen else problem.batch * problem.seqlen_q
    rows = tokens * problem.heads_q
    features = feature_arguments(call)
    # The sink joins in the combine kernel (once per row), not in the key slices.
    sinks, has_sinks = features.pop("Sinks"), features.pop("HAS_SINKS")
    partial_out = torch.empty((rows, splits, problem.head_dim_v), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
    launch(
        attention_decode_split_kernel,
        flat_grid(splits, problem.heads_kv, problem.batch),
        Q=q,
        K=k,
        V=v,
        PartialOut=partial_out,
        PartialLse=partial_lse,
        **dict(zip(("stride_qb", "stride_qh", "stride_qs"), sequence_strides(q, varlen))),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks"), key_strides(k, call))),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs"), key_strides(v, call))),
        heads_q=problem.heads_q,
        heads_kv=problem.heads_kv,
        group=problem.group,
        splits=splits,
        keys_per_split=keys_per_split,
        rows_per_batch=0 if varlen else problem.seqlen_q,
        HEAD_DIM=problem.head_dim,
        HEAD_DIM_V=problem.head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_M=max(16, triton.next_power_of_2(problem.group * problem.seqlen_q)),
        BLOCK_N=block_n,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **features,
        **paging_arguments(call),
        **descale_arguments(call),
    )
    launch(
        attention_decode_combine_kernel,
        (rows,),
        PartialOut=partial_out,
        PartialLse=partial_lse,
        Out=out,
        Lse=lse,
        **dict(zip(("stride_ob", "stride_oh", "stride_os"), sequence_strides(out, varlen))),
        **dict(zip(("stride_lb", "stride_lh", "stride_ls"), lse_strides(lse, varlen))),
        Sinks=sinks,
        heads_q=problem.heads_q,
        seqlen_q=max(tokens, 1) if varlen else problem.seqlen_q,
        splits=splits,
        HEAD_DIM_V=problem.head_dim_v,
        BLOCK_DV=block_dv,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
        SPLIT_CHUNK=max(2, min(16, triton.next_power_of_2(splits))),
        HAS_SINKS=has_sinks,
        num_warps=4 if block_dv >= 128 else 2,
    )
