"""Storage past the lengths is never read (docs/semantics.md, "Storage past the lengths").

A serving cache is allocated once and filled as tokens arrive: rows at or past a batch
element's key_lengths[b] (a paged sequence's cache_lengths, compat's cache_seqlens, or before
its cache_leftpad) hold whatever the allocator left. Each test runs a call twice, once with
finite values in that storage and once with NaN and Inf there (NaN scales for 8-bit caches),
and asserts bit-identical results with no NaN, and dk = dv = 0 in the storage.

check_backend (fusedattn.testing) also poisons the storage past key_lengths, and paged_case
fills storage rows with NaN, so every backend's feature, decode and paged tests check the
same rule against the reference; the tests here add bit-identity and the compat paths.
"""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn import compat
from fusedattn.semantics import within_key_lengths
from fusedattn.testing import assert_backend_matches

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fill_storage(tensor: torch.Tensor, storage: torch.Tensor, poison: bool) -> torch.Tensor:
    """A copy of tensor with the storage positions (mask broadcast to its shape) set to NaN
    and +-Inf (poison), or left finite."""
    copy = tensor.clone()
    if not poison:
        return copy
    if copy.dtype == torch.int8:
        return copy
    if copy.dtype == torch.float8_e4m3fn:
        copy.view(torch.uint8).masked_fill_(storage, 0x7F)  # e4m3 has no Inf: NaN only
        return copy
    nan = torch.full_like(copy, float("nan"))
    nan[..., ::2] = float("inf")
    nan[..., 1::4] = float("-inf")
    return torch.where(storage, nan, copy)


