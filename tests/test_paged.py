"""fusedattn.attention_paged: attention over a paged KV cache read where its blocks lie.

The reference is checked against an independent gather (the keys copied out of their
blocks, then attention_varlen); the CPU kernels against the float64 reference for every
block size and feature; bad block tables and lengths are refused, eager and compiled.
The Triton kernels' paged tests are in test_triton_backend.py (they need its interpreter
fixture).
"""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn import compat
from fusedattn.backends.cpu import BACKEND as CPU_BACKEND
from fusedattn.dispatch import UnsupportedCallError
from fusedattn.testing import assert_backend_matches, paged_case

cpu_available, why = CPU_BACKEND.availability()
needs_cpu = pytest.mark.skipif(not cpu_available, reason=f"cpu backend unavailable: {why}")

# Features that apply to a paged call, by name (sinks and ALiBi slopes are made per case).
PAGED_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_top_left": {"causal": True, "causal_alignment": "top_left"},
    "window_causal": {"causal": True, "window": (7, None)},
    "window_both_sides": {"window": (5, 3)},
    "softcap_alibi_per_sequence": {"softcap": 2.0, "alibi_slopes": "per_sequence", "causal": True},
    "sinks": {"sinks": "per_head", "causal": True},
}
# (query lengths, cache lengths): decoding, chunked prefill (more query rows than a CPU row
# block: 40 queries x 2 heads per KV head), an empty sequence and a sequence with no queries.
SHAPES = {
    "decode": ((1, 1, 1), (9, 70, 33)),
    "chunked_prefill": ((3, 40, 0, 2), (5, 90, 17, 2)),
    "empty_cache": ((2, 1), (0, 23)),
}


def _options(name: str, inputs: tuple[torch.Tensor, ...], paged: dict) -> dict:
    options = dict(PAGED_CASES[name])
    heads_q = inputs[0].shape[1]
    if options.get("alibi_slopes") == "per_sequence":
        options["alibi_slopes"] = torch.rand(paged["cache_lengths"].shape[0], heads_q) * 0.3
    if options.get("sinks") == "per_head":
        options["sinks"] = torch.randn(heads_q)
    return {**options, **paged}


