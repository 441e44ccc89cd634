"""Integer metadata (cu_seqlens, max_seqlen, key_lengths, KV-cache indices) can never crash a
call or make a kernel read outside a tensor: docs/semantics.md, "Invalid metadata".

Eager calls raise ValueError naming the argument. Compiled calls and direct op calls on CPU
tensors raise the same error when the graph runs (the op layer reads the values; the native
CPU operators check them again). Where the values cannot be read without synchronizing, the
device-side flag turns every output into NaN: tested here by hiding the values from the
host, and for the Triton kernels (which clamp) in tests/test_triton_backend.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import fusedattn
import pytest
import torch
from fusedattn import validation
from fusedattn.backends.cpu import BACKEND as CPU_BACKEND
from fusedattn.compat import flash_attn_varlen_func, flash_attn_with_kvcache
from fusedattn.ops import backward_arguments, op_arguments, ops_for
from fusedattn.ops import native_option_values as cpu_native_options

TOKENS = 10
VALID_OFFSETS = [0, 4, 10]
# (offsets, max_seqlen, the message fragment of the first rule broken)
BAD_OFFSETS = [
    ([0, 5, 4000], 5, "last offset to equal the packed length 10, got 4000"),
    ([0, -7, 10], 17, "non-decreasing offsets"),
    ([3, 2, 10], 8, "first offset to be 0, got 3"),
    ([0, 5, 9], 5, "last offset to equal the packed length 10, got 9"),
    ([0, 2**31 - 1, 10], 10, "non-decreasing offsets"),
    ([-(2**31), 0, 10], 10, "first offset to be 0"),
    ([0, 10, 10], 4, "at least the longest sequence (10), got 4"),
]
NATIVE = pytest.mark.skipif(CPU_BACKEND.availability()[0] is False, reason="fusedattn._C (CPU kernels) is not built")


def _packed(dtype=torch.float32):
    return tuple(torch.randn(TOKENS, 2, 8, dtype=dtype) for _ in range(3))


def _offsets(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("offsets, max_seqlen, message", BAD_OFFSETS)
@pytest.mark.parametrize("side", ["q", "k"])
def test_eager_varlen_refuses_bad_offsets(offsets, max_seqlen, message, side):
    q, k, v = _packed()
    good, bad = _offsets(VALID_OFFSETS), _offsets(offsets)
    cu_q, cu_k = (bad, good) if side == "q" else (good, bad)
    max_q, max_k = (max_seqlen, 6) if side == "q" else (6, max_seqlen)
    with pytest.raises(ValueError, match=f"(cu_seqlens|max_seqlen)_{side}"):
        fusedattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)


def test_int64_offsets_saturate_instead_of_wrapping():
    # 2**32 + 4 would wrap to 4 in int32 and look valid; it must stay invalid everywhere.
    q, k, v = _packed()
    cu = torch.tensor([0, 2**32 + 4, 10], dtype=torch.int64)
    call = validation.validate_varlen(q, k, v, _offsets(VALID_OFFSETS), _offsets(VALID_OFFSETS), 6, 6)
    hidden = dataclasses.replace(call, cu_seqlens_q=validation._as_int32(cu), metadata_checked=False)
    assert hidden.cu_seqlens_q.tolist() == [0, 2**31 - 1, 10]
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        validation.metadata_guard(hidden)


def test_max_seqlen_beyond_the_packed_length_is_capped():
    q, k, v = _packed()
    cu = _offsets(VALID_OFFSETS)
    call = validation.validate_varlen(q, k, v, cu, cu, 2**62, 10**30)
    assert (call.max_seqlen_q, call.max_seqlen_k) == (TOKENS, TOKENS)
    out = fusedattn.attention_varlen(q, k, v, cu, cu, 2**62, 10**30)
    torch.testing.assert_close(out, fusedattn.attention_varlen(q, k, v, cu, cu, 6, 6))


@pytest.mark.parametrize("lengths", [[-1, 3], [3, 8], [2**31 - 1, 0], [0, -(2**31)]])
def test_eager_key_lengths_out_of_range(lengths):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"key_lengths: expected values in \[0, 5\]"):
        fusedattn.attention(q, k, v, key_lengths=torch.tensor(lengths))


def _compiled_varlen(backend_name: str, compiler: str):
    def packed(q, k, v, cu_q, cu_k):
        return fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, backend=backend_name)

    return torch.compile(packed, fullgraph=True, backend=compiler, dynamic=False)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_varlen_raises_when_the_graph_runs(backend_name, compiler):
    # The crash: cu_seqlens_q = [0, 5, 4000] over 10 tokens, under fullgraph compile.
    if backend_name == "cpu" and not CPU_BACKEND.availability()[0]:
        pytest.skip("fusedattn._C is not built")
    torch._dynamo.reset()
    q, k, v = _packed()
    compiled = _compiled_varlen(backend_name, compiler)
    good = _offsets(VALID_OFFSETS)
    torch.testing.assert_close(compiled(q, k, v, good, good), fusedattn.attention_varlen(q, k, v, good, good, 6, 6))
    with pytest.raises(ValueError, match="cu_seqlens_q: expected the last offset to equal the packed length 10"):
        compiled(q, k, v, _offsets([0, 5, 4000]), good)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected non-decreasing offsets"):
        compiled(q, k, v, good, _offsets([0, 7, 3]))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_key_lengths_raise_when_the_graph_runs(compiler):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    compiled = torch.compile(
        lambda q, k, v, lengths: fusedattn.attention(q, k, v, key_lengths=lengths), fullgraph=True, backend=compiler
    )
    torch.testing.assert_close(
        compiled(q, k, v, torch.tensor([5, 2])), fusedattn.attention(q, k, v, key_lengths=torch.tensor([5, 2]))
    )
    with pytest.raises(ValueError, match="key_lengths"):
        compiled(q, k, v, torch.tensor([6, 2]))


def test_compiled_backward_with_bad_offsets_raises():
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in _packed())
    compiled = _compiled_varlen("reference", "aot_eager")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        compiled(q, k, v, _offsets([0, 11, 10]), _offsets(VALID_OFFSETS)).sum().backward()


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("offsets, max_seqlen, message", BAD_OFFSETS)
def test_direct_op_calls_check_the_values(backend_name, offsets, max_seqlen, message):
    # A torch.ops.fusedattn call skips Python validation: the op layer checks CPU values.
    if backend_name == "cpu" and not CPU_BACKEND.availability()[0]:
        pytest.skip("fusedattn._C is not built")
    q, k, v = _packed()
    call = validation.validate_varlen(q, k, v, _offsets(VALID_OFFSETS), _offsets(VALID_OFFSETS), 6, 6)
    bad = dataclasses.replace(call, cu_seqlens_q=_offsets(offsets), max_seqlen_q=max_seqlen, metadata_checked=False)
    forward_op, backward_op = ops_for(fusedattn.registry()[backend_name])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        forward_op(*op_arguments(bad))
    out, lse = forward_op(*op_arguments(call))
    with pytest.raises(ValueError, match="cu_seqlens_q|max_seqlen_q"):
        backward_op(torch.ones_like(out), out, lse, *backward_arguments(bad))


@NATIVE
@pytest.mark.parametrize("offsets, max_seqlen, message", BAD_OFFSETS)
def test_native_cpu_operator_checks_offsets_itself(offsets, max_seqlen, message):
    q, k, v = _packed()
    call = validation.validate_varlen(q, k, v, _offsets(VALID_OFFSETS), _offsets(VALID_OFFSETS), 6, 6)
    out, lse = torch.empty(TOKENS, 2, 8), torch.empty(2, TOKENS)
    for side in ("q", "k"):
        bad = dataclasses.replace(call, **{f"cu_seqlens_{side}": _offsets(offsets), f"max_seqlen_{side}": max_seqlen})
        with pytest.raises(ValueError, match=f"(cu_seqlens|max_seqlen)_{side}"):
            torch.ops.fusedattn_native.cpu_forward(q, k, v, out, lse, *cpu_native_options(bad))
        with pytest.raises(ValueError, match=f"(cu_seqlens|max_seqlen)_{side}"):
            torch.ops.fusedattn_native.cpu_backward(
                out, q, k, v, out, lse, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                *cpu_native_options(bad),
            )  # fmt: skip


@NATIVE
def test_native_cpu_operator_checks_sizes_and_key_lengths():
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    call = validation.validate_attention(q, k, v, key_lengths=torch.tensor([5, 2]))
    out, lse = torch.empty(2, 2, 5, 8), torch.empty(2, 2, 5)
    native = torch.ops.fusedattn_native.cpu_forward
    bad_lengths = dataclasses.replace(call, key_lengths=torch.tensor([9, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"key_lengths: expected values in \[0, 5\]"):
        native(q, k, v, out, lse, *cpu_native_options(bad_lengths))
    with pytest.raises(ValueError, match="key_lengths: expected shape"):
        native(
            q,
            k,
            v,
            out,
            lse,
            *cpu_native_options(dataclasses.replace(call, key_lengths=torch.tensor([1], dtype=torch.int32))),
        )
    with pytest.raises(ValueError, match="out: expected shape"):
        native(q, k, v, torch.empty(2, 2, 4, 8), lse, *cpu_native_options(call))
    with pytest.raises(ValueError, match="lse: expected shape"):
        native(q, k, v, out, torch.empty(2, 2), *cpu_native_options(call))
    with pytest.raises(ValueError, match="k: expected shape"):
        native(q, torch.randn(2, 2, 5, 7), v, out, lse, *cpu_native_options(call))
    with pytest.raises(ValueError, match="attn_mask: expected shape"):
        mask = dataclasses.replace(call, attn_mask=torch.ones(2, 2, 5, 4, dtype=torch.bool))
        native(q, k, v, out, lse, *cpu_native_options(mask))


# ---- the device-side flag: same decisions as the host check --------------------------------
def _hidden(call):
    return dataclasses.replace(call, metadata_checked=False)


OFFSET_CASES = [VALID_OFFSETS, [0, 0, 10], [0, 10, 10]] + [offsets for offsets, _, _ in BAD_OFFSETS]


@pytest.mark.parametrize("offsets", OFFSET_CASES)
@pytest.mark.parametrize("max_seqlen", [0, 4, 6, 10])
def test_device_flag_agrees_with_the_host_check(monkeypatch, offsets, max_seqlen):
    q, k, v = _packed()
    call = validation.validate_varlen(q, k, v, _offsets(VALID_OFFSETS), _offsets(VALID_OFFSETS), 6, 6)
    call = _hidden(dataclasses.replace(call, cu_seqlens_k=_offsets(offsets), max_seqlen_k=max_seqlen))
    try:
        validation.metadata_guard(call)
        host_says_invalid = False
    except ValueError:
        host_says_invalid = True
    monkeypatch.setattr(validation, "_values_readable", lambda tensor, synchronize=True: False)
    flag = validation.metadata_guard(call)
    assert flag is not None and flag.shape == () and flag.dtype == torch.bool
    assert bool(flag) == host_says_invalid


@pytest.mark.parametrize("lengths", [[0, 5], [5, 5], [-1, 3], [6, 0], [2**31 - 1, 1]])
def test_device_flag_for_key_lengths(monkeypatch, lengths):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    call = _hidden(validation.validate_attention(q, k, v, key_lengths=torch.tensor([1, 1])))
    call = dataclasses.replace(call, key_lengths=torch.tensor(lengths, dtype=torch.int32))
    monkeypatch.setattr(validation, "_values_readable", lambda tensor, synchronize=True: False)
    valid = all(0 <= n <= 5 for n in lengths)
    assert bool(validation.metadata_guard(call)) is (not valid)


def test_poison_replaces_every_output_only_when_flagged():
    # (The Triton kernels' end-to-end version is in tests/test_triton_backend.py.)
    out, lse = torch.randn(3, 4), torch.randn(4)
    assert validation.poison_if_invalid(None, out, lse) == (out, lse)
    kept = validation.poison_if_invalid(torch.tensor(False), out, lse)
    assert torch.equal(kept[0], out) and torch.equal(kept[1], lse)
    assert all(t.isnan().all() for t in validation.poison_if_invalid(torch.tensor(True), out, lse))


# ---- compat: KV-cache indices are checked before the cache is written ----------------------
def _cache_inputs(batch=2, capacity=16, heads=2, dim=8):
    q = torch.randn(batch, 1, heads, dim)
    caches = torch.randn(4, capacity, heads, dim), torch.randn(4, capacity, heads, dim)
    new = torch.randn(batch, 1, heads, dim), torch.randn(batch, 1, heads, dim)
    return q, caches, new


def _int32(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"cache_seqlens": _int32([3, 16])}, "cache_seqlens"),  # no room for the new token
        ({"cache_seqlens": _int32([-1, 3])}, "cache_seqlens"),
        ({"cache_seqlens": 2**40}, "cache_seqlens"),
        ({"cache_seqlens": _int32([3, 3]), "cache_batch_idx": _int32([0, 4])}, "cache_batch_idx"),
        ({"cache_seqlens": _int32([3, 3]), "cache_batch_idx": _int32([-1, 0])}, "cache_batch_idx"),
        ({"cache_seqlens": _int32([3, 3]), "cache_leftpad": _int32([0, 4])}, "cache_leftpad"),
        ({"cache_seqlens": _int32([3, 3]), "cache_leftpad": _int32([-2, 0])}, "cache_leftpad"),
        ({"cache_seqlens": _int32([3])}, "cache_seqlens"),
        ({"cache_seqlens": torch.tensor([3.0, 3.0])}, "cache_seqlens"),
    ],
)
def test_kv_cache_indices_are_refused_before_any_write(arguments, name):
    q, (k_cache, v_cache), (k, v) = _cache_inputs()
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises((ValueError, TypeError), match=name):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **arguments)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("table", [[[0, 1], [2, 9]], [[0, -1], [2, 3]], [[4, 0], [1, 2]]])
def test_paged_block_numbers_in_use_are_checked(table):
    q, _, (k, v) = _cache_inputs()
    k_cache, v_cache = torch.randn(4, 8, 2, 8), torch.randn(4, 8, 2, 8)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=_int32([9, 12]), block_table=_int32(table))
    # Blocks past each sequence's end are never read, so they may hold anything.
    short = flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=_int32([2, 2]), block_table=_int32([[0, 99], [1, -5]])
    )
    assert not short.isnan().any()


def test_paged_varlen_checks_offsets_and_blocks():
    q = torch.randn(4, 2, 8)
    cache = torch.randn(4, 8, 2, 8)
    cu_q = _int32([0, 2, 4])
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attn_varlen_func(q, cache, cache, cu_q, _int32([0, 5, 30]), 2, 30, block_table=_int32([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, cache, cache, cu_q, _int32([0, 5, 8]), 2, 8, block_table=_int32([[0, 1], [7, 3]]))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attn_varlen_func(q, cache, cache, cu_q, _int32([0, 9, 8]), 2, 8, block_table=_int32([[0, 1], [2, 3]]))


def test_unreadable_invalid_cache_indices_write_nothing_and_poison(monkeypatch):
    q, (k_cache, v_cache), (k, v) = _cache_inputs()
    before = k_cache.clone()
    monkeypatch.setattr(validation, "_values_readable", lambda tensor, synchronize=True: False)
    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=_int32([3, 16]), cache_batch_idx=_int32([0, 9])
    )
    assert out.isnan().all()
    assert torch.equal(k_cache, before)
    good = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=_int32([3, 5]))
    assert not good.isnan().any()
    assert torch.equal(k_cache[0, 3], k[0, 0]) and torch.equal(k_cache[1, 5], k[1, 0])


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_unreadable_negative_cache_lengths_write_nothing_and_poison(monkeypatch, paged):
    # Found by the fuzz campaign (seed 61): a negative length made the write start negative,
    # and a paged cache's block lookup then raised an IndexError-like RuntimeError.
    q, (k_cache, v_cache), (k, v) = _cache_inputs()
    before = k_cache.clone()
    monkeypatch.setattr(validation, "_values_readable", lambda tensor, synchronize=True: False)
    options = dict(cache_seqlens=_int32([-1, 3]), cache_leftpad=_int32([1, 0]))
    if paged:
        block = k_cache.shape[1] // 2
        k_cache, v_cache = (t.reshape(-1, block, *t.shape[2:]) for t in (k_cache, v_cache))
        before = k_cache.clone()
        options["block_table"] = _int32([[0, 1], [2, 1_000_000]])
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **options)
    assert out.isnan().all()
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("leftpad", [False, True], ids=["in_place", "leftpad"])
def test_unreadable_valid_paged_indices_with_more_rows_than_blocks(monkeypatch, leftpad):
    # Found by the fuzz campaign (seed 15, compiled): with indices unreadable, the default
    # cache rows 0..B-1 were checked against the number of *blocks* of a paged cache, so a
    # valid batch larger than the cache's block count came back all NaN.
    q = torch.randn(3, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)
    options = dict(cache_seqlens=_int32([4, 2, 7]), block_table=_int32([[0, 1], [1, 0], [1, 0]]))
    if leftpad:
        options["cache_leftpad"] = _int32([1, 0, 2])
    expected = flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    monkeypatch.setattr(validation, "_values_readable", lambda tensor, synchronize=True: False)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected)


# ---- the public namespace -------------------------------------------------------------------
def test_submodules_are_attributes_of_the_package_without_being_imported_eagerly():
    script = (
        "import sys, fusedattn\n"
        "eager = [m for m in ('fusedattn.nn', 'fusedattn.compat', 'transformers') if m in sys.modules]\n"
        "assert not eager, eager\n"
        "assert fusedattn.nn.MultiheadAttention.__name__ == 'MultiheadAttention'\n"
        "assert callable(fusedattn.compat.flash_attn_func)\n"
        "assert fusedattn.integrations.__name__ == 'fusedattn.integrations'\n"
        "assert 'nn' in dir(fusedattn)\n"
        "try:\n    fusedattn.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    pytest.importorskip("transformers")
    subprocess.run(
        [sys.executable, "-c", "import fusedattn; assert callable(fusedattn.integrations.transformers.register)"],
        check=True,
    )
