"""Measuring one call: FLOP counts, latency (median and interquartile range) and peak memory.

FLOPs follow FlashAttention's benchmark convention with the work that is actually
unmasked: the forward costs 2 * (D + Dv) FLOPs per (query, key) pair and head
(Q K^T and P V; 4 * D when Dv = D), summed over the pairs that causal masking, the
window and key padding leave visible. For a dense non-causal problem that is
4 * B * H * Sq * Sk * D; for causal Sq = Sk it is exactly S (S + 1) / 2 pairs, FlashAttention's
"halved" up to a factor (S + 1) / S. The backward counts 2.5 times the forward,
forward+backward 3.5 times.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .cases import Case

MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


# ---- FLOPs -------------------------------------------------------------------------
def visible_pair_count(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: tuple[int | None, int | None] | None,
    key_length: int | None = None,
) -> int:
    """Number of (query i, key j) pairs visible in one (Sq, Sk) problem (bottom-right aligned).

    Query i sits at key position p = i + Sk - Sq; it sees keys lo..hi with lo = max(0, p - left),
    hi = min(Sk - 1, key_length - 1, p if causal, p + right). Computed per row in closed form.
    """
    offset = seqlen_k - seqlen_q
    position = torch.arange(seqlen_q, dtype=torch.int64) + offset
    low = torch.zeros_like(position)
    high = torch.full_like(position, (seqlen_k if key_length is None else key_length) - 1)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        high = torch.minimum(high, position + right)
    if left is not None:
        low = torch.maximum(low, position - left)
    return int((high - low + 1).clamp(min=0).sum())


def unmasked_pairs(case: Case) -> int:
    """Visible (query, key) pairs of a whole case, summed over the batch (or packed sequences)."""
    if case.varlen_seqlens is not None:
        return sum(
            visible_pair_count(length, length, causal=case.causal, window=case.window) for length in case.varlen_seqlens
        )
    return sum(
        visible_pair_count(
            case.seqlen_q, case.seqlen_k, causal=case.causal, window=case.window, key_length=case.key_length(b)
        )
        for b in range(case.batch)
    )


def forward_flops(case: Case) -> int:
    """FLOPs of one forward: 2 * (D + Dv) per visible pair and query head."""
    return 2 * case.heads_q * (case.head_dim + case.head_dim_v) * unmasked_pairs(case)


def case_flops(case: Case) -> float:
    """FLOPs of one call in the case's mode (forward x 1, backward x 2.5, both x 3.5)."""
    return forward_flops(case) * MODE_FLOP_FACTOR[case.mode]


def minimum_bytes(case: Case) -> int:
    """Bytes a forward must at least move: read q, k, v once and write out (memory-bound decode)."""
    element = torch.empty((), dtype=case.torch_dtype).element_size()
    tokens_q = case.query_tokens
    tokens_k = sum(case.varlen_seqlens) if case.varlen_seqlens is not None else case.batch * case.seqlen_k
    elements = tokens_q * case.heads_q * (case.head_dim + case.head_dim_v)
    elements += tokens_k * case.heads_kv * (case.head_dim + case.head_dim_v)
    return elements * element


# ---- timing ------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Statistics of repeated timed calls, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    warmup_calls: int
    samples_ms: tuple[float, ...]
    rounds: int = 1

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["samples_ms"] = list(self.samples_ms)
        return data


@dataclass(frozen=True)
class TimingSettings:
    """warmup_s: seconds of untimed calls (at least one); then calls are timed until min_time_s
    has passed and at least min_repeats were made, at most max_repeats.

    rounds: a case's providers are timed in this many alternating rounds (bench/run.py), each
    a block of about 1/rounds of their calls, so that a burst of load on a shared machine
    falls on every provider of the case rather than on one."""

    warmup_s: float = 0.1
    min_time_s: float = 0.2
    min_repeats: int = 3
    max_repeats: int = 100
    flush_l2: bool = True
    rounds: int = 1


def summarize(samples_ms: list[float], warmup_calls: int, rounds: int = 1) -> Timing:
    """Median, quartiles, min and mean of timed samples (milliseconds)."""
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(
        median_ms=statistics.median(ordered),
        q1_ms=q1,
        q3_ms=q3,
        iqr_ms=q3 - q1,
        min_ms=ordered[0],
        mean_ms=statistics.fmean(ordered),
        repeats=len(ordered),
        warmup_calls=warmup_calls,
        samples_ms=tuple(samples_ms),
        rounds=rounds,
    )


