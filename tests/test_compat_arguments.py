"""fusedattn.compat takes every argument form flash-attn takes, and refuses bad cache indices
as flash-attn does (a RuntimeError naming block_table or cache_seqlens), eager and compiled.

flash-attn's custom op converts integer-like values (numpy integers, 0-d tensors) and its
own tests pass window_size=torch.randint(0, s, (2,)); each form must give what the plain
Python value gives, and the plain value what the float64 reference gives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fusedattn import compat
from fusedattn.errors import CacheMetadataError


def _windowed_reference(q, k, v, left, right, scale=None):
    """float64 attention in flash-attn's (B, S, H, D) layout, window bottom-right aligned, -1 = unbounded."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    query = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    key = torch.arange(seqlen_k)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        allowed &= key >= query - left
    if right >= 0:
        allowed &= key <= query + right
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ v).transpose(1, 2)


def _dense_inputs():
    return torch.randn(2, 6, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)


# ---- accepted forms ------------------------------------------------------------------------
WINDOW_FORMS = {
    "tuple": ((2, 1), (2, 1)),
    "list": ([2, 1], (2, 1)),
    "numpy_integers": ((np.int64(2), np.int32(1)), (2, 1)),
    "0d_tensors": ((torch.tensor(2), torch.tensor(1, dtype=torch.int32)), (2, 1)),
    "1d_tensor": (torch.tensor([2, 1]), (2, 1)),
    "1d_tensor_unbounded_left": (torch.tensor([-1, 0], dtype=torch.int32), (-1, 0)),
    "numpy_array": (np.array([3, -1]), (3, -1)),
    "mixed": ((torch.tensor(0), np.int16(2)), (0, 2)),
}


@pytest.mark.parametrize("form", list(WINDOW_FORMS))
def test_window_size_forms_match_the_reference(form):
    window_size, (left, right) = WINDOW_FORMS[form]
    q, k, v = _dense_inputs()
    out = compat.flash_attn_func(q, k, v, window_size=window_size)
    torch.testing.assert_close(out.double(), _windowed_reference(q, k, v, left, right), atol=2e-5, rtol=1e-4)