def _gathered(key_cache: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed (sum(lengths), H, D) keys, copied out of their blocks one position at a time."""
    block_size = key_cache.shape[1]
    rows = []
    for index, length in enumerate(lengths.tolist()):
        for position in range(length):
            rows.append(key_cache[int(table[index, position // block_size]), position % block_size])
    return torch.stack(rows) if rows else key_cache.new_zeros(0, *key_cache.shape[2:])


@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("block_size", [1, 16])
def test_reference_equals_gathered_varlen(case: str, block_size: int) -> None:
    generator = torch.Generator().manual_seed(3)
    (q, key_cache, value_cache), paged = paged_case(
        (3, 1, 5), (20, 7, 33), block_size=block_size, dtype=torch.float64, generator=generator, shared_prefix_blocks=1
    )
    options = _options(case, (q,), paged)
    out, lse = fusedattn.attention_paged(q, key_cache, value_cache, return_lse=True, backend="reference", **options)
    lengths = paged["cache_lengths"]
    k = _gathered(key_cache, paged["block_table"], lengths)
    v = _gathered(value_cache, paged["block_table"], lengths)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    varlen_options = {n: x for n, x in options.items() if n not in ("block_table", "cache_lengths")}
    cu_q, max_q = varlen_options.pop("cu_seqlens_q"), varlen_options.pop("max_seqlen_q")
    expected, expected_lse = fusedattn.attention_varlen(
        q, k, v, cu_q, cu_k, max_q, int(lengths.max()), return_lse=True, backend="reference", **varlen_options
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_cpu_matches_reference(case: str, shape: str, block_size: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(block_size)
    query_lengths, cache_lengths = SHAPES[shape]
    (q, key_cache, value_cache), paged = paged_case(
        query_lengths, cache_lengths, block_size=block_size, dtype=dtype, generator=generator, shared_prefix_blocks=1
    )
    assert_backend_matches("cpu", q, key_cache, value_cache, **_options(case, (q,), paged))


@needs_cpu
@pytest.mark.parametrize(
    ("head_dim", "head_dim_v", "heads_q", "heads_kv"), [(64, 64, 8, 1), (48, 24, 2, 2), (128, 96, 6, 3)]
)
def test_cpu_head_dims_and_groups(head_dim: int, head_dim_v: int, heads_q: int, heads_kv: int) -> None:
    # Unit-stride rows whose dims are multiples of the vector width take the in-place
    # decoding path; the others convert tiles first.
    (q, key_cache, value_cache), paged = paged_case(
        (1, 4), (150, 77), block_size=16, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
        head_dim_v=head_dim_v, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert_backend_matches("cpu", q, key_cache, value_cache, causal=True, **paged)


# Operators that read a tensor's shape, never its values (views, and new empty tensors).
_NO_DATA_READ = frozenset(
    f"aten::{name}"
    for name in (
        "new_empty", "empty", "empty_like", "empty_strided", "as_strided", "view", "reshape", "_reshape_alias",
        "transpose", "permute", "select", "slice", "expand", "alias", "detach", "unsqueeze", "squeeze", "t",
        "contiguous", "lift_fresh", "size", "stride",
    )
)  # fmt: skip


def cache_sized_operations(run, cache: torch.Tensor) -> list[str]:
    """The torch operators (other than the attention op) that run() applies to a tensor at
    least a tenth of the cache's size: a gather or copy of the cache would show here."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        run()
    found = []
    for event in profile.events():
        if event.name.startswith("fusedattn") or event.name in _NO_DATA_READ:
            continue
        for shape in event.input_shapes or ():
            if isinstance(shape, list) and shape and all(isinstance(size, int) for size in shape):
                if torch.Size(shape).numel() >= cache.numel() // 10:
                    found.append(f"{event.name}{shape}")
    return found


@needs_cpu
def test_cpu_reads_blocks_in_place() -> None:
    # No gather, index or copy of the cache: the kernels follow the block table themselves.
    (q, key_cache, value_cache), paged = paged_case((1, 1), (300, 200), block_size=16)
    found = cache_sized_operations(
        lambda: fusedattn.attention_paged(q, key_cache, value_cache, backend="cpu", **paged), key_cache
    )
    assert found == []
    # The check sees a gathering call (the packed copy compat's debugging path makes).
    table, lengths = paged["block_table"], paged["cache_lengths"].long()
    assert cache_sized_operations(lambda: compat._paged_keys(key_cache, table, lengths), key_cache)


@needs_cpu
def test_table_entries_past_the_last_block_are_never_read() -> None:
    (q, key_cache, value_cache), paged = paged_case((1, 2), (17, 40), block_size=16)
    expected = fusedattn.attention_paged(q, key_cache, value_cache, backend="cpu", **paged)
    table = paged["block_table"].clone()
    used = torch.arange(table.shape[1])[None, :] * 16 < paged["cache_lengths"][:, None]
    table[~used] = 2**31 - 1
    out = fusedattn.attention_paged(q, key_cache, value_cache, backend="cpu", **{**paged, "block_table": table})
    assert torch.equal(out, expected)


# ---- errors ---------------------------------------------------------------------------------
def _bad_inputs():
    (q, key_cache, value_cache), paged = paged_case((1, 2), (17, 40), block_size=16)
    return q, key_cache, value_cache, paged


BAD_TABLES = {
    "out_of_range_block": (
        lambda p: p["block_table"].index_fill(1, torch.tensor([0]), 99),
        "block_table.*block numbers",
    ),
    "negative_block": (lambda p: p["block_table"].index_fill(1, torch.tensor([1]), -3), "block_table.*got -3"),
    "table_too_short": (lambda p: p["block_table"][:, :1], "cache_lengths: expected lengths that fit"),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bad", list(BAD_TABLES))
def test_bad_block_tables_are_refused(bad: str, compiled: bool) -> None:
    q, key_cache, value_cache, paged = _bad_inputs()
    make, message = BAD_TABLES[bad]
    paged = {**paged, "block_table": make(paged)}

    def run(q, key_cache, value_cache, block_table, cache_lengths, cu_seqlens_q):
        return fusedattn.attention_paged(
            q, key_cache, value_cache, block_table, cache_lengths, cu_seqlens_q, 2, backend="reference"
        )

    function = torch.compile(run, backend="aot_eager", fullgraph=False) if compiled else run
    arguments = (q, key_cache, value_cache, paged["block_table"], paged["cache_lengths"], paged["cu_seqlens_q"])
    with pytest.raises(ValueError, match=message):
        function(*arguments)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: {**a, "cache_lengths": torch.tensor([17, -1], dtype=torch.int32)}, ValueError, "cache_lengths"),
        (lambda a: {**a, "cache_lengths": torch.tensor([17.0, 2.0])}, TypeError, "cache_lengths: expected dtype"),
        (
            lambda a: {**a, "cache_lengths": torch.tensor([17], dtype=torch.int32)},
            ValueError,
            r"cache_lengths: .*\(2,\)",
        ),
        (lambda a: {**a, "block_table": a["block_table"].float()}, TypeError, "block_table: expected dtype"),
        (lambda a: {**a, "block_table": a["block_table"][0]}, ValueError, "block_table: expected shape"),
        (lambda a: {**a, "value_cache": a["value_cache"][:, :8]}, ValueError, "value_cache: expected"),
        (
            lambda a: {**a, "key_cache": a["key_cache"].half()},
            TypeError,
            "key_cache, value_cache: expected the dtype of q",
        ),
        (lambda a: {**a, "key_cache": a["key_cache"][0]}, ValueError, "key_cache: expected a 4-D tensor"),
        (lambda a: {**a, "q": a["q"][None]}, ValueError, "q: expected a 3-D tensor"),
    ],
)
def test_bad_arguments_name_themselves(change, error, message) -> None:
    q, key_cache, value_cache, paged = _bad_inputs()
    arguments = change(dict(q=q, key_cache=key_cache, value_cache=value_cache, **paged))
    with pytest.raises(error, match=message):
        fusedattn.attention_paged(**arguments)


