"""Running cases on providers: correctness check, timing, peak memory, one result per pair.

Every (case, provider) pair becomes one result dict (docs/benchmarks.md, "results") whose
status is "ok", "wrong" (timed, but its output failed the check against the float64
reference), "skipped" (with the reason), "oom" or "error". Nothing a provider does stops
the run.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.reference import reference_attention
from ..testing import check_tensor
from ..validation import validate_attention
from .cases import Case
from .measure import (
    TimingSettings,
    case_flops,
    is_out_of_memory,
    measure_peak_memory,
    minimum_bytes,
    release_memory,
    summarize,
    timed_samples,
    warm_up,
)
from .providers import BASELINE, CaseInputs, Prepared, Provider, Skip, make_inputs

STATUSES = ("ok", "wrong", "skipped", "oom", "error")
NO_KERNEL_MESSAGE = "No available kernel"  # torch SDPA's error when the forced backend cannot run


@dataclass(frozen=True)
class BenchSettings:
    """How a run measures. check_rows: query rows per checked sequence (see Oracle)."""

    device: str = "cpu"
    timing: TimingSettings = field(default_factory=TimingSettings)
    check: bool = True
    check_rows: int = 64
    measure_memory: bool = True
    seed: int = 0


# ---- the correctness check ------------------------------------------------------------
class Oracle:
    """The float64 reference for a slice of a case, and the same in the input dtype.

    The check covers the last check_rows query rows of the first and last batch element
    (or packed sequence). With bottom-right alignment those rows keep their key positions
    when the others are dropped, and with the output gradient zero outside them, dq of the
    rows and the whole dk, dv of those sequences are exactly the sliced problem's gradients.
    """

    def __init__(self, inputs: CaseInputs, rows: int, generator: torch.Generator) -> None:
        case = inputs.case
        self.inputs = inputs
        self.indices = sorted({0, case.batch - 1})
        self.rows = [min(rows, self._length(index)) for index in self.indices]
        self.expected: dict[str, list[torch.Tensor]] = {}
        self.lowprec: dict[str, list[torch.Tensor]] = {}
        self.grad_out: list[torch.Tensor] = []
        for index, count in zip(self.indices, self.rows):
            q = self.view(inputs.q, index)[:, :, -count:]
            k, v = self.view(inputs.k, index), self.view(inputs.v, index)
            options = inputs.fusedattn_options()
            if inputs.attn_mask is not None:
                mask = inputs.attn_mask
                mask = mask[index : index + 1] if mask.shape[0] > 1 else mask
                options["attn_mask"] = mask[:, :, -count:] if mask.shape[2] > 1 else mask
            call = validate_attention(q, k, v, **options)
            grad_out = None
            if case.needs_grad:
                shape = (1, case.heads_q, count, case.head_dim_v)
                grad_out = torch.randn(shape, generator=generator, dtype=torch.float32).to(q.device, q.dtype)
                self.grad_out.append(grad_out)
            for target, dtype in ((self.expected, torch.float64), (self.lowprec, case.torch_dtype)):
                out, _, grads = reference_attention(call, dtype, grad_out)
                target.setdefault("out", []).append(out)
                if grads is not None:
                    for name, gradient in zip(("dq", "dk", "dv"), grads):
                        target.setdefault(name, []).append(gradient)

    def _length(self, index: int) -> int:
        case = self.inputs.case
        return case.seqlen_q if case.varlen_seqlens is None else case.varlen_seqlens[index]

    def view(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """Batch element / packed sequence index of a case-layout tensor as (1, H, S, X)."""
        cu_seqlens = self.inputs.cu_seqlens
        if cu_seqlens is None:
            return tensor[index : index + 1]
        start, end = int(cu_seqlens[index]), int(cu_seqlens[index + 1])
        return tensor[start:end].transpose(0, 1)[None]

    def grad_output(self, out: torch.Tensor) -> torch.Tensor:
        """The output gradient used by the check: the oracle's on the checked rows, 0 elsewhere."""
        grad = torch.zeros_like(out)
        for index, count, values in zip(self.indices, self.rows, self.grad_out):
            self.view(grad, index)[:, :, -count:] = values
        return grad

    def compare(self, out: torch.Tensor, grads: tuple[torch.Tensor, ...] | None) -> dict[str, Any]:
        """Check results (testing.check_tensor per tensor) of a provider's out and (dq, dk, dv)."""
        actual: dict[str, list[torch.Tensor]] = {"out": []}
        for index, count in zip(self.indices, self.rows):
            actual["out"].append(self.view(out, index)[:, :, -count:])
            if grads is not None:
                dq, dk, dv = grads
                actual.setdefault("dq", []).append(self.view(dq, index)[:, :, -count:])
                actual.setdefault("dk", []).append(self.view(dk, index))
                actual.setdefault("dv", []).append(self.view(dv, index))
        checks = []
        for name, pieces in actual.items():

            def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
                return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])

            checks.append(
                check_tensor(name, flat(pieces), flat(self.expected[name]), flat(self.lowprec[name]), self.dtype)
            )
        failed = [c for c in checks if not c.passed]
        return {
            "passed": not failed,
            "reason": "; ".join(f"{c.name}: {c.reason}" for c in failed),
            "tensors": [c.as_dict() for c in checks],
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs.case.torch_dtype


def _check_runs(prepared: Prepared, needs_grad: bool) -> None:
    """One untimed call (forward, and backward when needed) without a comparison."""
    with torch.set_grad_enabled(needs_grad):
        out = prepared.forward()
        if needs_grad:
            torch.autograd.grad(out, prepared.leaves, torch.ones_like(out), allow_unused=True)


def _check(prepared: Prepared, oracle: Oracle, needs_grad: bool) -> dict[str, Any]:
    with torch.set_grad_enabled(needs_grad):
        out = prepared.forward()
        grads = None
        if needs_grad:
            raw = torch.autograd.grad(out, prepared.leaves, oracle.grad_output(out), allow_unused=True)
            # An input the output does not depend on has gradient zero (and then fails the check).
            raw = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(raw, prepared.leaves))
            grads = prepared.canonical_grads(raw)
    return oracle.compare(out, grads)


