"""fusedattn.compat: flash_attn_func, flash_attn_varlen_func (packed keys, or a paged cache with
block_table) and flash_attn_with_kvcache (dense or paged caches, with and without appends).

The oracle is the float64 reference on the keys the FlashAttention semantics select,
gathered here independently of fusedattn.compat; KV-cache calls also check the caches
afterwards (new keys written exactly where they belong, nothing else touched; a refused
call writes nothing).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fusedattn import compat
from hypothesis import strategies as st

from . import faults as fl
from .case import Case, clone_arguments, flags
from .dense import QKV, _offset_fault, _offsets, _one_fault, _pick_fault
from .oracle import first_failure
from .problem import BACKENDS, Options, check_attention, oracle_call, sizes, tensor_layout
from .tensors import float_dtypes, make_tensor

ALIASES = {"softmax_scale": ("scale",), "window_size": ("window",), "k_cache": ("k",), "v_cache": ("v",)}
FLASH_FAULTS = [
    fl.option("softmax_scale", ["0.5", True, [1.0]]),
    fl.option("window_size", [(1,), "ab", (1.5, 2), ("a", 1), None, (1, 2, 3)]),
    fl.option("softcap", [-1.0, math.nan, math.inf, "1"]),
    fl.option("causal", [1, "yes", None]),
]


def _flash_window(draw: st.DrawFn) -> tuple[int, int]:
    side = st.one_of(st.integers(-3, 10), st.sampled_from([-1, 2**31 - 1, 2**40]))
    return draw(st.one_of(st.just((-1, -1)), st.tuples(side, side)))


def _options(draw: st.DrawFn, heads_q: int, batch: int, values: dict[str, Any]) -> Options:
    """Draw FlashAttention options into values; return them as fusedattn Options."""
    window = _flash_window(draw)
    left, right = window
    opts = Options(causal=draw(st.booleans()), scale=draw(st.sampled_from([None, None, 0.25, 1.5])),
                   softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])),
                   window=None if left < 0 and right < 0 else (None if left < 0 else left, None if right < 0 else right))  # fmt: skip
    if draw(st.integers(0, 3)) == 0:
        shape = draw(st.sampled_from([(heads_q,), (batch, heads_q)]))
        opts.alibi_slopes = torch.rand(shape, generator=torch.Generator().manual_seed(heads_q)) * 0.5
        values["alibi_slopes"] = opts.alibi_slopes
    if opts.causal:
        values["causal"] = True
    if opts.scale is not None:
        values["softmax_scale"] = opts.scale
    if opts.softcap:
        values["softcap"] = opts.softcap
    if window != (-1, -1) or draw(st.booleans()):
        values["window_size"] = window
    return opts


def _case(entry: str, function: Any, arguments: fl.Arguments, backend: str, check: Any, features: set[str],
          target: str | None, fault: str | None, **extra: Any) -> Case:  # fmt: skip
    args, kwargs = arguments.split()
    return Case(entry=entry, function=function, args=args, kwargs=kwargs, backend=backend,
                backend_by_environment=True, check=check, features=frozenset(features), target=target, fault=fault,
                aliases=ALIASES, **extra)  # fmt: skip


# ---- flash_attn_func --------------------------------------------------------------------------
@st.composite
def flash_attn_func_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes())
    dtype, backend = draw(float_dtypes()), draw(st.sampled_from(BACKENDS))
    q = make_tensor((s.batch, s.seqlen_q, s.heads_q, s.head_dim), dtype, tensor_layout(draw, True))
    k = make_tensor((s.batch, s.seqlen_k, s.heads_kv, s.head_dim), dtype, tensor_layout(draw, False))
    v = make_tensor((s.batch, s.seqlen_k, s.heads_kv, s.head_dim_v), dtype, tensor_layout(draw, False))
    values: dict[str, Any] = {"q": q, "k": k, "v": v}
    opts = _options(draw, s.heads_q, s.batch, values)
    probs = draw(st.booleans())
    if probs:
        values["return_attn_probs"] = True
    arguments = fl.Arguments(values, QKV)
    target, fault = _pick_fault(draw, [fl.wrong_dtype(QKV), fl.mismatched_dtype(("k", "v")), fl.wrong_rank(QKV),
                                       fl.option("dropout_p", [-0.1, 1.5, "0"]), fl.alibi_faults(s.heads_q, s.batch),
                                       fl.resize("k", 3, lambda n: [n + 1]), *FLASH_FAULTS], arguments)  # fmt: skip
    empty = q.numel() == 0 or s.seqlen_k == 0
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    call = oracle_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), opts)

    def check(result: Any) -> str | None:
        if probs:
            out, lse, _ = result
            return check_attention(call, (out.transpose(1, 2), lse), True)
        return check_attention(call, result.transpose(1, 2), False)

    return _case("flash_attn_func", compat.flash_attn_func, arguments, backend, check,
                 set(call.features()) | flags(probs=probs, empty=empty), target, fault)  # fmt: skip


# ---- flash_attn_varlen_func, packed and paged ---------------------------------------------------
def _lengths(draw: st.DrawFn, count: int, longest: int) -> list[int]:
    return [draw(st.integers(0, longest)) for _ in range(count)]


@st.composite
def varlen_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes(max_batch=0))
    count = draw(st.integers(0, 3))
    lengths_q, lengths_k = _lengths(draw, count, 7), _lengths(draw, count, 9)
    dtype, backend = draw(float_dtypes()), draw(st.sampled_from(BACKENDS))
    q = make_tensor((sum(lengths_q), s.heads_q, s.head_dim), dtype, tensor_layout(draw, True))
    k = make_tensor((sum(lengths_k), s.heads_kv, s.head_dim), dtype, tensor_layout(draw, False))
    v = make_tensor((sum(lengths_k), s.heads_kv, s.head_dim_v), dtype, tensor_layout(draw, False))
    cu_q, cu_k = (torch.tensor(_offsets(n), dtype=torch.int32) for n in (lengths_q, lengths_k))
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    values: dict[str, Any] = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
                              "max_seqlen_q": max_q, "max_seqlen_k": max_k}  # fmt: skip
    opts = _options(draw, s.heads_q, count, values)
    facts = {"total_q": sum(lengths_q), "total_k": sum(lengths_k)}
    arguments = fl.Arguments(values, (*QKV, "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"), facts)
    target, fault = _pick_fault(draw, [fl.wrong_dtype(QKV), fl.mismatched_dtype(("k", "v")), _offset_fault("q"),
                                       _offset_fault("k"), fl.alibi_faults(s.heads_q, count), *FLASH_FAULTS],
                                arguments)  # fmt: skip
    empty = q.numel() == 0 or k.shape[0] == 0
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    call = oracle_call(q, k, v, opts, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    return _case("flash_attn_varlen_func", compat.flash_attn_varlen_func, arguments, backend,
                 lambda out: check_attention(call, out, False), set(call.features()) | flags(empty=empty),
                 target, fault)  # fmt: skip


def _block_table(draw: st.DrawFn, rows: int, max_blocks: int, num_blocks: int) -> torch.Tensor:
    table = [[draw(st.integers(0, num_blocks - 1)) for _ in range(max_blocks)] for _ in range(rows)]
    return torch.tensor(table, dtype=torch.int32).reshape(rows, max_blocks)


def _garbage_past_use(table: torch.Tensor, ends: list[int], block_size: int) -> torch.Tensor:
    """Blocks past each sequence's end are never read: fill them with nonsense numbers."""
    table = table.clone()
    for row, end in enumerate(ends):
        table[row, -(-end // block_size) :] = -7 if row % 2 else 10**6
    return table


def _paged_keys(cache: torch.Tensor, table: torch.Tensor, starts: list[int], ends: list[int]) -> torch.Tensor:
    block_size = cache.shape[1]
    rows = [cache[int(table[b, p // block_size]), p % block_size] for b in range(len(ends))
            for p in range(starts[b], ends[b])]  # fmt: skip
    return torch.stack(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def _table_fault(rows: int, max_blocks: int, num_blocks: int, in_use: list[int]) -> fl.Fault:
    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str] | None:
        kind = draw(st.sampled_from(["dtype", "shape", "value", "value", "list"]))
        table = a.values["block_table"]
        if kind == "dtype":
            a.values["block_table"] = table.to(draw(st.sampled_from([torch.int64, torch.float32, torch.int16])))
        elif kind == "shape":
            a.values["block_table"] = draw(st.sampled_from([table[None], table[:, :0], torch.cat([table, table])]))
            if a.values["block_table"].shape[0] == table.shape[0] and table.shape[0] == 0:
                return None
        elif kind == "value":
            used = [(r, b) for r in range(rows) for b in range(in_use[r])]
            if not used:
                return None
            row, block = draw(st.sampled_from(used))
            table = table.clone()
            table[row, block] = draw(st.sampled_from([num_blocks, -1, 2**31 - 1, -(2**31)]))
            a.values["block_table"] = table
        else:
            a.values["block_table"] = table.tolist()
        return "block_table", kind

    return fault


@st.composite
def paged_varlen_cases(draw: st.DrawFn) -> Case:
    s = draw(sizes(max_batch=0))
    count = draw(st.integers(0, 3))
    block_size, max_blocks, num_blocks = draw(st.sampled_from([1, 4, 16])), draw(st.integers(1, 3)), draw(
        st.integers(1, 6))  # fmt: skip
    lengths_q, lengths_k = _lengths(draw, count, 6), _lengths(draw, count, block_size * max_blocks)
    dtype, backend = draw(float_dtypes()), draw(st.sampled_from(BACKENDS))
    q = make_tensor((sum(lengths_q), s.heads_q, s.head_dim), dtype, tensor_layout(draw, True))
    k_cache = make_tensor((num_blocks, block_size, s.heads_kv, s.head_dim), dtype, tensor_layout(draw, False))
    v_cache = make_tensor((num_blocks, block_size, s.heads_kv, s.head_dim_v), dtype, tensor_layout(draw, False))
    table = _block_table(draw, count, max_blocks, num_blocks)
    used = [-(-n // block_size) for n in lengths_k]
    table = _garbage_past_use(table, lengths_k, block_size) if draw(st.booleans()) else table
    cu_q, cu_k = (torch.tensor(_offsets(n), dtype=torch.int32) for n in (lengths_q, lengths_k))
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    values: dict[str, Any] = {"q": q, "k": k_cache, "v": v_cache, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
                              "max_seqlen_q": max_q, "max_seqlen_k": max_k}  # fmt: skip
    opts = _options(draw, s.heads_q, count, values)
    values["block_table"] = table
    arguments = fl.Arguments(values, (*QKV, "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
                             {"total_q": sum(lengths_q), "total_k": sum(lengths_k)})  # fmt: skip
    # With a paged cache the last offset is not tied to a packed length: the fault is a
    # sequence longer than its blocks hold.
    # With no sequence there is no block to overflow (and another offset count would be a
    # different fault): the fault does not apply.
    long_offsets = _offsets([*lengths_k[:-1], block_size * max_blocks + 1]) if count else None

    def capacity_fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str] | None:
        if long_offsets is None:
            return None
        a.values["cu_seqlens_k"] = torch.tensor(long_offsets, dtype=torch.int32)
        return "cu_seqlens_k", f"offsets {long_offsets}: longer than {block_size * max_blocks} cached tokens"

    target, fault = _pick_fault(draw, [_table_fault(count, max_blocks, num_blocks, used), capacity_fault,
                                       fl.wrong_dtype(("q",)), *FLASH_FAULTS[:3]], arguments)  # fmt: skip
    keys = _paged_keys(k_cache, table, [0] * count, lengths_k)
    vals = _paged_keys(v_cache, table, [0] * count, lengths_k)
    empty = q.numel() == 0 or keys.shape[0] == 0
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    call = oracle_call(q, keys, vals, opts, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                       max_seqlen_k=max_k)  # fmt: skip
    # Compiled, a bad block number or length cannot be read while tracing: the output is all
    # NaN (docs/semantics.md, "Invalid metadata").
    value_fault = (target, fault) == ("block_table", "value") or target == "cu_seqlens_k"
    return _case("flash_attn_varlen_func[paged]", compat.flash_attn_varlen_func, arguments, backend,
                 lambda out: check_attention(call, out, False), set(call.features()) | flags(paged=True, empty=empty),
                 target, fault, compiled_fault_check=_all_nan if value_fault else None)  # fmt: skip


def _all_nan(result: Any) -> str | None:
    """The compiled answer to a bad metadata value: every output element NaN."""
    outputs = result if isinstance(result, tuple) else (result,)
    not_nan = [f"{int((~torch.isnan(t)).sum())} element(s) not NaN" for t in outputs
               if isinstance(t, torch.Tensor) and not bool(torch.isnan(t).all())]  # fmt: skip
    return not_nan[0] if not_nan else None


# ---- flash_attn_with_kvcache ----------------------------------------------------------------------
@st.composite
def kvcache_cases(draw: st.DrawFn, paged: bool = False) -> Case:
    s = draw(sizes())
    batch = s.batch
    dtype, backend = draw(float_dtypes()), draw(st.sampled_from(BACKENDS))
    new_tokens = draw(st.sampled_from([0, 0, 1, 2, 5]))
    if paged:
        block_size, max_blocks = draw(st.sampled_from([1, 4, 16])), draw(st.integers(1, 3))
        new_tokens = min(new_tokens, block_size * max_blocks)
        capacity, cache_rows = block_size * max_blocks, draw(st.integers(1, 6))
        if new_tokens:  # appends write blocks: every sequence gets blocks of its own
            cache_rows = max(cache_rows, batch * max_blocks)
    else:
        capacity, cache_rows = draw(st.integers(new_tokens, 12)), batch + draw(st.integers(0, 2))
        block_size = capacity
    q = make_tensor((batch, s.seqlen_q % 6, s.heads_q, s.head_dim), dtype, tensor_layout(draw, True))
    layout = tensor_layout(draw, False) if new_tokens == 0 else None  # appends need a writable cache
    k_cache = make_tensor((cache_rows, block_size, s.heads_kv, s.head_dim), dtype, layout or tensor_layout(draw, False)
                          ) if layout else torch.randn(cache_rows, block_size, s.heads_kv, s.head_dim).to(dtype)  # fmt: skip
    v_cache = torch.randn(cache_rows, block_size, s.heads_kv, s.head_dim_v).to(dtype)
    values: dict[str, Any] = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if new_tokens:
        values["k"] = torch.randn(batch, new_tokens, s.heads_kv, s.head_dim).to(dtype)
        values["v"] = torch.randn(batch, new_tokens, s.heads_kv, s.head_dim_v).to(dtype)
    lengths = [draw(st.integers(0, capacity - new_tokens)) for _ in range(batch)]
    seqlens_kind = draw(st.sampled_from(["tensor", "tensor", "int", "none"]))
    if seqlens_kind == "none" and new_tokens == 0:
        lengths = [capacity] * batch
    elif seqlens_kind == "int" and batch:
        lengths = [lengths[0]] * batch
        values["cache_seqlens"] = lengths[0]
    else:
        values["cache_seqlens"] = torch.tensor(lengths, dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    starts = [0] * batch
    if draw(st.integers(0, 2)) == 0:
        starts = [draw(st.integers(0, n)) for n in lengths]
        values["cache_leftpad"] = torch.tensor(starts, dtype=torch.int32)
    rows = list(range(batch))
    if paged:
        ends = [n + new_tokens for n in lengths]
        table = _block_table(draw, batch, max_blocks, cache_rows)
        if new_tokens:
            order = draw(st.permutations(range(cache_rows)))[: batch * max_blocks]
            table = torch.tensor(order, dtype=torch.int32).reshape(batch, max_blocks)
        table = _garbage_past_use(table, ends, block_size) if draw(st.booleans()) else table
        values["block_table"] = table
    elif draw(st.booleans()):
        rows = draw(st.permutations(range(cache_rows)))[:batch]
        values["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32)
    opts = _options(draw, s.heads_q, batch, values)
    values.pop("window_size", None)  # FlashAttention's form of the same window, re-added below
    if opts.window is not None:
        values["window_size"] = tuple(-1 if w is None else w for w in opts.window)
    if draw(st.booleans()):
        values["return_softmax_lse"] = True
    before = clone_arguments((k_cache, v_cache))
    expected_caches = _appended(before, values, rows, lengths, new_tokens, paged)
    arguments = fl.Arguments(values, ("q", "k_cache", "v_cache"))
    kv_faults = [
        fl.int_tensor_faults("cache_seqlens", lambda a: (batch,), 0, capacity - new_tokens, scalar_valid=True),
        _leftpad_fault(lengths),
        fl.mismatched_dtype(("k_cache", "v_cache")), fl.resize("v_cache", 0, lambda n: [n + 1]),
        fl.option("rotary_cos", [torch.ones(1)]), *FLASH_FAULTS[:3],
    ]  # fmt: skip
    if paged:
        kv_faults.append(_table_fault(batch, max_blocks, cache_rows, [-(-e // block_size) for e in ends]))
        kv_faults.append(fl.option("cache_batch_idx", [torch.arange(batch, dtype=torch.int32)]))
    else:
        kv_faults.append(fl.int_tensor_faults("cache_batch_idx", lambda a: (batch,), 0, cache_rows - 1))
    if new_tokens:
        kv_faults.append(fl.resize("k", 2, lambda n: [n + 1]))
        kv_faults.append(fl.option("v", [None]))
    target, fault = _pick_fault(draw, kv_faults, arguments)
    empty = q.numel() == 0 or all(e - s0 == 0 for e, s0 in zip([n + new_tokens for n in lengths], starts))
    backend, target, fault = _one_fault(backend, dtype, target, fault, values)
    return_lse = values.get("return_softmax_lse", False)
    # What the call may not write: the caches as passed (a fault may have replaced one).
    passed = clone_arguments((values["k_cache"], values["v_cache"]))

    def check(result: Any) -> str | None:
        caches = (values["k_cache"], values["v_cache"])
        written = [f"{name} differs from the expected cache after the call" for name, got, want
                   in zip(("k_cache", "v_cache"), caches, expected_caches) if not torch.equal(got, want)]  # fmt: skip
        outs = []
        for b in range(batch):
            if paged:
                table = values["block_table"][b : b + 1]
                keys = _paged_keys(expected_caches[0], table, [starts[b]], [lengths[b] + new_tokens])
                vals = _paged_keys(expected_caches[1], table, [starts[b]], [lengths[b] + new_tokens])
            else:
                span = slice(starts[b], lengths[b] + new_tokens)
                keys, vals = expected_caches[0][rows[b], span], expected_caches[1][rows[b], span]
            per_batch = Options(**{**opts.__dict__, "alibi_slopes": None})
            if opts.alibi_slopes is not None:
                per_batch.alibi_slopes = opts.alibi_slopes[b] if opts.alibi_slopes.dim() == 2 else opts.alibi_slopes
            one = oracle_call(q[b : b + 1].transpose(1, 2), keys[None].transpose(1, 2), vals[None].transpose(1, 2),
                              per_batch)  # fmt: skip
            out = result[0] if return_lse else result
            outs.append(check_attention(one, (out[b : b + 1].transpose(1, 2), result[1][b : b + 1]) if return_lse
                                        else out[b : b + 1].transpose(1, 2), return_lse))  # fmt: skip
        shape = None if (result[0] if return_lse else result).shape[0] == batch else "out: wrong batch size"
        return first_failure(*written, shape, *outs)

    def unchanged() -> str | None:
        caches = (values["k_cache"], values["v_cache"])
        return first_failure(*[f"{name} was written" for name, got, was in zip(("k_cache", "v_cache"), caches, passed)
                               if isinstance(got, torch.Tensor) and not _same(got, was)])  # fmt: skip

    def all_nan(result: Any) -> str | None:
        """Compiled, a bad index value cannot be read while tracing: out (and lse) all NaN,
        nothing written (docs/semantics.md, Invalid metadata)."""
        outputs = result if return_lse else (result,)
        names = ("out", "softmax_lse")[: len(outputs)]
        not_nan = [f"{name}: {int((~torch.isnan(t)).sum())} element(s) not NaN" for name, t in zip(names, outputs)
                   if isinstance(t, torch.Tensor) and not bool(torch.isnan(t).all())]  # fmt: skip
        return first_failure(unchanged(), *not_nan)

    value_fault = (
        target in INDEX_ARGUMENTS and fault is not None and (target == "cache_leftpad" or fault.startswith("value"))
    )

    features = flags(
        paged=paged,
        append=bool(new_tokens),
        leftpad="cache_leftpad" in values,
        empty=empty,
        batch_idx="cache_batch_idx" in values,
    ) | {f"seqlens_{seqlens_kind}"}
    return _case("flash_attn_with_kvcache" + "[paged]" * paged, compat.flash_attn_with_kvcache, arguments, backend,
                 check, features, target, fault, after_refusal=unchanged,
                 compiled_fault_check=all_nan if value_fault else None)  # fmt: skip


INDEX_ARGUMENTS = ("cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")


def _same(got: torch.Tensor, was: torch.Tensor) -> bool:
    """Bit-for-bit the same tensor contents (NaN equal to NaN)."""
    if got.shape != was.shape or got.dtype != was.dtype:
        return False
    return bool(torch.equal(got, was)) or bool(((got == was) | (torch.isnan(got) & torch.isnan(was))).all())


def _leftpad_fault(lengths: list[int]) -> fl.Fault:
    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str] | None:
        if not lengths:
            return None
        pads = a.values.get("cache_leftpad")
        pads = pads.clone() if isinstance(pads, torch.Tensor) else torch.zeros(len(lengths), dtype=torch.int32)
        row = draw(st.integers(0, len(lengths) - 1))
        bad = draw(st.sampled_from([lengths[row] + 1, -1, 2**31 - 1, 2**40, -(2**40)]))
        a.values["cache_leftpad"] = pads.to(torch.int64 if abs(bad) >= 2**31 - 1 else pads.dtype)
        a.values["cache_leftpad"][row] = bad
        return "cache_leftpad", f"{bad} at {row}, cache_seqlens {lengths[row]}"

    return fault


def paged_kvcache_cases() -> st.SearchStrategy[Case]:
    return kvcache_cases(paged=True)


def _appended(before: tuple[torch.Tensor, torch.Tensor], values: dict[str, Any], rows: list[int],
              lengths: list[int], new_tokens: int, paged: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The caches after appending the new keys and values at positions lengths[b] ..."""
    caches = clone_arguments(before)
    if not new_tokens:
        return caches
    for cache, new in zip(caches, (values["k"], values["v"])):
        for b, row in enumerate(rows):
            for t in range(new_tokens):
                position = lengths[b] + t
                if paged:
                    block_size = cache.shape[1]
                    cache[int(values["block_table"][b, position // block_size]), position % block_size] = new[b, t]
                else:
                    cache[row, position] = new[b, t]
    return caches
