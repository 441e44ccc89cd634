"""Pieces every attention kernel shares: the dropout hash, per-tile score rules, sequence
bounds and tile ranges (Triton), and the host-side argument packing and launch helper.

The per-tile rules implement python/fusedattn/semantics.py exactly: scale, softcap,
ALiBi and the additive mask, then the boolean mask, key lengths, causal and window.
Scores leave :func:`attention_logits` in base-2 units (multiplied by log2(e)) so the
kernels use exp2; masked entries are -inf.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from fusedattn import environment, semantics
from fusedattn.semantics import AttentionCall
from torch._subclasses.fake_tensor import is_fake

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ---- dropout: the counter-based hash of semantics.py in uint32 arithmetic ------------
@triton.jit
def mix32(x):
    """lowbias32 on uint32 values (multiplications wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def dropout_seed_key(Seed):
    """semantics.dropout_seed_key of the int64 seed at Seed: mix32(lo ^ mix32(hi)).

    The seed stays a tensor (the op's argument), so a torch.compile trace never reads it."""
    seed = tl.load(Seed).to(tl.int64)
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return mix32(low ^ mix32(high))


@triton.jit
def dropout_row_hash(Seed, sequence, heads, rows):
    """mix32(mix32(mix32(seed_key ^ sequence) ^ head) ^ row) for (BLOCK_M,) heads and rows;
    Seed points at the int64 dropout seed."""
    hashed = mix32(dropout_seed_key(Seed) ^ sequence.to(tl.uint32))
    hashed = mix32(hashed ^ heads.to(tl.uint32))
    return mix32(hashed ^ rows.to(tl.uint32))


@triton.jit
def dropout_keep(row_hash, keys, dropout):
    """Bool tile: True where the probability is kept (hash >= floor(p * 2**32)). row_hash and
    keys broadcast against each other: (BLOCK_M, 1) and (1, BLOCK_N), or transposed.
    dropout is (threshold, key_start): keys are hashed by their global index."""
    threshold, key_start = dropout
    return mix32(row_hash ^ (keys + key_start).to(tl.uint32)) >= threshold.to(tl.uint32)


# ---- score rules -------------------------------------------------------------------------
@triton.jit
def tanh_exact(x):
    """tanh without overflow: sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def score_rule(
    scale,
    softcap,
    window_left,
    window_right,
    Mask,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    Alibi,
    stride_ab,
    stride_ah,
):
    """The runtime options of the score function, grouped for attention_logits (kernel
    arguments stay flat: torch.library.wrap_triton launches take no tuples)."""
    return (
        scale, softcap, window_left, window_right, Mask, (stride_mb, stride_mh, stride_mq, stride_mk), Alibi,
        (stride_ab, stride_ah),
    )  # fmt: skip


@triton.jit
def attention_logits(
    qk,
    rows,
    keys,
    heads,
    row_valid,
    batch,
    key_limit,
    position_offset,
    score_rule,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    CHECK_VISIBILITY: tl.constexpr = True,
):
    """Scores of one tile in base-2 units, -inf where masked.

    qk: raw q . k products (float32), (BLOCK_M, BLOCK_N) or transposed (BLOCK_N, BLOCK_M)
    (the dK/dV kernel works on S^T). rows / heads / row_valid: query index within its
    sequence, query head, row in range; keys: key index within its sequence; each shaped
    to broadcast against qk ((BLOCK_M, 1) and (1, BLOCK_N), or transposed). Returns
    (logits, softcap_tanh); softcap_tanh is tanh(s / softcap), needed by the backward
    pass (qk itself when softcap is off). CHECK_VISIBILITY=False skips key lengths,
    causal, window and bool-mask checks, for tiles known to be fully visible.
    score_rule: the call's runtime score options as one tuple (see score_rule below), built
    once by each kernel, so a new option reaches this function without touching the
    functions in between.
    """
    scale, softcap, window_left, window_right, Mask, mask_strides, Alibi, alibi_strides = score_rule
    stride_mb, stride_mh, stride_mq, stride_mk = mask_strides
    stride_ab, stride_ah = alibi_strides
    if HAS_SOFTCAP:
        softcap_tanh = tanh_exact(qk * (scale / softcap))
        scores = softcap_tanh * (softcap * LOG2E)
    else:
        softcap_tanh = qk
        scores = qk * (scale * LOG2E)
    positions = rows + position_offset
    if HAS_ALIBI:
        slopes = tl.load(Alibi + batch * stride_ab + heads * stride_ah, mask=row_valid, other=0.0) * LOG2E
        distance = tl.abs(positions - keys).to(tl.float32)
        scores = scores - slopes * distance
    if MASK_KIND != 0:
        mask_pointers = (
            Mask
            + batch.to(tl.int64) * stride_mb
            + heads.to(tl.int64) * stride_mh
            + rows.to(tl.int64) * stride_mq
            + keys.to(tl.int64) * stride_mk
        )
        in_bounds = row_valid & (keys < key_limit)
        if MASK_KIND == 1:
            attend = tl.load(mask_pointers, mask=in_bounds, other=0) != 0
        else:
            scores = scores + tl.load(mask_pointers, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if CHECK_VISIBILITY:
        allowed = keys < key_limit
        if MASK_KIND == 1:
            allowed = allowed & attend
        if CAUSAL:
            allowed = allowed & (keys <= positions)
        if HAS_WINDOW_RIGHT:
            allowed = allowed & (keys <= positions + window_right)
        if HAS_WINDOW_LEFT:
            allowed = allowed & (keys >= positions - window_left)
        scores = tl.where(allowed, scores, float("-inf"))
        if HAS_SOFTCAP:
            # Hidden keys carry no gradient: never differentiate softcap at a hidden NaN.
            softcap_tanh = tl.where(allowed, softcap_tanh, 0.0)
    return scores, softcap_tanh


# ---- grid ------------------------------------------------------------------------------------
@triton.jit
def grid_position(blocks, heads):
    """(block, head, batch) of this program. Every kernel runs on a flat grid axis 0 of
    blocks * heads * batch programs, blocks fastest (a head's blocks run together and
    share its K/V in L2): axis 0 takes 2**31 - 1 programs, axes 1 and 2 only 65535, which
    many windows or sequences pass."""
    return flat_position(tl.program_id(0), blocks, heads)


@triton.jit
def flat_position(program, blocks, heads):
    block = program % blocks
    rest = program // blocks
    return block, rest % heads, rest // heads


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: tensors on cuda:1 while cuda:0 is
    current would run on the wrong GPU (or fault). Every launcher enters this first."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def flat_grid(blocks: int, heads: int, batch: int) -> tuple[int]:
    return (blocks * heads * batch,)


MAX_PROGRAMS = 2**31 - 1


# ---- sequences and tile ranges -------------------------------------------------------------
@triton.jit
def packed_span(Offsets, index, extent):
    """(start, length) of packed sequence index, clamped into [0, extent).

    Offsets the host could not check (compiled or captured calls) may hold anything; the
    clamp keeps every row inside the tensor, and the op layer turns the results of invalid
    offsets into NaN (docs/semantics.md, "Invalid metadata").
    """
    start = tl.minimum(tl.maximum(tl.load(Offsets + index), 0), extent)
    end = tl.minimum(tl.maximum(tl.load(Offsets + index + 1), start), extent)
    return start, end - start


@triton.jit
def sequence_bounds(
    batch,
    CuSeqlensQ,
    CuSeqlensK,
    KeyLengths,
    extent_q,
    extent_k,
    IS_VARLEN: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr,
    IS_PAGED: tl.constexpr = False,
    CacheLengths=None,
    block_shift=0,
):
    """(q_start, k_start, len_q, len_k, key_limit, position_offset) of one sequence.

    extent_q / extent_k are Sq / Sk for dense calls and the packed token counts Tq / Tk for
    varlen calls, whose sequences come from cu_seqlens. A paged call (IS_PAGED, varlen
    queries) has CacheLengths[batch] keys, clamped into extent_k (the block table's room),
    and k_start 0 (paged_position finds the rows). key_limit is the number of keys not cut by
    key_lengths; position_offset is the key position of query row 0 (Sk - Sq bottom-right,
    0 top-left), plus block_shift = query_start - key_start for a block of a longer sequence.
    """
    if IS_PAGED:
        q_start, len_q = packed_span(CuSeqlensQ, batch, extent_q)
        k_start = batch * 0
        len_k = tl.minimum(tl.maximum(tl.load(CacheLengths + batch), 0), extent_k)
    elif IS_VARLEN:
        q_start, len_q = packed_span(CuSeqlensQ, batch, extent_q)
        k_start, len_k = packed_span(CuSeqlensK, batch, extent_k)
    else:
        # Tensors, not Python ints: integer arguments equal to 1 arrive as constexprs.
        q_start = batch * 0
        k_start = batch * 0
        len_q = batch * 0 + extent_q
        len_k = batch * 0 + extent_k
    key_limit = len_k
    if HAS_KEY_LENGTHS:
        key_limit = tl.minimum(key_limit, tl.maximum(tl.load(KeyLengths + batch), 0))
    if BOTTOM_RIGHT:
        position_offset = len_k - len_q + block_shift
    else:
        position_offset = len_k * 0 + block_shift
    return q_start, k_start, len_q, len_k, key_limit, position_offset


@triton.jit
def paged_position(keys, key_valid, paging, PAGE_SIZE: tl.constexpr):
    """(block, row) of keys in a paged cache, int64: row keys % PAGE_SIZE of block
    table[keys // PAGE_SIZE]. paging is (the sequence's block table row, K and V block
    strides, last block number); block numbers are clamped into the cache (a table the host
    did not check never reads outside it)."""
    table, _stride_kblock, _stride_vblock, last_block = paging
    block = tl.load(table + keys // PAGE_SIZE, mask=key_valid, other=0)
    block = tl.minimum(tl.maximum(block, 0), last_block).to(tl.int64)
    return block, (keys % PAGE_SIZE).to(tl.int64)


@triton.jit
def descale_pointers(
    KDescale,
    VDescale,
    batch,
    kv_head,
    k_start,
    stride_kdb,
    stride_kdh,
    stride_kds,
    stride_kdblock,
    stride_vdb,
    stride_vdh,
    stride_vds,
    stride_vdblock,
):
    """attend_tile's descales for one sequence and KV head: (K scales, V scales) at its
    first key, then their sequence and block strides (descale_arguments gives them)."""
    batch64 = batch.to(tl.int64)
    head64 = kv_head.to(tl.int64)
    start64 = k_start.to(tl.int64)
    key_base = KDescale + batch64 * stride_kdb + head64 * stride_kdh + start64 * stride_kds
    value_base = VDescale + batch64 * stride_vdb + head64 * stride_vdh + start64 * stride_vds
    return key_base, value_base, stride_kds, stride_vds, stride_kdblock, stride_vdblock


@triton.jit
def key_scales(Descale, keys, key_valid, block, row, stride_scale, stride_scale_block, IS_PAGED: tl.constexpr):
    """The float32 scales of an 8-bit K or V for keys (BLOCK_N,), read through the scale
    tensor's strides (zero along broadcast dimensions: an expanded view is never copied).
    Descale points at the head's (and sequence's) first scale; a paged cache addresses
    (block, row) as paged_position gives them."""
    if IS_PAGED:
        offsets = block * stride_scale_block + row * stride_scale
    else:
        offsets = keys.to(tl.int64) * stride_scale
    return tl.load(Descale + offsets, mask=key_valid, other=0.0).to(tl.float32)


@triton.jit
def key_range(
    first_row,
    last_row,
    position_offset,
    key_limit,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[lo, hi) of the keys rows first_row..last_row may see; lo is a multiple of BLOCK_N.

    Tiles outside this range are skipped entirely (causal and window skipping).
    """
    hi = key_limit
    if CAUSAL:
        hi = tl.minimum(hi, last_row + position_offset + 1)
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(hi, last_row + position_offset + window_right + 1)
    lo = hi * 0
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(lo, first_row + position_offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def query_range(
    first_key,
    last_key,
    position_offset,
    len_q,
    key_limit,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr,
    HAS_WINDOW_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """[lo, hi) of the query rows that may see keys first_key..last_key; lo a multiple of BLOCK_M."""
    hi = len_q
    lo = len_q * 0
    if CAUSAL:
        lo = tl.maximum(lo, first_key - position_offset)
    if HAS_WINDOW_RIGHT:
        lo = tl.maximum(lo, first_key - position_offset - window_right)
    if HAS_WINDOW_LEFT:
        hi = tl.minimum(hi, last_key - position_offset + window_left + 1)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.where(first_key < key_limit, hi, 0)
    return lo, hi


# ---- host side ------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return environment.triton_interpreting()


def concrete_hint(size: int | torch.SymInt) -> int:
    """A plain int for host-side choices that only tune (never change results): a size
    that torch.compile made symbolic gives its example value, without adding a guard."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 16384  # unbacked: the largest bucket
    return int(size)


def padded_dim(size: int) -> int:
    """Head dims are padded to a power of two (at least 16, tl.dot's minimum) inside kernels."""
    return max(16, 1 << (size - 1).bit_length())


def launch(kernel: Any, grid: Any, **arguments: Any) -> None:
    """Launch through torch.library.wrap_triton, so a trace (torch.compile inside a
    triton_op) sees the kernel; FUSEDATTN_TRITON_WRAP=0 launches directly outside traces.

    wrap_triton hands interpreted kernels (TRITON_INTERPRET=1) back unwrapped, and the
    interpreter cannot run on the fake tensors of a trace: there the kernel is wrapped
    into the same traceable call by hand, so the graph records it and runs it later."""
    wrap = getattr(torch.library, "wrap_triton", None)
    traced = any(is_fake(value) for value in arguments.values() if isinstance(value, torch.Tensor))
    if traced:  # always recorded, whatever FUSEDATTN_TRITON_WRAP says
        wrap(_traceable_interpreted(kernel) if interpreting() else kernel)[grid](**arguments)
    elif wrap is None or environment.get("FUSEDATTN_TRITON_WRAP") == "0":
        kernel[grid](**arguments)
    else:
        wrap(kernel)[grid](**arguments)


_TRACEABLE_INTERPRETED: dict[int, Any] = {}


def _traceable_interpreted(kernel: Any) -> Any:
    """A triton.jit function (what torch's tracing accepts) for an interpreted kernel,
    whose launches still run through the interpreter."""
    from triton.runtime.jit import JITFunction

    class InterpretedJITFunction(JITFunction):
        @property
        def cache_key(self) -> str:  # the source hash would walk interpreted helpers
            return f"fusedattn-interpreted-{self.fn.__module__}.{self.fn.__qualname__}"

        def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            return kernel[grid](*args, **kwargs)

    if id(kernel) not in _TRACEABLE_INTERPRETED:
        _TRACEABLE_INTERPRETED[id(kernel)] = (kernel, InterpretedJITFunction(kernel.fn))
    return _TRACEABLE_INTERPRETED[id(kernel)][1]


def sequence_strides(tensor: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) strides: dense (B, H, S, D) or varlen (T, H, D) (batch 0)."""
    if varlen:
        return 0, tensor.stride(1), tensor.stride(0)
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def key_strides(tensor: torch.Tensor, call: AttentionCall) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of K or V: sequence_strides, or for a paged cache
    (num_blocks, block_size, H, D) (0, head, row within a block); paging_arguments gives
    the block stride."""
    if call.is_paged:
        return 0, tensor.stride(2), tensor.stride(1)
    return sequence_strides(tensor, call.is_varlen)


def paging_arguments(call: AttentionCall) -> dict[str, Any]:
    """Kernel arguments of a paged KV cache for the forward and decode kernels (placeholders
    and IS_PAGED=False for other calls)."""
    if not call.is_paged:
        return dict(
            BlockTable=call.q, CacheLengths=call.q, stride_table=0, stride_kblock=0, stride_vblock=0,
            last_block=0, IS_PAGED=False, PAGE_SIZE=1,
        )  # fmt: skip
    return dict(
        BlockTable=call.block_table,
        CacheLengths=call.cache_lengths,
        stride_table=call.block_table.stride(0),
        stride_kblock=call.k.stride(0),
        stride_vblock=call.v.stride(0),
        last_block=max(call.k.shape[0] - 1, 0),
        IS_PAGED=True,
        PAGE_SIZE=call.block_size,
    )


def descale_arguments(call: AttentionCall) -> dict[str, Any]:
    """Kernel arguments of an 8-bit K/V's scales for the forward and decode kernels: the
    (batch, head, sequence) strides as key_strides gives them for K / V (the scales are K / V
    without the head dim) and the block stride of a paged cache. The scales are the
    validated float32 views expanded to K's / V's shape (zero strides where broadcast);
    absent scales (None: 1) give q as a never-read placeholder and HAS_*_DESCALE=False."""
    arguments: dict[str, Any] = {}
    for prefix, name, flag, scales in (
        ("kd", "KDescale", "HAS_K_DESCALE", call.k_descale),
        ("vd", "VDescale", "HAS_V_DESCALE", call.v_descale),
    ):
        present = scales is not None
        strides = key_strides(scales, call) if present else (0, 0, 0)
        arguments.update({
            name: scales if present else call.q,
            f"stride_{prefix}b": strides[0],
            f"stride_{prefix}h": strides[1],
            f"stride_{prefix}s": strides[2],
            f"stride_{prefix}block": scales.stride(0) if present and call.is_paged else 0,
            flag: present,
        })  # fmt: skip
    return arguments


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of lse-shaped tensors: dense (B, Hq, Sq) or varlen (Hq, Tq)."""
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with stride 1."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul policy: TF32 where torch allows it for cuBLAS
    (torch.backends.cuda.matmul.fp32_precision = "tf32", or set_float32_matmul_precision
    "high" / "medium"), exact IEEE otherwise (torch's default, "highest")."""
    if dtype != torch.float32 or interpreting():
        return "ieee"
    return "tf32" if float32_matmul_allows_tf32() else "ieee"


def float32_matmul_allows_tf32() -> bool:
    # fp32_precision is torch's newer switch ("none" defers to the older one); reading
    # allow_tf32 raises once a program mixed the two APIs, so it is never read here.
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


@dataclass(frozen=True)
class Problem:
    """Sizes of a call as the kernels see them (varlen: batch = N sequences, seqlens = max)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    varlen: bool

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @staticmethod
    def of(call: AttentionCall) -> Problem:
        # Read the shapes once (the AttentionCall properties re-derive them on every access).
        q_shape, k_shape = call.q.shape, call.k.shape
        if call.cu_seqlens_q is not None:
            batch, seqlen_q, seqlen_k = call.cu_seqlens_q.shape[0] - 1, call.max_seqlen_q, call.max_seqlen_k
            heads_q, heads_kv = q_shape[1], k_shape[2 if call.block_table is not None else 1]
        else:
            batch, heads_q, seqlen_q = q_shape[0], q_shape[1], q_shape[2]
            heads_kv, seqlen_k = k_shape[1], k_shape[2]
        return Problem(
            batch, heads_q, heads_kv, seqlen_q, seqlen_k, q_shape[-1], call.v.shape[-1], call.cu_seqlens_q is not None
        )


def dropout_seed_tensor(seed: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The dropout seed as a 1-element int64 tensor on like's device, for the kernels to read.

    Inside the torch.library op the seed already is a 0-d int64 tensor (possibly a fake one
    while torch.compile traces): it is moved, never read on the host."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=like.device, dtype=torch.int64).reshape(1)
    # A fill kernel on like's device: torch.tensor would copy from pageable host memory,
    # which waits for the stream on every call.
    return torch.full((1,), seed, dtype=torch.int64, device=like.device)


def feature_arguments(call: AttentionCall) -> dict[str, Any]:
    """Kernel arguments for every optional feature, shared by all attention kernels.

    Absent tensors are replaced by q (never read: their constexpr flag is off).
    """
    placeholder = call.q
    mask = call.attn_mask
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    mask_strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride())
    slopes = call.alibi_slopes
    if slopes is None:
        alibi_strides = (0, 0)
    elif slopes.dim() == 1:
        alibi_strides = (0, slopes.stride(0))
    else:
        alibi_strides = (slopes.stride(0), slopes.stride(1))
    dropout = call.dropout_p > 0.0
    return dict(
        Mask=placeholder if mask is None else mask,
        KeyLengths=placeholder if call.key_lengths is None else call.key_lengths,
        CuSeqlensQ=placeholder if call.cu_seqlens_q is None else call.cu_seqlens_q,
        CuSeqlensK=placeholder if call.cu_seqlens_k is None else call.cu_seqlens_k,
        Alibi=placeholder if slopes is None else slopes,
        Sinks=placeholder if call.sinks is None else call.sinks,
        stride_mb=mask_strides[0],
        stride_mh=mask_strides[1],
        stride_mq=mask_strides[2],
        stride_mk=mask_strides[3],
        stride_ab=alibi_strides[0],
        stride_ah=alibi_strides[1],
        # Sq / Sk, or the packed token counts: every row a kernel addresses is below these.
        extent_q=call.q.shape[0] if call.is_varlen else call.seqlen_q,
        extent_k=call.k.shape[0] if call.is_varlen and not call.is_paged else call.seqlen_k,
        scale=float(call.scale),
        softcap=float(call.softcap or 1.0),
        window_left=int(call.window_left or 0),  # validation caps sides at 2**30: int32-safe
        window_right=int(call.window_right or 0),
        # A 32-bit value; the threshold is clamped below 2**32 (p = 1 keeps nothing: scale 0).
        DropoutSeed=dropout_seed_tensor(call.dropout_seed, placeholder) if dropout else placeholder,
        dropout_threshold=min(semantics.dropout_threshold(call.dropout_p), 0xFFFFFFFF) if dropout else 0,
        dropout_keep_scale=semantics.dropout_keep_scale(call.dropout_p) if dropout else 1.0,
        # A block of a longer sequence (validation keeps both in [0, 2**29]: int32-safe).
        query_start=call.query_start,
        key_start=call.key_start,
        CAUSAL=call.causal,
        BOTTOM_RIGHT=call.causal_alignment == "bottom_right",
        HAS_WINDOW_LEFT=call.window_left is not None,
        HAS_WINDOW_RIGHT=call.window_right is not None,
        MASK_KIND=mask_kind,
        HAS_KEY_LENGTHS=call.key_lengths is not None,
        IS_VARLEN=call.is_varlen,
        HAS_ALIBI=slopes is not None,
        HAS_SOFTCAP=call.softcap is not None,
        HAS_DROPOUT=dropout,
        HAS_SINKS=call.sinks is not None,
        INPUT_PRECISION=input_precision(call.dtype),
    )