# ---- timing one pair -------------------------------------------------------------------
def _timed_function(prepared: Prepared, case: Case, generator: torch.Generator) -> Callable[[], object]:
    """The call timed for the case's mode: fwd under no_grad, bwd alone (one retained graph),
    or fwd+bwd."""
    if case.mode == "fwd":

        def forward() -> object:
            with torch.no_grad():
                return prepared.forward()

        return forward
    with torch.enable_grad():
        out = prepared.forward()
    grad_out = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32).to(out.dtype)
    if case.mode == "bwd":
        return lambda: torch.autograd.grad(out, prepared.leaves, grad_out, retain_graph=True, allow_unused=True)

    def forward_backward() -> object:
        with torch.enable_grad():
            return torch.autograd.grad(prepared.forward(), prepared.leaves, grad_out, allow_unused=True)

    return forward_backward


def prepare_timed_call(
    case: Case, provider: Provider, inputs: CaseInputs, check_rows: int = 64, seed: int = 0
) -> tuple[Callable[[], object], Prepared, dict[str, Any]]:
    """For external timers (the pytest-benchmark suite): the checked, ready-to-time call.

    Returns (timed call for case.mode, the prepared call whose context() must be entered
    around timing, the check result). Raises Skip when the provider cannot run the case.
    """
    available, reason = provider.availability(inputs.device)
    if not available:
        raise Skip(reason)
    prepared = provider.prepare(inputs)
    with prepared.context():
        oracle = Oracle(inputs, check_rows, torch.Generator().manual_seed(seed + 2))
        check = _check(prepared, oracle, case.needs_grad)
        timed = _timed_function(prepared, case, torch.Generator(device=inputs.device).manual_seed(seed + 1))
    return timed, prepared, check


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# A block's first call is left untimed when calls are this short: the block before it was
# another provider's, whose data (its outputs, scratch) then fills the caches.
UNTIMED_FIRST_CALL_BELOW_S = 0.02