def _past(lengths: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(B, 1, Sk, 1): True at positions >= lengths[b]."""
    return ~within_key_lengths(lengths, seqlen)[:, None, :, None]


def _run_twice(run, *tensors_and_storage):
    """run(*tensors) with finite storage and with poisoned storage: both results."""
    results = []
    for poison in (False, True):
        tensors = [_fill_storage(t, storage, poison) for t, storage in tensors_and_storage]
        results.append(run(*tensors))
    return results


def _assert_same_and_clean(finite, poisoned):
    for a, b in zip(finite, poisoned):
        assert not torch.isnan(b).any(), "storage reached the result"
        assert torch.equal(a, b), f"results differ: max {(a.double() - b.double()).abs().max()}"


CASES = [
    # (Sq, Sk, lengths, causal): decode over a 128-key tile boundary, few rows, a prefill,
    # and lengths 0, 1 and Sk.
    (1, 300, (200, 0), False),
    (1, 300, (1, 300), False),
    (3, 150, (129, 77), True),
    (40, 70, (17, 70), True),
    (40, 70, (33, 0), False),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("seqlen_q", "seqlen_k", "lengths", "causal"), CASES)
def test_key_lengths_storage_is_never_read(backend, dtype, seqlen_q, seqlen_k, lengths, causal):
    q = torch.randn(2, 8, seqlen_q, 64, dtype=dtype)
    k = torch.randn(2, 2, seqlen_k, 64, dtype=dtype)
    v = torch.randn(2, 2, seqlen_k, 64, dtype=dtype)
    key_lengths = torch.tensor(lengths, dtype=torch.int32)
    past = _past(key_lengths, seqlen_k)
    grad_out = torch.randn(2, 8, seqlen_q, 64, dtype=dtype)

    def run(k, v):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = fusedattn.attention(
            *leaves, causal=causal, key_lengths=key_lengths, return_lse=True, backend=backend
        )
        grads = torch.autograd.grad(out, leaves, grad_out)
        return out, lse, *grads

    finite, poisoned = _run_twice(run, (k, past), (v, past))
    _assert_same_and_clean(finite, poisoned)
    for grad in poisoned[3:]:
        assert (grad * past == 0).all(), "dk or dv is not 0 past key_lengths"


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16"])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=str)
def test_eight_bit_storage_and_its_scales_are_never_read(cpu_variant, isa, kv_dtype):
    cpu_variant(isa)
    q = torch.randn(2, 8, 1, 128, dtype=torch.bfloat16)
    k = (torch.randn(2, 2, 300, 128) * 20).clamp(-100, 100).to(kv_dtype)
    v = (torch.randn(2, 2, 300, 128) * 20).clamp(-100, 100).to(kv_dtype)
    k_descale = torch.rand(2, 2, 300) * 0.02 + 0.001
    v_descale = torch.rand(2, 2, 300) * 0.02 + 0.001
    key_lengths = torch.tensor([200, 37], dtype=torch.int32)
    past = _past(key_lengths, 300)

    def run(k, v, k_descale, v_descale):
        return fusedattn.attention(
            q, k, v, key_lengths=key_lengths, k_descale=k_descale, v_descale=v_descale, return_lse=True, backend="cpu"
        )

    finite, poisoned = _run_twice(run, (k, past), (v, past), (k_descale, past[..., 0]), (v_descale, past[..., 0]))
    _assert_same_and_clean(finite, poisoned)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_paged_storage_is_never_read(backend):
    # Rows past each sequence's length in its last block, and blocks no table entry needs.
    block_size, num_blocks = 16, 9
    table = torch.tensor([[4, 0, 7, -1], [2, 8, -1, -1]], dtype=torch.int32)
    cache_lengths = torch.tensor([40, 17], dtype=torch.int32)
    held = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for row, length in zip(table.tolist(), cache_lengths.tolist()):
        for slot, block in enumerate(row):
            if block >= 0:
                held[block, : max(0, min(block_size, length - slot * block_size))] = True
    storage = ~held[:, :, None, None]
    q = torch.randn(3, 4, 64)
    key_cache, value_cache = (torch.randn(num_blocks, block_size, 2, 64) for _ in range(2))
    cu_seqlens_q = torch.tensor([0, 2, 3], dtype=torch.int32)

    def run(key_cache, value_cache):
        return fusedattn.attention_paged(
            q, key_cache, value_cache, table, cache_lengths, cu_seqlens_q, 2, causal=True, return_lse=True,
            backend=backend,
        )  # fmt: skip

    finite, poisoned = _run_twice(run, (key_cache, storage), (value_cache, storage))
    _assert_same_and_clean(finite, poisoned)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_kvcache_storage_is_never_read(paged, leftpad, seqlen_q):
    # flash_attn_with_kvcache reads cache rows [cache_leftpad[b], cache_seqlens[b]) only, as
    # flash-attn 2 does: a cache from torch.empty needs no clearing.
    batch, capacity, block_size = 3, 64, 16
    seqlens = torch.tensor([37, 1, 64], dtype=torch.int32)
    starts = torch.tensor([5, 0, 63], dtype=torch.int32) if leftpad else torch.zeros(3, dtype=torch.int32)
    positions = torch.arange(capacity)[None, :]
    storage = ((positions >= seqlens[:, None]) | (positions < starts[:, None]))[:, :, None, None]  # (B, S, 1, 1)
    q = torch.randn(batch, seqlen_q, 4, 32)
    k_cache, v_cache = (torch.randn(batch, capacity, 2, 32) for _ in range(2))
    block_table = None
    if paged:
        # Cache row b is blocks 4b .. 4b + 3, stored in reverse order in the block pool.
        blocks = capacity // block_size
        block_table = (batch * blocks - 1 - torch.arange(batch * blocks)).view(batch, blocks).to(torch.int32)

    def to_pool(cache):
        if block_table is None:
            return cache
        pool = torch.empty(batch * (capacity // block_size), block_size, *cache.shape[2:], dtype=cache.dtype)
        pool[block_table.flatten().long()] = cache.reshape(-1, block_size, *cache.shape[2:])
        return pool

    def run(k_cache, v_cache):
        return compat.flash_attn_with_kvcache(
            q, to_pool(k_cache), to_pool(v_cache), cache_seqlens=seqlens, block_table=block_table,
            cache_leftpad=starts if leftpad else None, causal=True, return_softmax_lse=True,
        )  # fmt: skip

    finite, poisoned = _run_twice(run, (k_cache, storage), (v_cache, storage))
    _assert_same_and_clean(finite, poisoned)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_split_decode_covers_the_visible_keys(kv_dtype):
    # One KV head on two threads: the CPU decode splits the keys, over key_lengths[0] = 1500
    # of the 2048 stored (the splits' ranges come from the visible keys, not the storage).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q_dtype = torch.bfloat16 if kv_dtype == torch.int8 else kv_dtype
        q = torch.randn(1, 8, 1, 128, dtype=q_dtype)
        k, v = (torch.randn(1, 1, 2048, 128) for _ in range(2))
        options = {"key_lengths": torch.tensor([1500], dtype=torch.int32)}
        if kv_dtype == torch.int8:
            k, v = ((t * 30).round().clamp(-127, 127).to(torch.int8) for t in (k, v))
            options.update(k_descale=torch.rand(1, 1, 2048) * 0.01 + 0.01, v_descale=torch.rand(1, 1, 2048) * 0.01)
        else:
            k, v = k.to(kv_dtype), v.to(kv_dtype)
        assert_backend_matches("cpu", q, k, v, **options)  # NaN past 1500 (check_backend)
        past = _past(options["key_lengths"], 2048)

        def run(k, v):
            return fusedattn.attention(q, k, v, return_lse=True, backend="cpu", **options)

        _assert_same_and_clean(*_run_twice(run, (k, past), (v, past)))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_gradient_into_storage_past_key_lengths(backend, dtype):
    # A NaN in q or dO reaches dk, dv of the keys its row cannot see (unspecified), but
    # never the storage past key_lengths: 0 there.
    q = torch.randn(2, 4, 20, 64, dtype=dtype)
    k, v = (torch.randn(2, 2, 150, 64, dtype=dtype) for _ in range(2))
    q[0, 1, 3] = float("nan")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fusedattn.attention(*leaves, key_lengths=torch.tensor([129, 150], dtype=torch.int32), backend=backend)
    grad_out = torch.randn_like(out)
    grad_out[0, 2, 5] = float("nan")
    _, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    assert (dk[0, :, 129:] == 0).all() and (dv[0, :, 129:] == 0).all()
