"""Running the grid: every case against every eligible backend, checked by
fusedattn.testing.check_backend (the one comparison rule of the project)."""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import environment as settings
from ..backends.base import Backend
from ..dispatch import import_errors, refusal, registry
from ..fingerprint import cpu_model, git_commit
from ..testing import check_backend, validated_call
from .cases import Case, SizeProfile, dtype_name, make_inputs, profile_for_device, select_cases
from .cases import case_index as parse_case_id
from .cases import make_case as build_case
from .isolation import run_isolated
from .outcomes import ERROR, FAIL, PASS, SKIP, Outcome

DEFAULT_CASES = 60

# Limits of a backend on a device that its capabilities cannot express yet, skipped with
# the reason: (backend, device type, dtype, reason).
KNOWN_LIMITATIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "triton",
        "cpu",
        "bf16",
        "the Triton interpreter (TRITON_INTERPRET=1) does not support tl.dot on bfloat16 (triton-lang/triton #11584)",
    ),
)


@dataclass
class ParityResult:
    """Everything one parity run found. exit_code is the CLI's: 0 only when at least one
    check ran and every check passed."""

    outcomes: list[Outcome]
    options: dict[str, Any]
    environment: dict[str, Any]
    not_run: dict[str, str]  # backends left out of the run, with the reason
    seconds: float

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def checked(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != SKIP]

    @property
    def passed(self) -> bool:
        return bool(self.checked) and not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def counts(self) -> dict[str, int]:
        counts = {PASS: 0, FAIL: 0, ERROR: 0, SKIP: 0}
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return counts

    def worst_first(self) -> list[Outcome]:
        return sorted(self.checked, key=lambda o: (not o.failed, -o.severity, o.case.index, o.backend))

    def reproducer(self, outcome: Outcome) -> str:
        """The one command line that reruns exactly this case on this backend."""
        words = ["fusedattn", "parity", "--case", outcome.case.id, "--seed", str(self.options["seed"])]
        words += ["--device", self.options["device"], "--backend", outcome.backend]
        if self.options["sizes"] != "auto":
            words += ["--sizes", self.options["sizes"]]
        if not self.options["grad"]:
            words.append("--no-grad")
        prefix = "TRITON_INTERPRET=1 " if settings.triton_interpreting() else ""
        return prefix + shlex.join(words)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "summary": self.counts(),
            "seconds": round(self.seconds, 3),
            "options": self.options,
            "environment": self.environment,
            "backends_not_run": self.not_run,
            "results": [
                {**o.as_dict(), **({"reproducer": self.reproducer(o)} if o.failed else {})} for o in self.outcomes
            ],
        }


# ---- arguments ----------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to test: the argument, or cuda when present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: expected a torch device like cpu or cuda:0, got {device!r} ({error})") from None
    try:
        torch.empty(1, device=resolved)
    except Exception as error:  # no driver, no such index, a backend torch was built without
        raise ValueError(f"device: {str(resolved)!r} is not usable here: {error}") from None
    return resolved


def oracle_device_for(device: torch.device) -> torch.device | None:
    """None (the device itself) when it computes float64, else the CPU (for example MPS)."""
    try:
        torch.ones(2, dtype=torch.float64, device=device).sum().item()
    except Exception:
        return torch.device("cpu")
    return None


