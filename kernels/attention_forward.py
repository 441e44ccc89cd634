"""Forward attention: a FlashAttention-2-style tiled online softmax, one program per
(query block, query head, batch).

Every feature of semantics.py is handled inside the tile loop: the key range is cut to
the tiles causal masking / windows / key lengths leave visible (the others are never
loaded), the boolean or additive mask is read tile by tile through its (possibly zero)
strides, ALiBi and softcap are applied to the scores, and dropout recomputes the
counter-based hash per element. GQA maps query head h to KV head h // group. Head dims
are padded to a power of two with masked loads. Outputs: out in q's dtype and lse
(float32, -inf on fully masked rows, whose out is 0).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from fusedattn import environment
from fusedattn.outputs import allocate_output
from fusedattn.semantics import AttentionCall
from torch._subclasses.fake_tensor import is_fake

from . import attention_decode, configs
from .attention_tile import attend_tile, fold_sink
from .utils import (
    LN2,
    LOG2E,
    Problem,
    concrete_hint,
    descale_arguments,
    descale_pointers,
    device_guard,
    dropout_row_hash,
    feature_arguments,
    flat_grid,
    grid_position,
    interpreting,
    key_range,
    key_strides,
    last_dim_contiguous,
    launch,
    lse_strides,
    padded_dim,
    paging_arguments,
    score_rule,
    sequence_bounds,
    sequence_strides,
)


@triton.jit
def fully_visible_range(
    first_row,
    last_row,
    lo,
    hi,
    position_offset,
    key_limit,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[visible_lo, visible_hi) within [lo, hi): whole tiles every row of the block sees.

    Both ends are multiples of BLOCK_N (or equal to hi), so the three loops of the
    forward kernel partition [lo, hi) into whole tiles.
    """
    visible_end = key_limit  # one past the last key every row sees
    if CAUSAL:
        visible_end = tl.minimum(visible_end, first_row + position_offset + 1)
    if HAS_WINDOW_RIGHT:
        visible_end = tl.minimum(visible_end, first_row + position_offset + window_right + 1)
    visible_lo = lo
    if HAS_WINDOW_LEFT:
        first_key = tl.maximum(lo, last_row + position_offset - window_left)
        visible_lo = ((first_key + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    visible_lo = tl.minimum(visible_lo, hi)
    visible_hi = tl.minimum(tl.maximum(visible_lo, (tl.maximum(visible_end, 0) // BLOCK_N) * BLOCK_N), hi)
    if MASK_KIND == 1:
        visible_lo = hi
        visible_hi = hi
    return visible_lo, visible_hi


@triton.jit
def attention_forward_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Mask,
    KeyLengths,
    CuSeqlensQ,
    CuSeqlensK,
    Alibi,
    Sinks,
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
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
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
    group,
    grid_rows,
    scale,
    softcap,
    window_left,
    window_right,
    DropoutSeed,
    dropout_threshold,
    dropout_keep_scale,
    query_start,
    key_start,
    tune_bucket,
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
    HAS_SINKS: tl.constexpr,
    IS_PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_K_DESCALE: tl.constexpr,
    HAS_V_DESCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blocks = tl.cdiv(grid_rows, BLOCK_M)
    block_m, head, batch = grid_position(blocks, heads_q)
    if CAUSAL:
        # Later query blocks see more keys: start them first for a better tail.
        block_m = blocks - 1 - block_m
    kv_head = head // group
    q_start, k_start, len_q, len_k, key_limit, position_offset = sequence_bounds(
        batch, CuSeqlensQ, CuSeqlensK, KeyLengths, extent_q, extent_k, IS_VARLEN, HAS_KEY_LENGTHS, BOTTOM_RIGHT,
        IS_PAGED, CacheLengths, query_start - key_start,
    )  # fmt: skip
    paging = (BlockTable + batch.to(tl.int64) * stride_table, stride_kblock, stride_vblock, last_block)
    descales = descale_pointers(
        KDescale, VDescale, batch, kv_head, k_start, stride_kdb, stride_kdh, stride_kds, stride_kdblock, stride_vdb,
        stride_vdh, stride_vds, stride_vdblock,
    )  # fmt: skip
    first_row = block_m * BLOCK_M
    if first_row >= len_q:
        return

    rows = first_row + tl.arange(0, BLOCK_M)
    row_offsets = rows.to(tl.int64)  # row * stride may pass 2**31 (see attend_tile)
    row_valid = rows < len_q
    heads = tl.full((BLOCK_M,), 0, tl.int32) + head
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    q = tl.load(
        q_base + row_offsets[:, None] * stride_qs + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    if USE_TMA:
        # Rows end at key_limit, not Sk: the copy engine zero-fills storage past key_lengths.
        k_source = tl.make_tensor_descriptor(k_base, [key_limit, HEAD_DIM], [stride_ks, 1], [BLOCK_N, BLOCK_D])
        v_source = tl.make_tensor_descriptor(v_base, [key_limit, HEAD_DIM_V], [stride_vs, 1], [BLOCK_N, BLOCK_DV])
    else:
        k_source = k_base
        v_source = v_base
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    row_hash = rows.to(tl.uint32)
    if HAS_DROPOUT:
        row_hash = dropout_row_hash(DropoutSeed, batch, heads, rows + query_start)

    last_row = first_row + BLOCK_M - 1
    lo, hi = key_range(
        first_row,
        last_row,
        position_offset,
        key_limit,
        window_left,
        window_right,
        CAUSAL,
        HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT,
        BLOCK_N,
    )
    # Tiles in [visible_lo, visible_hi) are visible to every row of the block: they skip
    # the per-element causal / window / key-length checks. The edges [lo, visible_lo) and
    # [visible_hi, hi) are checked. A boolean mask is checked everywhere.
    visible_lo, visible_hi = fully_visible_range(
        first_row, last_row, lo, hi, position_offset, key_limit, window_left, window_right,
        CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, BLOCK_N,
    )  # fmt: skip
    rule = score_rule(
        scale, softcap, window_left, window_right, Mask, stride_mb, stride_mh, stride_mq, stride_mk, Alibi, stride_ab,
        stride_ah,
    )  # fmt: skip
    # Three ranges, unrolled at compile time: the middle one compiled without the checks.
    for segment in tl.static_range(3):
        if segment == 0:
            segment_lo, segment_hi = lo, visible_lo
        elif segment == 1:
            segment_lo, segment_hi = visible_lo, visible_hi
        else:
            segment_lo, segment_hi = visible_hi, hi
        for start_n in range(segment_lo, segment_hi, BLOCK_N):
            accumulator, row_max, row_sum = attend_tile(
                q, accumulator, row_max, row_sum, start_n, k_source, v_source, stride_ks, stride_vs, paging, descales, rows,
                heads, row_valid, row_hash, batch, key_limit, position_offset, rule, (dropout_threshold, key_start), offs_d,
                offs_dv, d_valid, dv_valid, CAUSAL, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, HAS_ALIBI,
                HAS_SOFTCAP, HAS_DROPOUT, INPUT_PRECISION, segment != 1, USE_TMA, IS_PAGED, PAGE_SIZE, HAS_K_DESCALE, HAS_V_DESCALE, BLOCK_N,
            )  # fmt: skip

    if HAS_SINKS:
        accumulator, row_max, row_sum = fold_sink(accumulator, row_max, row_sum, Sinks, head, LOG2E)
    empty = row_sum == 0.0
    # A row with no key is 0, not 0 * a NaN value its block's tiles met.
    out = tl.where(empty[:, None], 0.0, accumulator / tl.where(empty, 1.0, row_sum)[:, None])
    if HAS_DROPOUT:
        out = out * dropout_keep_scale
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(tl.where(empty, 1.0, row_sum))) * LN2)
    out_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_os
    tl.store(
        out_base + row_offsets[:, None] * stride_os + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_valid[:, None] & dv_valid[None, :],
    )
    lse_base = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_ls
    tl.store(lse_base + row_offsets * stride_ls, lse, mask=row_valid)


_TUNE_KEY = [
    "tune_bucket",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "CAUSAL",
    "HAS_WINDOW_LEFT",
    "HAS_WINDOW_RIGHT",
    "MASK_KIND",
    "HAS_KEY_LENGTHS",
    "IS_VARLEN",
    "HAS_ALIBI",
    "HAS_SOFTCAP",
    "HAS_DROPOUT",
    "HAS_SINKS",
    "IS_PAGED",
    "PAGE_SIZE",
    "HAS_K_DESCALE",
    "HAS_V_DESCALE",
    "USE_TMA",
]


@cache
def _tuned_forward_kernel(block_d: int, dtype: torch.dtype, heavy_features: bool, precision: str):
    """The forward kernel autotuned over the configs for this head dim / dtype / feature
    class / fp32 dot precision."""
    tuned_configs = list(configs.forward_configs(block_d, dtype, heavy_features, precision=precision))
    return triton.autotune(configs=tuned_configs, key=_TUNE_KEY)(attention_forward_kernel)


def _run_forward_kernel(call: AttentionCall, problem: Problem, q, k, v, out, lse) -> None:
    varlen = problem.varlen
    block_d = padded_dim(problem.head_dim)
    block_dv = padded_dim(problem.head_dim_v)
    arguments = dict(
        Q=q,
        K=k,
        V=v,
        Out=out,
        Lse=lse,
        **dict(zip(("stride_qb", "stride_qh", "stride_qs"), sequence_strides(q, varlen))),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks"), key_strides(k, call))),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs"), key_strides(v, call))),
        **dict(zip(("stride_ob", "stride_oh", "stride_os"), sequence_strides(out, varlen))),
        **dict(zip(("stride_lb", "stride_lh", "stride_ls"), lse_strides(lse, varlen))),
        heads_q=problem.heads_q,
        group=problem.group,
        grid_rows=problem.seqlen_q,
        tune_bucket=configs.sequence_bucket(max(concrete_hint(problem.seqlen_q), concrete_hint(problem.seqlen_k))),
        HEAD_DIM=problem.head_dim,
        HEAD_DIM_V=problem.head_dim_v,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        **feature_arguments(call),
        **paging_arguments(call),
        **descale_arguments(call),
    )
    # Exact fp32 dots run on FMAs, which gain nothing from TMA copies, and their TMA
    # variants spill (40-1430 bytes with Triton 3.6 for sm_90): they load K/V the plain way.
    fma_dots = q.dtype == torch.float32 and arguments["INPUT_PRECISION"] == "ieee"
    # Paged rows are gathered block by block, which a tensor descriptor cannot express.
    use_tma = not fma_dots and not call.is_paged and tma_eligible(k, v)
    if use_tma:
        _install_descriptor_allocator()
    if interpreting() or q.device.type != "cuda":
        block = configs.INTERPRETER_BLOCK
        grid = flat_grid(triton.cdiv(problem.seqlen_q, block), problem.heads_q, problem.batch)
        options = dict(BLOCK_M=block, BLOCK_N=block, num_warps=4, num_stages=1)
        launch(attention_forward_kernel, grid, USE_TMA=use_tma, **options, **arguments)
        return
    heavy = call.attn_mask is not None or call.dropout_p > 0.0 or call.softcap is not None
    kernel = _tuned_forward_kernel(max(block_d, block_dv), q.dtype, heavy, arguments["INPUT_PRECISION"])

    def grid(meta):
        return flat_grid(triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.heads_q, problem.batch)

    # No fallback on failure: every config compiles for every head dim TMA claims
    # (scripts/device_compile_check.py), and a failure must surface, not change the path.
    launch(kernel, grid, USE_TMA=use_tma, **arguments)


# ---- Hopper tensor descriptors (TMA) -----------------------------------------------------


def tma_eligible(k: torch.Tensor, v: torch.Tensor) -> bool:
    """K/V tiles come through tensor descriptors (the TMA copy engine) when Triton offers
    them (tl.make_tensor_descriptor), the GPU is Hopper or newer, and the layout meets
    TMA's rules: 16-byte aligned base and strides.

    FUSEDATTN_TRITON_TMA=0 disables the path; =1 also enables it under the interpreter
    (where descriptors are emulated), for tests.
    """
    choice = environment.get("FUSEDATTN_TRITON_TMA")
    if choice == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not hasattr(triton, "set_allocator"):
        return False
    if interpreting() or k.device.type != "cuda":
        if choice != "1":
            return False
    elif torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    for tensor in (k, v):
        size = tensor.element_size()
        if not _base_aligned(tensor) or any((stride * size) % 16 for stride in tensor.stride()[:-1]):
            return False
    return True


def _base_aligned(tensor: torch.Tensor) -> bool:
    """16-byte aligned first element. A tensor traced by torch.compile has no address: its
    storage comes from PyTorch's allocators (aligned far beyond 16 bytes), so its offset
    into the storage decides."""
    if is_fake(tensor):
        return (tensor.storage_offset() * tensor.element_size()) % 16 == 0
    return tensor.data_ptr() % 16 == 0


def _install_descriptor_allocator() -> None:
    """Device-side descriptors need scratch memory from an allocator Triton calls at launch.

    triton.set_allocator is per thread (a ContextVar): checked on every launch, so a
    forward on another thread (autograd's, a server's worker) has one too. An allocator
    the caller installed in this thread is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_allocate_descriptor_memory)


def _allocate_descriptor_memory(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    device = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def use_decode(problem: Problem) -> bool:
    """The split-KV decode kernel serves calls with few query rows per sequence (Sq <= 16,
    at most 128 rows per GQA group) against many keys (Sk >= 512), dense or varlen (Sq
    and Sk then the longest sequences: serving batches of decode steps).

    FUSEDATTN_TRITON_DECODE=always / never overrides the automatic choice (tests, benchmarks).
    """
    choice = environment.get("FUSEDATTN_TRITON_DECODE")
    if choice == "never":
        return False
    fits = problem.seqlen_q <= 16 and problem.seqlen_q * problem.group <= 128
    return fits and (choice == "always" or problem.seqlen_k >= 512)


def forward(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for a validated call: out like q with Dv, lse float32 (B, Hq, Sq) or (Hq, Tq)."""
    q, k, v = (last_dim_contiguous(t) for t in (call.q, call.k, call.v))
    call = call.with_tensors(q=q, k=k, v=v)
    out = allocate_output(call.out_shape, q.dtype, q.device)
    lse = allocate_output(call.lse_shape, torch.float32, q.device)
    problem = Problem.of(call)
    with device_guard(q):
        if use_decode(problem):
            attention_decode.run_decode(call, problem, out, lse)
        else:
            _run_forward_kernel(call, problem, q, k, v, out, lse)
    return out, lse