def test_window_size_drawn_as_flash_attn_tests_draw_it():
    # flash-attn's tests: window_size = torch.randint(0, seqlen_k, (2,)), through every entry point.
    q, k, v = _dense_inputs()
    window_size = torch.randint(0, 9, (2,))
    left, right = window_size.tolist()
    expected = _windowed_reference(q, k, v, left, right)
    dense = compat.flash_attn_func(q, k, v, window_size=window_size)
    torch.testing.assert_close(dense.double(), expected, atol=2e-5, rtol=1e-4)
    cu_q = torch.tensor([0, 6, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 18], dtype=torch.int32)
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    varlen = compat.flash_attn_varlen_func(*packed, cu_q, cu_k, 6, 9, window_size=window_size)
    torch.testing.assert_close(varlen.double(), expected.reshape(12, 4, 8), atol=2e-5, rtol=1e-4)
    cached = compat.flash_attn_with_kvcache(q, k.clone(), v.clone(), window_size=window_size)
    torch.testing.assert_close(cached.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "value", [np.int64(6), np.int32(6), torch.tensor(6), torch.tensor(6, dtype=torch.int32)], ids=repr
)
def test_integer_arguments_take_numpy_and_0d_tensors(value):
    q, k, v = (torch.randn(12, 4, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    # max_seqlen 7 is the longest sequence: a wrong conversion of 6 is refused as too small.
    expected = compat.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    got = compat.flash_attn_varlen_func(q, k, v, cu, cu, value + 1, value + 1, causal=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    cache = torch.randn(2, 8, 4, 8)
    query = torch.randn(2, 1, 4, 8)
    reference = _windowed_reference(query, cache[:, :6], cache[:, :6], -1, -1)
    cached = compat.flash_attn_with_kvcache(query, cache, cache, cache_seqlens=value, num_splits=value)
    torch.testing.assert_close(cached.double(), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "value", [0.25, np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)]
)
def test_softmax_scale_takes_numpy_and_0d_tensors(value):
    q, k, v = _dense_inputs()
    out = compat.flash_attn_func(q, k, v, softmax_scale=value, dropout_p=value * 0)
    torch.testing.assert_close(out.double(), _windowed_reference(q, k, v, -1, -1, 0.25), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("value", [2, np.int32(2), np.float32(2.0), torch.tensor(2), torch.tensor(2.0)], ids=repr)
def test_softcap_takes_numpy_and_0d_tensors(value):
    q, k, v = (t * 4 for t in _dense_inputs())  # large scores: the cap changes the result
    expected = compat.flash_attn_func(q, k, v, softcap=2.0)
    assert not torch.allclose(expected, compat.flash_attn_func(q, k, v))
    torch.testing.assert_close(compat.flash_attn_func(q, k, v, softcap=value), expected, rtol=0, atol=0)


# ---- refused forms -------------------------------------------------------------------------
BAD_ARGUMENTS = {
    "window_float_side": (dict(window_size=(2.5, -1)), r"window_size\[0\]: expected an int.*float 2.5"),
    "window_bool_side": (dict(window_size=(-1, True)), r"window_size\[1\]: expected an int.*bool True"),
    "window_float_tensor": (dict(window_size=torch.tensor([1.0, 2.0])), r"window_size\[0\].*torch.float32"),
    "window_three_sides": (dict(window_size=torch.tensor([1, 2, 3])), r"window_size: expected a pair.*\(3,\)"),
    "window_scalar": (dict(window_size=3), "window_size: expected a pair of ints, got int 3"),
    "window_2d_tensor": (dict(window_size=torch.tensor([[1, 2]])), r"window_size: expected a pair.*\(1, 2\)"),
    "scale_1d_tensor": (dict(softmax_scale=torch.tensor([0.1])), r"softmax_scale: expected a number.*\(1,\)"),
    "softcap_string": (dict(softcap="2"), "softcap: expected a number.*str '2'"),
    "dropout_bool": (dict(dropout_p=True), "dropout_p: expected a number.*bool True"),
}


@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
def test_bad_forms_name_the_argument(bad):
    arguments, message = BAD_ARGUMENTS[bad]
    with pytest.raises(TypeError, match=message):
        compat.flash_attn_func(*_dense_inputs(), **arguments)


def test_bad_integer_forms_of_lengths_name_the_argument():
    q = torch.randn(12, 4, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen_k: expected an int.*float 7.0"):
        compat.flash_attn_varlen_func(q, q, q, cu, cu, 7, 7.0)
    with pytest.raises(TypeError, match=r"max_seqlen_q: expected an int.*torch.int64 tensor of shape \(1,\)"):
        compat.flash_attn_varlen_func(q, q, q, cu, cu, torch.tensor([7]), 7)
    cache = torch.randn(2, 8, 4, 8)
    with pytest.raises(TypeError, match=r"cache_seqlens: expected an int or a \(2,\) integer tensor, got float"):
        compat.flash_attn_with_kvcache(cache[:, :1], cache, cache, cache_seqlens=4.0)
    with pytest.raises(TypeError, match="num_splits: expected an int"):
        compat.flash_attn_with_kvcache(cache[:, :1], cache, cache, num_splits=1.5)


# ---- cache indices -------------------------------------------------------------------------
def _paged_cache(num_blocks=6, block_size=4, heads_kv=2, dim=8):
    return torch.randn(num_blocks, block_size, heads_kv, dim), torch.randn(num_blocks, block_size, heads_kv, dim)


TABLE = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)  # 2 blocks of 4: room for 8 keys per row
BAD_CACHES = {
    # name: (block_table, cache_seqlens, new tokens, error message)
    "table_too_short": (TABLE, [3, 9], 0, r"cache_seqlens: .*block_table's 2 blocks of 4 keys.*got 9 at index 1"),
    "table_too_short_for_new_keys": (TABLE, [3, 7], 2, r"cache_seqlens: .*room for 2 new tokens.*got 7 at index 1"),
    "int_seqlens_beyond_table": (TABLE, 9, 0, r"cache_seqlens: .*block_table's 2 blocks.*got 9 at index 0"),
    "block_out_of_range": (TABLE.index_fill(1, torch.tensor([0]), 6), [3, 2], 0, r"block_table: .*\[0, 5\], got 6"),
    "negative_block": (
        TABLE.index_fill(1, torch.tensor([1]), -2),
        [5, 2],
        1,
        r"block_table: .*got -2 at index \(0, 1\)",
    ),
    "negative_length": (TABLE, [-1, 2], 0, r"cache_seqlens: .*got -1 at index 0"),
    "contiguous_beyond_cache": (None, [3, 9], 0, r"cache_seqlens: .*the cache's 8 positions.*got 9 at index 1"),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bad", list(BAD_CACHES))
def test_bad_kv_cache_indices_raise_a_runtime_error_naming_them(bad, compiled):
    table, seqlens, new_tokens, message = BAD_CACHES[bad]
    k_cache, v_cache = _paged_cache() if table is not None else (torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8))
    q = torch.randn(2, 1, 4, 8)
    new = {}
    if new_tokens:
        new = dict(k=torch.randn(2, new_tokens, 2, 8), v=torch.randn(2, new_tokens, 2, 8))
    seqlens = seqlens if isinstance(seqlens, int) else torch.tensor(seqlens, dtype=torch.int32)
    before = k_cache.clone(), v_cache.clone()

    def run(q, k_cache, v_cache, seqlens, table):
        return compat.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True, **new
        )

    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=message) as raised:
        run(q, k_cache, v_cache, seqlens, table)
    assert isinstance(raised.value, CacheMetadataError) and isinstance(raised.value, ValueError)
    # Checked before anything was written into the caches.
    torch.testing.assert_close((k_cache, v_cache), before, rtol=0, atol=0)


BAD_VARLEN_TABLES = {
    "table_too_short": (TABLE, [0, 5, 14], r"cu_seqlens_k: .*block_table's 2 blocks of 4 keys.*got 9 at index 1"),
    "block_out_of_range": (TABLE.index_fill(1, torch.tensor([1]), 7), [0, 5, 7], r"block_table: .*got 7 at index"),
    "negative_block": (TABLE.index_fill(1, torch.tensor([0]), -1), [0, 5, 7], r"block_table: .*got -1 at index"),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bad", list(BAD_VARLEN_TABLES))
def test_bad_varlen_block_tables_raise_a_runtime_error_naming_them(bad, compiled):
    table, offsets, message = BAD_VARLEN_TABLES[bad]
    k_cache, v_cache = _paged_cache()
    q = torch.randn(2, 4, 8)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor(offsets, dtype=torch.int32)

    def run(q, k_cache, v_cache, cu_q, cu_k, table):
        return compat.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 1, 8, block_table=table)

    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=message) as raised:
        run(q, k_cache, v_cache, cu_q, cu_k, table)
    assert isinstance(raised.value, CacheMetadataError)


# ---- torch.compile -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window_size", "softcap", "fullgraph"),
    [
        ((2, 1), 2, True),  # Python numbers: one graph
        ((np.int64(2), np.int32(1)), np.float32(2.0), False),  # numpy and tensor values are read
        (torch.tensor([2, 1]), torch.tensor(2.0), False),  # on the host: a graph break
        (np.array([2, 1]), np.float64(2.0), False),
    ],
    ids=["python", "numpy_scalars", "tensors", "numpy_array"],
)
def test_compiled_calls_take_every_form(window_size, softcap, fullgraph):
    q, k, v = _dense_inputs()

    def run(q, k, v, window_size, softcap):
        return compat.flash_attn_func(q, k, v, window_size=window_size, softcap=softcap)

    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=fullgraph)
    expected = compat.flash_attn_func(q, k, v, window_size=(2, 1), softcap=2.0)
    assert not torch.allclose(expected, compat.flash_attn_func(q, k, v, softcap=2.0))
    torch.testing.assert_close(compiled(q, k, v, window_size, softcap), expected)