class PairRun:
    """One (case, provider) pair. Construction checks the provider's output and warms it up;
    time_block() adds timed calls; finish() gives the result dict. Nothing it runs raises:
    a failure becomes the result's status."""

    def __init__(
        self,
        case: Case,
        provider: Provider,
        inputs: CaseInputs,
        oracle: Callable[[], Oracle] | None,
        settings: BenchSettings,
    ) -> None:
        self.device = inputs.device
        self.settings = settings
        self.case = case
        self.result = _empty_result(case, provider)
        self.samples: list[float] = []
        self.timed: Callable[[], object] | None = None
        self.prepared: Prepared | None = None
        self.repeats = 0
        self.seconds_per_call = 0.0
        self.warmup_calls = 0
        self.blocks = 0
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(settings.seed + 1)
        caught: list[warnings.WarningMessage] = []
        try:
            available, reason = provider.availability(self.device)
            if not available:
                raise Skip(reason)
            self.prepared = provider.prepare(inputs)
            self.result["note"] = self.prepared.note
            self.result["compile_s"] = self.prepared.compile_s
            with self.prepared.context():
                with warnings.catch_warnings(record=True) as caught:
                    # SDPA explains in warnings why a forced backend cannot run; keep them as the reason.
                    warnings.simplefilter("always")
                    if oracle is not None:
                        self.result["check"] = _check(self.prepared, oracle(), case.needs_grad)
                    else:
                        _check_runs(self.prepared, case.needs_grad)
                    check = self.result["check"]
                    if check is not None and not check["passed"]:
                        self.result["status"] = "wrong"
                        self.result["reason"] = f"output differs from the float64 reference: {check['reason']}"
                timed = _timed_function(self.prepared, case, generator)
                warm_call_s = None
                if settings.measure_memory:
                    # The memory measurement is the first warm-up call (after the check's call, so
                    # one-time allocations are already done).
                    began = time.perf_counter()
                    peak, method = measure_peak_memory(timed, self.device)
                    warm_call_s = time.perf_counter() - began
                    self.result["peak_memory_bytes"], self.result["memory_method"] = peak, method
                self.warmup_calls, self.repeats, self.seconds_per_call = warm_up(
                    timed, self.device, settings.timing, warm_call_s
                )
            self.timed = timed
        except Exception as error:
            self._fail(error, caught)
        self.result["wall_s"] = time.perf_counter() - started

    def _fail(self, error: BaseException, caught: list[warnings.WarningMessage]) -> None:
        if isinstance(error, Skip):
            self.result["status"], self.result["reason"] = "skipped", str(error)
        elif NO_KERNEL_MESSAGE in str(error):
            explanations = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught))
            self.result["status"], self.result["reason"] = "skipped", (explanations or _first_line(error))[:500]
        elif is_out_of_memory(error):
            self.result["status"], self.result["reason"] = "oom", _first_line(error)
        else:
            self.result["status"], self.result["reason"] = "error", _first_line(error)
            self.result["note"] = traceback.format_exc(limit=3)[-2000:]
        self.timed = self.prepared = None
        self.samples = []
        release_memory(self.device, collect=self.result["status"] in ("oom", "error"))

    def time_block(self, count: int) -> None:
        """count more timed calls (after an untimed one when calls are short and this is not
        the first block)."""
        if self.timed is None or self.prepared is None:
            return
        started = time.perf_counter()
        try:
            with self.prepared.context():
                if self.blocks > 0 and self.seconds_per_call < UNTIMED_FIRST_CALL_BELOW_S:
                    self.timed()
                    self.warmup_calls += 1
                self.samples += timed_samples(self.timed, self.device, self.settings.timing, count)
            self.blocks += 1
        except Exception as error:
            self._fail(error, [])
        self.result["wall_s"] += time.perf_counter() - started

    def finish(self) -> dict[str, Any]:
        """The result dict (docs/benchmarks.md, "results"); releases the pair's tensors."""
        if self.timed is not None and self.samples:
            timing = summarize(self.samples, self.warmup_calls, self.blocks)
            seconds = timing.median_ms / 1e3
            self.result["timing"] = timing.as_dict()
            self.result["tflops"] = self.result["flops"] / seconds / 1e12
            self.result["tokens_per_s"] = self.case.query_tokens / seconds
            if self.case.mode == "fwd":
                self.result["gb_per_s"] = minimum_bytes(self.case) / seconds / 1e9
        self.timed = self.prepared = None
        release_memory(self.device)
        return self.result


