"""What each spawned rank of tests/test_distributed.py runs: every case, in one process group.

Spawning processes costs seconds, so one group per world size runs all the cases and
writes one verdict per case ("" = passed, else why not) to results_RANK.json; the test
file turns each verdict into a test. Every rank builds the full tensors from the same seed,
computes the single-process answer with fusedattn.attention in float64 on the reference
backend (the oracle), and compares its shard of it with ring_attention's.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=60)
BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = 2, 4, 2, 16
PLACEMENTS = ("contiguous", "zigzag")
# (ring dtype, backend): float64 on the reference, float32 on the default CPU dispatch; both
# backwards are FlashAttention's from the merged out and lse they are handed.
PRECISIONS = {"float64": (torch.float64, "reference"), "float32": (torch.float32, "auto")}


def _options(name: str, length: int, heads_q: int) -> dict[str, Any]:
    """attention() options of a numerics case; tensors drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(11)
    slopes = torch.rand(heads_q, generator=generator, dtype=torch.float64) * 0.5
    cases: dict[str, dict[str, Any]] = {
        "plain": {"return_lse": False},
        "causal": {"causal": True},
        "causal_top_left": {"causal": True, "causal_alignment": "top_left"},
        "causal_mha": {"causal": True},  # Hkv = Hq
        "scale_return_lse": {"scale": 0.3, "return_lse": True},
        "window": {"window": (5, 3)},
        "window_causal_skips_ranks": {"causal": True, "window": (3, None)},
        "softcap": {"causal": True, "softcap": 2.0},
        "alibi": {"causal": True, "alibi_slopes": slopes},
        "alibi_per_batch_window": {"alibi_slopes": torch.stack([slopes, slopes.flip(0)]), "window": (6, 6)},
        "key_lengths": {"key_lengths": torch.tensor([length - 3, 5])},
        "sinks": {"causal": True, "sinks": torch.randn(heads_q, generator=generator, dtype=torch.float64)},
        "dropout": {"causal": True, "dropout_p": 0.25, "dropout_seed": 1234},
        "dropout_drawn_seed": {"dropout_p": 0.2},
        "everything": {
            "causal": True,
            "window": (9, None),
            "softcap": 3.0,
            "alibi_slopes": slopes,
            "key_lengths": torch.tensor([length - 5, length // 2 + 1]),
            "sinks": torch.randn(heads_q, generator=generator, dtype=torch.float64),
            "dropout_p": 0.1,
            "dropout_seed": 77,
        },
    }
    return cases[name]


NUMERIC_CASES = (
    "plain", "causal", "causal_top_left", "causal_mha", "scale_return_lse", "window", "window_causal_skips_ranks",
    "softcap", "alibi", "alibi_per_batch_window", "key_lengths", "sinks", "dropout", "dropout_drawn_seed",
    "everything",
)  # fmt: skip
ERROR_CASES = (
    "shard_length_differs", "one_rank_bad_window", "attn_mask_refused", "q_k_lengths_differ", "zigzag_odd_length",
    "sinks_differ", "unknown_option", "unshard_shapes_differ", "shard_uneven_refused", "varlen_dropout_refused",
    "varlen_cu_seqlens_differ", "usable_after_errors",
)  # fmt: skip
# Cases run again with the K/V shard travelling in 3 pieces and the queries computed in 2
# parts (what long shards get by default): uneven pieces that straddle zigzag's chunks.
PIECES_CASES = ("causal", "window_causal_skips_ranks", "key_lengths", "everything")
PIECES = (3, 2)
VARLEN_CASES = ("causal", "plain", "causal_window_alibi_sinks_softcap", "gqa_return_lse")
OTHER_CASES = ("shard_unshard_roundtrip", "single_rank_group", "subgroups")


def case_names(world: int) -> list[str]:
    names = [f"{case}-{placement}-{precision}" for case in NUMERIC_CASES for placement in PLACEMENTS
             for precision in PRECISIONS]  # fmt: skip
    names += [f"{case}-{placement}-{precision}-pieces" for case in PIECES_CASES for placement in PLACEMENTS
              for precision in PRECISIONS]  # fmt: skip
    names += [f"varlen_{case}-{precision}" for case in VARLEN_CASES for precision in PRECISIONS]
    names += [f"error-{case}" for case in ERROR_CASES] + list(OTHER_CASES)
    if world == 2:
        names.append("llama_model")
    return names


# ---- comparisons ---------------------------------------------------------------------------
def _compare(name: str, actual: torch.Tensor, oracle: torch.Tensor, tolerance: float) -> str:
    """ "" when actual matches oracle: no NaN, -inf exactly where the oracle has it, and
    max |actual - oracle| <= tolerance * (1 + max |oracle|)."""
    if actual.shape != oracle.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    actual, oracle = actual.detach().cpu().double(), oracle.detach().cpu().double()
    if torch.isnan(actual).any():
        return f"{name}: NaN"
    if not torch.equal(torch.isneginf(actual), torch.isneginf(oracle)):
        return f"{name}: -inf at other places than the oracle's"
    finite = torch.isfinite(oracle)
    error = float((actual[finite] - oracle[finite]).abs().max()) if finite.any() else 0.0
    bound = tolerance * (1.0 + float(oracle[finite].abs().max()) if finite.any() else 1.0)
    return "" if error <= bound else f"{name}: max error {error:.3e} > {bound:.3e}"


def _numeric_case(
    case: str,
    placement: str,
    precision: str,
    rank: int,
    world: int,
    group=None,
    device: str = "cpu",
    pieces: tuple[int, int] | None = None,
) -> str:
    """pieces=(kv_pieces, row_pieces) forces how the ring cuts the shards (default: its choice)."""
    import fusedattn
    import fusedattn.distributed as fd

    dtype, backend = PRECISIONS[precision]
    length = 8 * world  # zigzag chunks of 4
    heads_kv = HEADS_Q if case == "causal_mha" else HEADS_KV
    options = _options(case, length, HEADS_Q)
    torch.manual_seed(5)
    q, do = (torch.randn(BATCH, HEADS_Q, length, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(BATCH, heads_kv, length, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    return_lse = options.pop("return_lse", True)
    drawn = "dropout_p" in options and "dropout_seed" not in options
    sinks = options.pop("sinks", None)

    # The oracle: one process, the full sequence, float64. A drawn dropout seed is what
    # rank 0's generator gives after manual_seed(99): the oracle draws it the same way.
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    full_sinks = None if sinks is None else sinks.clone().requires_grad_(True)
    torch.manual_seed(99)
    out, lse = fusedattn.attention(*full, sinks=full_sinks, return_lse=True, backend="reference", **options)
    out.backward(do)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return fd.shard_sequence(t, dim=2, group=group, placement=placement)

    cast = {
        n: (t.to(device, dtype if n != "key_lengths" else t.dtype) if isinstance(t, torch.Tensor) else t)
        for n, t in options.items()
    }
    mine = [shard(t).to(device, dtype).requires_grad_(True) for t in (q, k, v)]
    my_sinks = None if sinks is None else sinks.to(device, dtype).requires_grad_(True)
    torch.manual_seed(99 + 1000 * rank if drawn else 99)  # only rank 0's drawn seed may count
    ring_options = dict(cast, sinks=my_sinks, return_lse=return_lse, backend=backend)
    if pieces is None:
        result = fd.ring_attention(*mine, group=group, placement=placement, **ring_options)
    else:
        result = fd._ring_attention(*mine, group, placement, ring_options, True, *pieces)
    ring_out, ring_lse = result if return_lse else (result, None)
    ring_out.backward(shard(do).to(device, dtype))
    tolerance = 1e-11 if dtype == torch.float64 else 3e-5 if device == "cpu" else 2e-4
    problems = [_compare("out", ring_out, shard(out), tolerance)]
    if ring_lse is not None:
        problems.append(_compare("lse", ring_lse, shard(lse), tolerance))
    for name, tensor, reference in zip(("dq", "dk", "dv"), mine, full):
        problems.append(_compare(name, tensor.grad, shard(reference.grad), tolerance))
    if sinks is not None:
        # Per-rank parts of a replicated parameter's gradient: summed, the whole one.
        grad_sinks = my_sinks.grad.clone()  # on the device: NCCL reduces GPU tensors
        dist.all_reduce(grad_sinks, group=group)
        problems.append(_compare("dsinks", grad_sinks.cpu(), full_sinks.grad, tolerance * 4))
    return "; ".join(p for p in problems if p)


def _varlen_case(case: str, precision: str, rank: int, world: int) -> str:
    import fusedattn
    import fusedattn.distributed as fd

    dtype, backend = PRECISIONS[precision]
    per_rank = 12
    total = per_rank * world
    generator = torch.Generator().manual_seed(21)
    # Sequences that start and end anywhere (spanning ranks).
    cuts = sorted(torch.randperm(total - 1, generator=generator)[: world + 1].add(1).tolist())
    cu_seqlens = torch.tensor([0, *cuts, total], dtype=torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    options: dict[str, Any] = {
        "causal": {"causal": True},
        "plain": {},
        "causal_window_alibi_sinks_softcap": {
            "causal": True, "window": (4, None), "softcap": 2.0,
            "alibi_slopes": torch.rand(len(cu_seqlens) - 1, HEADS_Q, generator=generator, dtype=torch.float64),
            "sinks": torch.randn(HEADS_Q, generator=generator, dtype=torch.float64),
        },
        "gqa_return_lse": {"causal": True, "scale": 0.2},
    }[case]  # fmt: skip
    torch.manual_seed(6)
    q, do = (torch.randn(total, HEADS_Q, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, HEADS_KV, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fusedattn.attention_varlen(
        *full, cu_seqlens, cu_seqlens, longest, longest, return_lse=True, backend="reference", **options
    )
    out.backward(do)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    shards = [t[mine].to(dtype).requires_grad_(True) for t in (q, k, v)]
    cast = {n: t.to(dtype) if isinstance(t, torch.Tensor) else t for n, t in options.items()}
    ring_out, ring_lse = fd.varlen_attention_allgather(
        *shards, cu_seqlens, longest, return_lse=True, backend=backend, **cast
    )
    ring_out.backward(do[mine].to(dtype))
    tolerance = 1e-11 if dtype == torch.float64 else 3e-5
    problems = [_compare("out", ring_out, out[mine], tolerance), _compare("lse", ring_lse, lse[:, mine], tolerance)]
    for name, tensor, reference in zip(("dq", "dk", "dv"), shards, full):
        problems.append(_compare(name, tensor.grad, reference.grad[mine], tolerance))
    return "; ".join(p for p in problems if p)


# ---- errors: the same exception on every rank, never a hang -------------------------------------
def _same_error(run: Callable[[], Any], kind: type[Exception], fragment: str, group=None) -> str:
    try:
        run()
        message = None
    except Exception as error:  # noqa: BLE001
        message = f"{type(error).__name__}: {error}"
    messages: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    if message is None:
        return "no error raised"
    if not message.startswith(kind.__name__ + ":") or fragment not in message:
        return f"expected {kind.__name__} mentioning {fragment!r}, got {message}"
    if len(set(messages)) != 1:
        return f"ranks raised different errors: {messages}"
    return ""


def _error_case(case: str, rank: int, world: int) -> str:
    import fusedattn.distributed as fd

    last = world - 1
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    ring = fd.ring_attention
    if case == "shard_length_differs":
        longer = [torch.randn(1, 2, 10, 8) for _ in range(3)] if rank == last else (q, k, v)
        return _same_error(lambda: ring(*longer, causal=True), ValueError, "disagree on shard length")
    if case == "one_rank_bad_window":
        window = (-2, 0) if rank == last else (2, 0)
        return _same_error(lambda: ring(q, k, v, window=window), ValueError, f"rank {last} of {world} refused")
    if case == "attn_mask_refused":
        mask = torch.ones(8, 8, dtype=torch.bool)
        return _same_error(lambda: ring(q, k, v, attn_mask=mask), NotImplementedError, "attn_mask")
    if case == "q_k_lengths_differ":
        return _same_error(lambda: ring(q, k[:, :, :4], v[:, :, :4]), ValueError, "same shard length")
    if case == "zigzag_odd_length":
        odd = [t[:, :, :7] for t in (q, k, v)]
        return _same_error(lambda: ring(*odd, placement="zigzag"), ValueError, "even length")
    if case == "sinks_differ":
        sinks = torch.full((2,), float(rank))
        return _same_error(lambda: ring(q, k, v, sinks=sinks), ValueError, "sinks")
    if case == "unknown_option":
        return _same_error(lambda: ring(q, k, v, casual=True), TypeError, "casual")
    if case == "unshard_shapes_differ":
        x = torch.randn(2, 4 + (rank == 0), 3)
        return _same_error(lambda: fd.unshard_sequence(x, dim=1), ValueError, "disagree on x.shape[1]")
    if case == "shard_uneven_refused":
        x = torch.randn(2, 2 * world + 1)
        return _same_error(lambda: fd.shard_sequence(x, dim=1, placement="zigzag"), ValueError, "not a multiple")
    if case.startswith("varlen_"):
        tokens = [torch.randn(4, 2, 8) for _ in range(3)]
        if case == "varlen_dropout_refused":
            cu = torch.tensor([0, 4 * world], dtype=torch.int32)
            run = lambda: fd.varlen_attention_allgather(*tokens, cu, 4 * world, dropout_p=0.1)  # noqa: E731
            return _same_error(run, NotImplementedError, "dropout_p")
        cu = torch.tensor([0, 1 + (rank == last), 4 * world], dtype=torch.int32)
        run = lambda: fd.varlen_attention_allgather(*tokens, cu, 4 * world, causal=True)  # noqa: E731
        return _same_error(run, ValueError, "disagree on cu_seqlens")
    if case == "usable_after_errors":
        out = ring(q, k, v, causal=True)
        return "" if out.shape == q.shape and torch.isfinite(out).all() else "bad output after the errors"
    raise KeyError(case)


# ---- sharding helpers, groups ------------------------------------------------------------------
def _roundtrip(rank: int, world: int) -> str:
    import fusedattn.distributed as fd

    problems = []
    for placement in PLACEMENTS:
        torch.manual_seed(3)
        x = torch.randn(2, 4 * world, 3, dtype=torch.float64)
        shard = fd.shard_sequence(x, dim=1, placement=placement).requires_grad_(True)
        full = fd.unshard_sequence(shard, dim=1, placement=placement)
        if not torch.equal(full, x):
            problems.append(f"{placement}: unshard(shard(x)) != x")
        # Every rank's loss is (full * weight).sum(): the gradient of their sum is world * weight.
        weight = torch.randn(x.shape, dtype=torch.float64)
        full.backward(weight)
        expected = world * fd.shard_sequence(weight, dim=1, placement=placement)
        if not torch.allclose(shard.grad, expected):
            problems.append(f"{placement}: unshard's backward is not the summed gradient")
    positions = fd.shard_sequence(torch.arange(4 * world)[None], dim=1, placement="zigzag")
    chunk = 2
    expected = list(range(rank * chunk, rank * chunk + chunk)) + list(
        range((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)
    )
    if positions[0].tolist() != expected:
        problems.append(f"zigzag positions {positions[0].tolist()} != {expected}")
    return "; ".join(problems)


def _groups_case(case: str, rank: int, world: int) -> str:
    # new_group is collective over the world: every rank creates every group.
    if case == "single_rank_group":
        singles = [dist.new_group([r]) for r in range(world)]
        problems = [_numeric_case("everything", p, "float32", 0, 1, singles[rank]) for p in PLACEMENTS]
        return "; ".join(p for p in problems if p)
    # Two interleaved groups (global ranks 0, 2, ... and 1, 3, ...): peers are global ranks.
    members = [list(range(start, world, 2)) for start in (0, 1)]
    groups = [dist.new_group(m) for m in members]
    mine = groups[rank % 2]
    size = len(members[rank % 2])
    problems = [_numeric_case("causal", "zigzag", "float64", dist.get_rank(mine), size, mine)]
    import fusedattn.distributed as fd

    other = groups[1 - rank % 2]
    q = torch.randn(1, 1, 4, 4)
    try:
        fd.ring_attention(q, q, q, group=other)
        problems.append("a group this rank is not in was accepted")
    except ValueError as error:
        if "not a member" not in str(error):
            problems.append(f"wrong error for a foreign group: {error}")
    return "; ".join(p for p in problems if p)


def _run_case(name: str, rank: int, world: int) -> str:
    if name.startswith("error-"):
        return _error_case(name[len("error-") :], rank, world)
    if name == "shard_unshard_roundtrip":
        return _roundtrip(rank, world)
    if name in ("single_rank_group", "subgroups"):
        return _groups_case(name, rank, world)
    if name == "llama_model":
        from distributed_model import llama_case

        return llama_case(rank, world)
    if name.startswith("varlen_"):
        case, precision = name[len("varlen_") :].split("-")
        return _varlen_case(case, precision, rank, world)
    case, placement, precision, *variant = name.split("-")
    return _numeric_case(case, placement, precision, rank, world, pieces=PIECES if variant == ["pieces"] else None)


def worker(rank: int, world: int, directory: str) -> None:
    """Entry point of each spawned rank: run every case, write results_RANK.json."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world, timeout=TIMEOUT
    )
    results = {}
    try:
        for name in case_names(world):
            try:
                results[name] = _run_case(name, rank, world)
            except Exception:  # noqa: BLE001  (a verdict, not a crash of the whole group)
                results[name] = traceback.format_exc(limit=6)
            dist.barrier()  # a case that desynchronized the ranks shows up here, not later
    finally:
        with open(os.path.join(directory, f"results_{rank}.json"), "w") as file:
            json.dump(results, file)
        dist.destroy_process_group()


GPU_CASES = tuple(f"{case}-{placement}-float32" for case in ("causal", "everything") for placement in PLACEMENTS)


def gpu_worker(rank: int, world: int, directory: str) -> None:
    """Like worker, on GPU rank with NCCL (one rank per GPU; one GPU runs the single-rank path)."""
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{directory}/store", rank=rank, world_size=world, timeout=TIMEOUT
    )
    results = {}
    try:
        for name in GPU_CASES:
            case, placement, precision = name.split("-")
            try:
                results[name] = _numeric_case(case, placement, precision, rank, world, device=f"cuda:{rank}")
            except Exception:  # noqa: BLE001
                results[name] = traceback.format_exc(limit=6)
    finally:
        with open(os.path.join(directory, f"results_{rank}.json"), "w") as file:
            json.dump(results, file)
        dist.destroy_process_group()


__all__ = ["GPU_CASES", "case_names", "gpu_worker", "worker"]