# ---- dispatch -------------------------------------------------------------------------------
def test_backward_is_served_by_the_reference() -> None:
    (q, key_cache, value_cache), paged = paged_case((2, 1), (20, 9), block_size=4, shared_prefix_blocks=1)
    q.requires_grad_(True)
    key_cache.requires_grad_(True)
    explanation = fusedattn.explain(q, key_cache, value_cache, causal=True, **paged)
    assert explanation.chosen == "reference"
    if cpu_available:
        assert "no backward over a paged KV cache" in explanation.refusals["cpu"]
        with pytest.raises(UnsupportedCallError, match="no backward over a paged KV cache"):
            fusedattn.attention_paged(q, key_cache, value_cache, causal=True, backend="cpu", **paged)
    out = fusedattn.attention_paged(q, key_cache, value_cache, causal=True, **paged)
    grad_q, grad_cache = torch.autograd.grad(out.sum(), (q, key_cache))
    # The gradient of a block shared by both sequences sums both sequences' contributions.
    lengths, table = paged["cache_lengths"], paged["block_table"]
    k = _gathered(key_cache, table, lengths)
    v = _gathered(value_cache, table, lengths)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    expected = fusedattn.attention_varlen(q, k, v, paged["cu_seqlens_q"], cu_k, 2, 20, causal=True)
    expected_q, expected_cache = torch.autograd.grad(expected.sum(), (q, key_cache))
    torch.testing.assert_close(grad_q, expected_q)
    torch.testing.assert_close(grad_cache, expected_cache)


def test_the_cuda_backend_declares_no_paged_caches() -> None:
    from fusedattn.backends.cuda import BACKEND as CUDA_BACKEND

    assert "paged_kv" not in CUDA_BACKEND.capabilities.features


# ---- compat ---------------------------------------------------------------------------------
@needs_cpu
def test_flash_attn_varlen_func_with_block_table_compiles() -> None:
    (q, key_cache, value_cache), paged = paged_case((1, 3), (20, 33), block_size=16)
    lengths = paged["cache_lengths"]
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)

    def run(q, key_cache, value_cache, cu_q, cu_k, table):
        return compat.flash_attn_varlen_func(
            q, key_cache, value_cache, cu_q, cu_k, 3, 33, causal=True, block_table=table
        )

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    arguments = (q, key_cache, value_cache, paged["cu_seqlens_q"], cu_k, paged["block_table"])
    expected = fusedattn.attention_paged(q, key_cache, value_cache, causal=True, backend="reference", **paged)
    torch.testing.assert_close(compiled(*arguments), expected)
    torch.testing.assert_close(run(*arguments), expected)


@needs_cpu
def test_flash_attn_with_kvcache_reads_the_paged_cache_in_place() -> None:
    (_, key_cache, value_cache), paged = paged_case((1, 1), (40, 17), block_size=16)
    q = torch.randn(2, 1, 4, 32)
    outputs = []
    found = cache_sized_operations(
        lambda: outputs.append(
            compat.flash_attn_with_kvcache(
                q, key_cache, value_cache, cache_seqlens=paged["cache_lengths"], block_table=paged["block_table"],
                causal=True,
            )
        ),
        key_cache,
    )  # fmt: skip
    assert found == []
    out = outputs[0]
    expected = fusedattn.attention_paged(q[:, 0], key_cache, value_cache, causal=True, backend="reference", **paged)
    torch.testing.assert_close(out[:, 0], expected)