def _split_names(values: Sequence[str] | str | None) -> list[str] | None:
    """Repeatable, comma separated option values as one list."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def choose_backends(requested: Sequence[str] | None, device: torch.device) -> tuple[list[Backend], dict[str, str]]:
    """(backends to run, {left-out backend: reason}). Without a request, every available
    backend that declares this device type; a named backend that cannot run is an error."""
    known = registry()
    broken = import_errors()
    if requested is None:
        chosen, not_run = [], {}
        for name, backend in known.items():
            available, reason = backend.availability()
            if not available:
                not_run[name] = f"not available: {reason}"
            elif device.type not in backend.capabilities.devices:
                not_run[name] = f"does not run on {device.type}"
            else:
                chosen.append(backend)
        not_run.update({name: f"failed to import: {error}" for name, error in broken.items()})
        return chosen, not_run
    chosen = []
    for name in requested:
        if name in broken:
            raise ValueError(f"backend: {name!r} failed to import ({broken[name]})")
        if name not in known:
            raise ValueError(f"backend: expected names from {sorted(known)}, got {name!r}")
        backend = known[name]
        available, reason = backend.availability()
        if not available:
            raise ValueError(f"backend: {name!r} is not available here: {reason}")
        if device.type not in backend.capabilities.devices:
            raise ValueError(
                f"backend: {name!r} does not run on {device.type} (devices: {sorted(backend.capabilities.devices)})"
            )
        if backend not in chosen:
            chosen.append(backend)
    return chosen, {}


# ---- environment ----------------------------------------------------------------------
def environment(device: torch.device, oracle_device: torch.device | None) -> dict[str, Any]:
    """Device, versions, build facts and commit: what a report needs to be reproduced."""
    from ..info import collect

    facts: dict[str, Any] = dict(collect())
    facts["device"] = str(device)
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        facts["device_name"] = cpu_model()
    facts["oracle"] = f"float64 on {oracle_device or device}"
    commit, dirty = git_commit()
    facts["git_commit"] = commit + ("-dirty" if dirty else "") if commit else None
    facts["triton_interpret"] = settings.get("TRITON_INTERPRET")
    return facts


# ---- running ----------------------------------------------------------------------------
def _skip_reason(
    backend: Backend,
    case: Case,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: dict[str, Any],
    grad: bool,
    device: torch.device,
) -> str | None:
    """Why backend is not checked on this case (dispatch's own refusal first), or None."""
    call = validated_call(q, k, v, options)
    # Paged calls are checked forward only (testing.check_backend).
    forward_only = call.is_paged or "quantized_kv" in call.features()  # checked forward only
    reason = refusal(backend, dataclasses.replace(call, needs_grad=grad and not forward_only))
    if reason is not None:
        return reason
    for name, device_type, dtype, limitation in KNOWN_LIMITATIONS:
        if backend.name == name and device.type == device_type and case.dtype == dtype:
            return limitation
    return None


def _fork_rng(device: torch.device):
    """Seeding grad_out must not disturb the caller's random state."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index or 0])
    return torch.random.fork_rng(devices=[])


def run_case(
    case: Case,
    backends: Sequence[Backend],
    device: torch.device,
    *,
    grad: bool = True,
    oracle_device: torch.device | None = None,
) -> list[Outcome]:
    """Check one case on each backend (skipping those that refuse it)."""
    q, k, v, kwargs = make_inputs(case, device)
    features = tuple(sorted(case.features(grad)))
    outcomes = []
    for backend in backends:
        started = time.perf_counter()
        try:
            reason = _skip_reason(backend, case, q, k, v, kwargs, grad, device)
        except Exception as error:  # a refuse() hook that raises is a backend bug
            outcomes.append(Outcome(case, backend.name, ERROR, reason=f"refuse raised {type(error).__name__}: {error}"))
            continue
        if reason is not None:
            outcomes.append(Outcome(case, backend.name, SKIP, reason=reason, features=features))
            continue
        try:
            with _fork_rng(device):
                torch.manual_seed(case.seed)  # grad_out is drawn inside check_backend
                checks = check_backend(backend.name, q, k, v, grad=grad, oracle_device=oracle_device, **kwargs)
        except Exception as error:
            message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
            outcomes.append(
                Outcome(
                    case, backend.name, ERROR, reason=message, seconds=time.perf_counter() - started, features=features
                )
            )
            continue
        failed = [c for c in checks if not c.passed]
        outcomes.append(
            Outcome(
                case,
                backend.name,
                FAIL if failed else PASS,
                checks=checks,
                reason="; ".join(f"{c.name}: {c.reason}" for c in failed),
                seconds=time.perf_counter() - started,
                features=features,
            )
        )
    return outcomes


def plan(
    *,
    cases: int = DEFAULT_CASES,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtypes: Sequence[str] | str | None = None,
    features: Sequence[str] | str | None = None,
    grad: bool = True,
    case_ids: Sequence[str] | str | None = None,
    sizes: str = "auto",
) -> tuple[torch.device, SizeProfile, list[Case]]:
    """(device, size profile, cases) that run() would check; see run() for the arguments."""
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise ValueError(f"cases: expected a positive int, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    resolved = resolve_device(device)
    profile = profile_for_device(sizes, resolved)
    ids = _split_names(case_ids)
    if ids is not None:
        return resolved, profile, [build_case(parse_case_id(identifier), seed, profile) for identifier in ids]
    dtype_names = _split_names(dtypes)
    dtype_filter = None if dtype_names is None else frozenset(dtype_name(name) for name in dtype_names)
    feature_names = _split_names(features)
    feature_filter = None if feature_names is None else frozenset(feature_names)
    selected = select_cases(cases, seed, profile, dtypes=dtype_filter, features=feature_filter, grad=grad)
    return resolved, profile, selected


ProgressCallback = Callable[[int, int, Case], None]
"""progress(done, total, case): called after each case."""


def run(
    *,
    cases: int = DEFAULT_CASES,
    seed: int = 0,
    device: str | torch.device | None = None,
    backends: Sequence[str] | str | None = None,
    dtypes: Sequence[str] | str | None = None,
    features: Sequence[str] | str | None = None,
    grad: bool = True,
    case_ids: Sequence[str] | str | None = None,
    sizes: str = "auto",
    progress: ProgressCallback | None = None,
    isolate: bool = False,
    timeout: float | None = None,
) -> ParityResult:
    """Check every eligible backend against the float64 reference on a seeded case grid.

    Args:
        cases: how many cases (the first ones of the grid that pass the filters).
        seed: grid seed; (seed, sizes, case ID) fixes a case's shapes, options and values.
        device: torch device to test ("cpu", "cuda:1"); default cuda when present.
        backends: names (a list or comma separated); default every available backend that
            runs on the device.
        dtypes: keep cases of these dtypes (fp16, bf16, fp32).
        features: keep cases using all these semantics.FEATURES names.
        grad: also check dq, dk, dv.
        case_ids: run exactly these cases ("c0042"), ignoring cases/dtypes/features.
        sizes: "auto" (small on CPU, full elsewhere), "small" or "full".
        progress: called as progress(done, total, case) after each case.
        isolate: run the cases in a worker process, so a backend that crashes the
            process fails its case (with a reproducer) instead of ending the run. Only
            backends that fusedattn.dispatch discovers by itself can run isolated.
        timeout: seconds one case may run on one backend before it is killed and fails
            (a hung kernel); implies isolate.

    Returns:
        A ParityResult; result.passed / result.exit_code say whether every check passed.

    Raises:
        ValueError: for a bad argument (unknown backend, dtype, feature, case ID, device).
    """
    started = time.perf_counter()
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        isolate = True
    resolved, profile, selected = plan(
        cases=cases,
        seed=seed,
        device=device,
        dtypes=dtypes,
        features=features,
        grad=grad,
        case_ids=case_ids,
        sizes=sizes,
    )
    chosen, not_run = choose_backends(_split_names(backends), resolved)
    oracle_device = oracle_device_for(resolved)

    outcomes: list[Outcome] = []
    if isolate:
        outcomes = run_isolated(
            selected,
            [b.name for b in chosen],
            resolved,
            profile,
            seed,
            grad=grad,
            oracle_device=oracle_device,
            progress=progress,
            timeout=timeout,
        )
    else:
        for done, case in enumerate(selected, start=1):
            outcomes.extend(run_case(case, chosen, resolved, grad=grad, oracle_device=oracle_device))
            if progress is not None:
                progress(done, len(selected), case)
    options = {
        "cases": len(selected),
        "seed": seed,
        "device": str(resolved),
        "sizes": sizes,
        "size_profile": profile.name,
        "grad": grad,
        "backends": [b.name for b in chosen],
        "dtypes": _split_names(dtypes),
        "features": _split_names(features),
        "case_ids": _split_names(case_ids),
        "isolate": isolate,
        "timeout": timeout,
    }
    return ParityResult(
        outcomes=outcomes,
        options=options,
        environment=environment(resolved, oracle_device),
        not_run=not_run,
        seconds=time.perf_counter() - started,
    )