def run_pair(
    case: Case,
    provider: Provider,
    inputs: CaseInputs,
    oracle: Callable[[], Oracle] | None,
    settings: BenchSettings,
) -> dict[str, Any]:
    """One result dict for (case, provider), its calls timed in one block. oracle builds
    (once) the check's reference."""
    pair = PairRun(case, provider, inputs, oracle, settings)
    pair.time_block(pair.repeats)
    return pair.finish()


def run_interleaved(
    case: Case,
    providers: list[Provider],
    inputs: CaseInputs,
    oracle: Callable[[], Oracle] | None,
    settings: BenchSettings,
) -> list[dict[str, Any]]:
    """The case's pairs, checked and warmed up one by one, then timed in settings.timing.rounds
    rounds, every other round in reverse provider order (A B, B A, A B, ...), each round a
    block of ceil(repeats / rounds) calls per provider; the median is over all blocks' calls."""
    pairs = [PairRun(case, provider, inputs, oracle, settings) for provider in providers]
    rounds = settings.timing.rounds
    for round_index in range(rounds):
        for pair in pairs if round_index % 2 == 0 else reversed(pairs):
            pair.time_block(-(-pair.repeats // rounds))
    return [pair.finish() for pair in pairs]


def add_speedups(results: list[dict[str, Any]]) -> None:
    """speedup_vs_sdpa = SDPA's median time / the provider's, for ok results of cases SDPA ran ok."""
    baseline = {
        r["case_id"]: r["timing"]["median_ms"] for r in results if r["provider"] == BASELINE and r["status"] == "ok"
    }
    for result in results:
        base = baseline.get(result["case_id"])
        if result["status"] == "ok" and base is not None:
            result["speedup_vs_sdpa"] = base / result["timing"]["median_ms"]


ProgressCallback = Callable[[int, int, Case, Provider, dict[str, Any] | None], None]


def run_benchmark(
    cases: list[Case],
    providers: list[Provider],
    settings: BenchSettings,
    progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Results of every (case, provider) pair, in case order. progress(done, total, case,
    provider, result) is called before (result None) and after each pair."""
    device = torch.device(settings.device)
    total = len(cases) * len(providers)
    results: list[dict[str, Any]] = []
    done = 0
    for case in cases:
        try:
            inputs = make_inputs(case, device, seed=settings.seed)
        except Exception as error:
            status = "oom" if is_out_of_memory(error) else "error"
            for provider in providers:
                results.append(_failed_inputs(case, provider, status, _first_line(error)))
                done += 1
            release_memory(device, collect=True)
            continue
        cache: list[Oracle] = []

        def oracle(inputs: CaseInputs = inputs, cache: list[Oracle] = cache) -> Oracle:
            if not cache:
                cache.append(Oracle(inputs, settings.check_rows, torch.Generator().manual_seed(settings.seed + 2)))
            return cache[0]

        checked = oracle if settings.check else None
        if settings.timing.rounds > 1:
            if progress is not None:
                progress(done, total, case, providers[0], None)
            for provider, result in zip(providers, run_interleaved(case, providers, inputs, checked, settings)):
                results.append(result)
                done += 1
                if progress is not None:
                    progress(done, total, case, provider, result)
        else:
            for provider in providers:
                if progress is not None:
                    progress(done, total, case, provider, None)
                results.append(run_pair(case, provider, inputs, checked, settings))
                done += 1
                if progress is not None:
                    progress(done, total, case, provider, results[-1])
        del inputs, cache
        release_memory(device)
    add_speedups(results)
    return results


def _empty_result(case: Case, provider: Provider) -> dict[str, Any]:
    """A result with every field of the schema, before anything ran."""
    return {
        "case_id": case.case_id,
        "provider": provider.name,
        "status": "ok",
        "reason": "",
        "note": "",
        "case": case.as_dict(),
        "flops": case_flops(case),
        "timing": None,
        "tflops": None,
        "tokens_per_s": None,
        "gb_per_s": None,
        "peak_memory_bytes": None,
        "memory_method": "",
        "check": None,
        "speedup_vs_sdpa": None,
        "wall_s": 0.0,
        "compile_s": None,
    }


def _failed_inputs(case: Case, provider: Provider, status: str, reason: str) -> dict[str, Any]:
    result = _empty_result(case, provider)
    result["status"], result["reason"] = status, f"creating the inputs failed: {reason}"
    return result
