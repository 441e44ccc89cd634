"""One step of the forward online softmax over a tile of keys, shared by the forward
kernel and the split-KV decode kernel (a module of its own, so neither imports the other),
and the attention-sink step that closes a row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import attention_logits, dropout_keep, key_scales, paged_position


@triton.jit
def attend_tile(
    q,
    accumulator,
    row_max,
    row_sum,
    start_n,
    k_source,
    v_source,
    stride_ks,
    stride_vs,
    paging,
    descales,
    rows,
    heads,
    row_valid,
    row_hash,
    batch,
    key_limit,
    position_offset,
    score_rule,
    dropout,
    offs_d,
    offs_dv,
    d_valid,
    dv_valid,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CHECK_VISIBILITY: tl.constexpr,
    USE_TMA: tl.constexpr,
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_K_DESCALE: tl.constexpr,
    HAS_V_DESCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One step of the online softmax over keys start_n .. start_n + BLOCK_N (shared with decode).

    k_source / v_source are the head's K / V base pointers, or tensor descriptors with
    USE_TMA (the copy engine then zero-fills rows past key_limit and columns past the head dim).
    With IS_PAGED the rows come from a paged cache through paging (see paged_position), read
    where they lie. Returns the updated (accumulator, row_max, row_sum); row_max is in
    base-2 units.

    8-bit K / V (float8_e4m3fn, int8) are converted to q's dtype in registers (exact: both
    formats fit fp16's and bf16's significands) and their scales applied per key:
    descales is (K scales, V scales, their sequence strides, their block strides), the
    scale pointers at the head's first key. The K scale multiplies the float32 score
    column, the V scale the float32 probability column before P·V (BLOCK_M x BLOCK_N
    products, fewer than the BLOCK_N x Dv of scaling the value tile, and fewer registers:
    Triton 3.6 for sm_90, d128 bf16 forward 255 -> 231, decode 148 -> 142), except with
    fp16 queries: there it scales the value tile (p * scale would underflow fp16).
    """
    keys = start_n + tl.arange(0, BLOCK_N)
    # Keys at or past key_limit are storage past key_lengths, never read: a NaN left there
    # (or in its scale) must not reach P·V as 0 * NaN (docs/semantics.md).
    key_valid = keys < key_limit
    block = keys.to(tl.int64) * 0
    row = block
    if IS_PAGED:
        _table, stride_kblock, stride_vblock, _last_block = paging
        block, row = paged_position(keys, key_valid, paging, PAGE_SIZE)
        k_rows = block * stride_kblock + row * stride_ks
        v_rows = block * stride_vblock + row * stride_vs
    else:
        # 64-bit row offsets: key * stride passes 2**31 for long K/V with wide rows (varlen, BSHD views).
        k_rows = keys.to(tl.int64) * stride_ks
        v_rows = keys.to(tl.int64) * stride_vs
    KDescale, VDescale, stride_kds, stride_vds, stride_kdblock, stride_vdblock = descales
    if USE_TMA:
        k_tile = tl.trans(k_source.load([start_n, 0]))
    else:
        k_tile = tl.load(
            k_source + k_rows[None, :] + offs_d[:, None],
            mask=key_valid[None, :] & d_valid[:, None],
            other=0.0,
        )
    qk = tl.dot(q, k_tile.to(q.dtype), input_precision=INPUT_PRECISION)
    if HAS_K_DESCALE:
        qk = qk * key_scales(KDescale, keys, key_valid, block, row, stride_kds, stride_kdblock, IS_PAGED)[None, :]
    logits, _tanh = attention_logits(
        qk, rows[:, None], keys[None, :], heads[:, None], row_valid[:, None], batch, key_limit, position_offset,
        score_rule, CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, HAS_ALIBI, HAS_SOFTCAP, CHECK_VISIBILITY,
    )  # fmt: skip
    new_max = tl.maximum(row_max, tl.max(logits, 1))
    # A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probabilities = tl.math.exp2(logits - safe_max[:, None])
    correction = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * correction + tl.sum(probabilities, 1)
    if HAS_DROPOUT:
        probabilities = tl.where(dropout_keep(row_hash[:, None], keys[None, :], dropout), probabilities, 0.0)
    if USE_TMA:
        v_tile = v_source.load([start_n, 0])
    else:
        v_tile = tl.load(
            v_source + v_rows[:, None] + offs_dv[None, :],
            mask=key_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
    if HAS_V_DESCALE:
        value_scales = key_scales(VDescale, keys, key_valid, block, row, stride_vds, stride_vdblock, IS_PAGED)
        if q.dtype == tl.float16:
            # In fp16, p * scale falls below the normal range for small scales (values near
            # 1e-3 quantized to e4m3 have scales near 2e-6), keeping a bit or two of p: the
            # values themselves (what an fp16 cache would hold) are scaled instead.
            v_tile = v_tile.to(tl.float32) * value_scales[:, None]
        else:
            probabilities = probabilities * value_scales[None, :]  # after row_sum: the sum is over p, not p * scale
    v_tile = v_tile.to(q.dtype)
    accumulator = accumulator * correction[:, None]
    accumulator = tl.dot(probabilities.to(v_tile.dtype), v_tile, accumulator, input_precision=INPUT_PRECISION)
    return accumulator, new_max, row_sum


@triton.jit
def fold_sink(accumulator, row_max, row_sum, Sinks, head, LOG2E_SCALE: tl.constexpr):
    """Add a head's sink logit to the row's softmax denominator (no value): the running
    (max, sum, accumulator) in base 2 after the last tile. A row that saw no key then sums
    to exp(sink) and gets output 0 and lse = sink; a -inf sink changes nothing."""
    sink = tl.load(Sinks + head).to(tl.float32) * LOG2E_SCALE
    combined = tl.maximum(row_max, sink)
    shift = tl.where(combined == float("-inf"), 0.0, combined)
    rescale = tl.math.exp2(row_max - shift)
    # A row that saw no key (sum 0; a NaN row's sum is NaN) is 0, not 0 * a NaN value its
    # block's tiles met.
    accumulator = tl.where((row_sum == 0.0)[:, None], 0.0, accumulator * rescale[:, None])
    return accumulator, shift, row_sum * rescale + tl.math.exp2(sink - shift)
