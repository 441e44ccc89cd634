"""Checks of fusedattn.compat's KV-cache arguments: flash_attn_with_kvcache's caches, new
keys, cache_seqlens, cache_batch_idx, cache_leftpad and block_table, and
flash_attn_varlen_func's block_table with cu_seqlens_k.

Index values are checked before anything reads or writes a cache. Eagerly the host reads
them, and a bad entry raises CacheMetadataError (a ValueError, and a RuntimeError as in
flash-attn) naming the argument, the expected range and the entry. A torch.compile trace or
a CUDA graph capture cannot read them: there a custom op checks them when the graph runs,
raising the same error for tensors the host can read without synchronizing (CPU), and
otherwise returning a flag on the device with which the caller skips its cache writes and
poisons its outputs. The indices are then clamped, so no read or write is ever out of bounds.
"""

from __future__ import annotations

import torch

from . import validation
from .semantics import QUANTIZED_KV_DTYPES
from .validation import (
    _blocks_outside,
    _check_offset_values,
    _check_qkv,
    _cu_seqlens,
    _describe,
    _integer_tensor,
    _outside,
    _require_tensor,
    _same_count,
    _used_blocks,
    integer_argument,
    require_dtype_of_q,
)


def _values_readable(tensor: torch.Tensor, synchronize: bool = True) -> bool:
    # Looked up on validation at each call, so that one rule (and one test patch) decides
    # for every check of metadata values.
    return validation._values_readable(tensor, synchronize)