class _L2Flusher:
    """Overwrites a buffer larger than any GPU's L2 cache, so each timed call starts cold."""

    def __init__(self, device: torch.device, megabytes: int = 256) -> None:
        self.buffer = torch.empty(megabytes * 2**20 // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def warm_up(
    fn: Callable[[], object], device: torch.device, settings: TimingSettings, warm_call_s: float | None = None
) -> tuple[int, int, float]:
    """Untimed calls of fn for settings.warmup_s (at least one).

    warm_call_s: the duration of a call of fn already made (the peak memory measurement); it
    counts towards the warm-up, which then needs no further call.

    Returns (warm-up calls, timed calls to make, seconds per call estimated).
    """
    warmup_calls = 0 if warm_call_s is None else 1
    spent = 0.0 if warm_call_s is None else warm_call_s
    start = time.perf_counter()
    while warmup_calls == 0 or spent + time.perf_counter() - start < settings.warmup_s:
        fn()
        warmup_calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    estimate_s = (spent + time.perf_counter() - start) / warmup_calls
    repeats = int(settings.min_time_s / max(estimate_s, 1e-6)) + 1
    return warmup_calls, max(settings.min_repeats, min(settings.max_repeats, repeats)), estimate_s


def timed_samples(fn: Callable[[], object], device: torch.device, settings: TimingSettings, count: int) -> list[float]:
    """count timed calls of fn, in milliseconds: CUDA events (L2 flushed before each call) on
    GPU, time.perf_counter on CPU."""
    if device.type == "cuda":
        flush = _L2Flusher(device) if settings.flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for begin, end in events:
            if flush is not None:
                flush()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) for begin, end in events]
    samples: list[float] = []
    for _ in range(count):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return samples


# ---- peak memory -------------------------------------------------------------------
_LIBC: ctypes.CDLL | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# During a peak measurement every block above 128 KiB is an mmap that free() returns to the
# OS, so resident memory follows live tensors instead of glibc's cached heap. Timed calls
# run with the thresholds glibc's adaptive mode reaches in a long-running process (mmap
# 32 MiB, trim twice that): a fixed 128 KiB would make every output above it fresh memory,
# faulted page by page inside each timed call, for every provider alike.
_MEASURE_THRESHOLDS = {_M_MMAP_THRESHOLD: 128 * 1024, _M_TRIM_THRESHOLD: 128 * 1024}
_TIMING_THRESHOLDS = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            return None
    return _LIBC


def _set_malloc_thresholds(thresholds: dict[int, int]) -> None:
    for option, value in thresholds.items():
        _LIBC.mallopt(option, value)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def cpu_peak_supported() -> tuple[bool, str]:
    """Whether the process's resident high-water mark can be reset (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_bytes("VmHWM")
    except OSError as error:
        return False, f"cannot reset the resident high-water mark: {error}"
    return _libc() is not None, "" if _libc() is not None else "libc.so.6 not found"


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak memory one call of fn adds above what is allocated before it, in bytes, and the method.

    GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) minus its resident set just before
    the call, with malloc's mmap threshold fixed at 128 KiB for the call so freed tensors leave
    the resident set; afterwards the thresholds of glibc's adapted mode (_TIMING_THRESHOLDS).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return max(0, peak), "torch.cuda.max_memory_allocated"
    if device.type != "cpu":
        return None, f"not measured on {device.type}"
    supported, reason = cpu_peak_supported()
    if not supported:
        return None, reason
    libc = _libc()
    _set_malloc_thresholds(_MEASURE_THRESHOLDS)
    try:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _status_bytes("VmRSS")
        result = fn()
        peak = _status_bytes("VmHWM") - before
        del result
    finally:
        _set_malloc_thresholds(_TIMING_THRESHOLDS)
    return max(0, peak), "peak resident set (VmHWM reset via /proc/self/clear_refs)"


# ---- out of memory -----------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, MemoryError, or an allocator's RuntimeError saying so."""
    if isinstance(error, MemoryError):
        return True
    out_of_memory_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if out_of_memory_type is not None and isinstance(error, out_of_memory_type):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached GPU memory; collect=True also runs the (slow: ~0.4 s) cyclic garbage
    collector, worth it only after an out-of-memory error."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