def _index_tensor(name: str, value: object, q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return _integer_tensor(name, value, q, shape).to(torch.int64)


def _quantized_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True for 8-bit caches (flash-attn 3's FP8 KV cache, and int8), read with k_descale /
    v_descale: both in one 8-bit dtype, q in a floating dtype of 16 bits or more."""
    if k_cache.dtype not in QUANTIZED_KV_DTYPES:
        return False
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: expected the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    if not q.is_floating_point() or q.dtype in QUANTIZED_KV_DTYPES:
        raise TypeError(
            f"q: expected float16, bfloat16, float32 or float64 queries with {k_cache.dtype} caches, got {q.dtype}"
        )
    return True


def check_kv_cache_tensors(q: object, k_cache: object, v_cache: object, k: object = None, v: object = None) -> None:
    """Shapes, dtypes and devices of a KV-cache call: q (B, Sq, Hq, D), caches
    (B_cache or num_blocks, S_cache or block_size, Hkv, D / Dv), new k, v (B, S_new, Hkv, D / Dv).

    Caches are in q's dtype (flash-attn's rule), or both in one 8-bit dtype (float8_e4m3fn or
    int8, read with k_descale / v_descale); new k, v are then in the cache's 8-bit dtype
    (written as they are) or in q's dtype (quantized into it by flash_attn_with_kvcache)."""
    layout = "(batch, seq, heads, head_dim)"
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        tensor = _require_tensor(name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {layout}, got shape {tuple(tensor.shape)}")
    quantized = _quantized_cache(q, k_cache, v_cache)
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not quantized:
            require_dtype_of_q(q, ((name, tensor),))
        if tensor.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {tensor.device}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(
            f"v_cache: expected leading dims {tuple(k_cache.shape[:3])} (those of k_cache), got {tuple(v_cache.shape[:3])}"
        )
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both new keys and new values, or neither, got only one")
    if k is None:
        return
    batch, heads_kv = q.shape[0], k_cache.shape[2]
    for name, tensor, cache in (("k", k, k_cache), ("v", v, v_cache)):
        tensor = _require_tensor(name, tensor)
        if quantized and tensor.dtype not in (cache.dtype, q.dtype):
            raise TypeError(
                f"{name}: expected the dtype of the cache ({cache.dtype}, written as it is) or of q ({q.dtype}, "
                f"quantized with the cache's scale), got {tensor.dtype}"
            )
        if not quantized and tensor.dtype != cache.dtype:
            raise TypeError(f"{name}: expected the dtype of the cache ({cache.dtype}), got {tensor.dtype}")
        if tensor.device != cache.device:
            raise ValueError(f"{name}: expected the device of the cache ({cache.device}), got {tensor.device}")
        expected = (batch, k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else -1, heads_kv, cache.shape[3])
        if tensor.dim() != 4 or tuple(tensor.shape) != expected:
            raise ValueError(f"{name}: expected shape (B, S_new, Hkv, D) = {expected}, got {tuple(tensor.shape)}")


# ---- flash_attn_with_kvcache ---------------------------------------------------------------
def _check_kv_cache_values(
    rows: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor,
    table: torch.Tensor | None,
    cache_rows: int,
    capacity: int,
    new_tokens: int,
    block_size: int,
    check_rows: bool,
) -> None:
    """Raise CacheMetadataError naming the first bad entry (values readable on the host)."""
    if check_rows:
        _outside("cache_batch_idx", rows, 0, cache_rows - 1, "cache rows")
    if table is None:
        room = f"lengths that leave room for {new_tokens} new tokens in the cache's {capacity} positions"
    else:
        room = (
            f"lengths that leave room for {new_tokens} new tokens in block_table's {table.shape[1]} "
            f"blocks of {block_size} keys"
        )
    _outside("cache_seqlens", lengths, 0, capacity - new_tokens, room)
    _outside("cache_leftpad", starts, 0, lengths, "first valid positions (at most cache_seqlens)")
    if table is not None:
        blocks = _used_blocks(table, lengths + new_tokens, block_size)
        _outside("block_table", blocks, 0, cache_rows - 1, "block numbers (in the blocks in use)")


def _kv_cache_flag(
    rows: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor,
    table: torch.Tensor | None,
    cache_rows: int,
    capacity: int,
    new_tokens: int,
    block_size: int,
    check_rows: bool,
) -> torch.Tensor:
    """0-d bool on the device, True where _check_kv_cache_values would raise; no host read."""
    invalid = (lengths < 0).any() | (lengths > capacity - new_tokens).any()
    if check_rows:
        invalid = invalid | (rows < 0).any() | (rows >= cache_rows).any()
    invalid = invalid | (starts < 0).any() | (starts > lengths).any()
    if table is not None:
        ends = (lengths + new_tokens).clamp(0, capacity)
        invalid = invalid | _blocks_outside(_used_blocks(table, ends, block_size), cache_rows)
    return invalid


@torch.library.custom_op("fusedattn::kv_cache_indices_invalid", mutates_args=())
def _kv_cache_indices_invalid(
    rows: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor,
    table: torch.Tensor | None,
    cache_rows: int,
    capacity: int,
    new_tokens: int,
    block_size: int,
    check_rows: bool,
) -> torch.Tensor:
    """The values' check of a traced or captured call, run when its graph runs (an opaque
    op, so that it runs then, with the real values, and raises there as eagerly)."""
    arguments = (rows, lengths, starts, table, cache_rows, capacity, new_tokens, block_size, check_rows)
    if all(_values_readable(t, synchronize=False) for t in (rows, lengths, starts, table) if t is not None):
        _check_kv_cache_values(*arguments)
        return torch.zeros((), dtype=torch.bool, device=lengths.device)
    return _kv_cache_flag(*arguments)


@_kv_cache_indices_invalid.register_fake
def _(rows, lengths, starts, table, cache_rows, capacity, new_tokens, block_size, check_rows):
    return lengths.new_empty((), dtype=torch.bool)


def _cache_seqlens(cache_seqlens: object, q: torch.Tensor, batch: int, capacity: int) -> torch.Tensor:
    """(B,) int64 lengths: None = the whole cache; one int for every row (a Python or numpy
    int, or a 0-d tensor, broadcast on its device without reading it); or a (B,) tensor."""
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=torch.int64, device=q.device)
    if isinstance(cache_seqlens, torch.Tensor):
        if cache_seqlens.dim() == 0:
            return _integer_tensor("cache_seqlens", cache_seqlens, q).to(torch.int64).expand(batch)
        return _index_tensor("cache_seqlens", cache_seqlens, q, (batch,))
    try:
        length = integer_argument("cache_seqlens", cache_seqlens)
    except TypeError:
        raise TypeError(
            f"cache_seqlens: expected an int or a ({batch},) integer tensor, got {_describe(cache_seqlens)}"
        ) from None
    return torch.full((batch,), length, dtype=torch.int64, device=q.device)


def kv_cache_indices(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    new_tokens: int,
    cache_seqlens: object,
    cache_batch_idx: object,
    cache_leftpad: object,
    block_table: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the integer arguments of a KV-cache call before anything reads or writes a cache.

    q (B, Sq, Hq, D); k_cache (B_cache, S_cache, Hkv, D), or (num_blocks, block_size, Hkv, D)
    with block_table (B, max_blocks). Returns int64 (rows, starts, ends, block_table, invalid):
    the cache row of each batch element, the first and one-past-last valid key of each row
    after appending new_tokens, the block table, and None when the values were checked on
    the host, else (traced or captured calls) a 0-d bool tensor, True when they are invalid,
    with every index clamped into its tensor: the caller must then skip its cache writes and
    poison its outputs when invalid.
    """
    batch = q.shape[0]
    if new_tokens < 0:
        raise ValueError(f"k: expected new tokens >= 0, got {new_tokens}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: expected None with block_table (a paged cache has no cache rows)")
        table = _require_tensor("block_table", block_table)
        if table.dtype != torch.int32:
            raise TypeError(f"block_table: expected dtype torch.int32, got {table.dtype}")
        if table.dim() != 2 or table.shape[0] != batch or (table.shape[1] < 1 and batch > 0):
            raise ValueError(f"block_table: expected shape ({batch}, max_blocks >= 1), got {tuple(table.shape)}")
        table = _index_tensor("block_table", table, q, tuple(table.shape))
        capacity = table.shape[1] * k_cache.shape[1]
    else:
        table = None
        capacity = k_cache.shape[1]
    if cache_batch_idx is None:
        if table is None and batch > k_cache.shape[0]:
            raise ValueError(f"k_cache: expected at least {batch} rows (the batch of q), got {k_cache.shape[0]}")
        rows = torch.arange(batch, device=q.device)
    else:
        rows = _index_tensor("cache_batch_idx", cache_batch_idx, q, (batch,))
    lengths = _cache_seqlens(cache_seqlens, q, batch, capacity)
    if cache_leftpad is None:
        starts = torch.zeros_like(lengths)
    else:
        starts = _index_tensor("cache_leftpad", cache_leftpad, q, (batch,))
    ends = lengths + new_tokens
    # Default rows 0..B-1 fit (checked above); paged caches have none.
    sizes = (k_cache.shape[0], capacity, new_tokens, k_cache.shape[1], cache_batch_idx is not None)
    if all(_values_readable(t) for t in (rows, lengths, starts, table) if t is not None):
        _check_kv_cache_values(rows, lengths, starts, table, *sizes)
        return rows, starts, ends, table, None
    invalid = _kv_cache_indices_invalid(rows, lengths, starts, table, *sizes)
    rows = rows.clamp(0, max(k_cache.shape[0] - 1, 0))
    ends = ends.clamp(0, capacity)
    starts = torch.minimum(starts.clamp(min=0), ends)
    if table is not None:
        table = table.clamp(0, max(k_cache.shape[0] - 1, 0))
    return rows, starts, ends, table, invalid


# ---- flash_attn_varlen_func with block_table ---------------------------------------------------
def _check_paged_varlen_values(cu: torch.Tensor, table: torch.Tensor, block_size: int, num_blocks: int) -> None:
    """Raise naming the first bad entry (values readable on the host)."""
    offsets = cu.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    _check_offset_values("cu_seqlens_k", cu, int(offsets[-1]), "max_seqlen_k", longest)
    room = f"sequence lengths that fit in block_table's {table.shape[1]} blocks of {block_size} keys"
    _outside("cu_seqlens_k", lengths, 0, table.shape[1] * block_size, room)
    blocks = _used_blocks(table, lengths, block_size)
    _outside("block_table", blocks, 0, num_blocks - 1, "block numbers (in the blocks in use)")


def _paged_varlen_flag(cu: torch.Tensor, table: torch.Tensor, block_size: int, num_blocks: int) -> torch.Tensor:
    """0-d bool on the device, True where _check_paged_varlen_values would raise."""
    offsets = cu.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    invalid = (offsets[0] != 0) | (lengths < 0).any() | (lengths > table.shape[1] * block_size).any()
    return invalid | _blocks_outside(_used_blocks(table, lengths, block_size), num_blocks)


@torch.library.custom_op("fusedattn::paged_varlen_indices_invalid", mutates_args=())
def _paged_varlen_indices_invalid(
    cu: torch.Tensor, table: torch.Tensor, block_size: int, num_blocks: int
) -> torch.Tensor:
    """As _kv_cache_indices_invalid, for flash_attn_varlen_func's cu_seqlens_k and block_table."""
    if _values_readable(cu, synchronize=False) and _values_readable(table, synchronize=False):
        _check_paged_varlen_values(cu, table, block_size, num_blocks)
        return torch.zeros((), dtype=torch.bool, device=cu.device)
    return _paged_varlen_flag(cu, table, block_size, num_blocks)


@_paged_varlen_indices_invalid.register_fake
def _(cu, table, block_size, num_blocks):
    return cu.new_empty((), dtype=torch.bool)


def paged_sequence_lengths(
    cu_seqlens_q: object, cu_seqlens_k: object, block_table: object, k_cache: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lengths, block_table, invalid) of a varlen call whose keys live in a paged cache
    (num_blocks, block_size, Hkv, D): sequence i has cu_seqlens_k[i + 1] - cu_seqlens_k[i]
    keys in the blocks block_table[i]. Checked like kv_cache_indices (None: checked on the
    host; else a 0-d bool flag, with lengths and blocks clamped)."""
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k: expected a paged cache (num_blocks, block_size, Hkv, D), got {_describe(k_cache)}")
    _check_qkv(q, q, q, 3, "(total_tokens, heads, head_dim)")
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    cu = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    _same_count(cu_q, cu)
    table = _require_tensor("block_table", block_table)
    if table.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype torch.int32, got {table.dtype}")
    if table.dim() != 2 or table.shape[0] != cu.shape[0] - 1 or (table.shape[1] < 1 and table.shape[0] > 0):
        raise ValueError(f"block_table: expected shape ({cu.shape[0] - 1}, max_blocks >= 1), got {tuple(table.shape)}")
    table = _index_tensor("block_table", table, q, tuple(table.shape))
    offsets = cu.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    if _values_readable(cu) and _values_readable(table):
        _check_paged_varlen_values(cu, table, block_size, num_blocks)
        return lengths, table, None
    invalid = _paged_varlen_indices_invalid(cu, table, block_size, num_blocks)
    capacity = table.shape[1] * block_size
    return lengths.clamp(0, capacity), table.clamp(0, max(num_blocks - 1, 0)), invalid
