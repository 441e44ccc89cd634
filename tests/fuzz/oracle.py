"""The outcome of one case: match, refused, crash or wrong (docs/reliability.md).

- match: the call returned, and every output matches the oracle under fusedattn.testing's
  rule (check_tensor), with NaN exactly where the oracle has NaN; outputs are allocated
  poisoned (NaN), so an unwritten element shows up as a NaN the oracle does not have.
- refused: the call raised TypeError, ValueError or NotImplementedError and the text before
  the message's first colon names the faulty argument (or one of its aliases); for the
  drop-ins (sdpa, nn), raising the same exception class as torch does for that call counts
  too. Under torch.compile(fullgraph=True), dynamo reports a refusal raised while tracing
  as Unsupported("Observed exception") caused by the original exception: it is unwrapped.
- crash: any other exception, a refusal whose message names another argument (or none),
  and (decided by the runner) a hang or a dead process.
- wrong: a result that does not match; a result for a faulty call or for a call torch
  refuses; a refusal of a valid call.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import fusedattn.errors
import torch
from fusedattn.backends.base import poisoned_outputs
from fusedattn.testing import check_tensor

from .case import Case
from .compiled import call_compiled

REFUSALS = (TypeError, ValueError, NotImplementedError)
OUTCOMES = ("match", "refused", "crash", "wrong")


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of OUTCOMES
    reason: str = ""
    argument: str | None = None  # the refused argument
    error: str | None = None  # exception class name, when one was raised

    def signature(self, case: Case) -> str:
        """What makes two failures the same failure: entry, kind, exception, and the reason
        with its numbers taken out."""
        reason = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", self.reason)
        reason = re.sub(r"\[[^\]]*\]|\([^)]*\)", "(..)", reason)[:160]
        return f"{case.entry}|{self.kind}|{self.error or '-'}|{reason}"


# ---- refusals -----------------------------------------------------------------------------
def named_arguments(message: str) -> frozenset[str]:
    """The identifiers before the message's first colon: "k, v: expected ..." names k and v;
    "backend 'cpu' cannot serve this call: ..." names backend (among other words)."""
    head = message.split(":", 1)[0] if ":" in message else message
    return frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", head))


_OBSERVED = re.compile(r"raised exception (\w+)\((.*)\)\s*$", re.S)
# fusedattn's own refusal class is a ValueError; fusedattn.errors' classes are two builtin
# classes at once (the drop-ins raise what torch raises, AssertionError, RuntimeError,
# IndexError, ..., and stay fusedattn's ValueError / TypeError); every other name is a
# builtin exception.
_ALIASED_CLASSES: dict[str, type[BaseException]] = {
    "UnsupportedCallError": ValueError,
    **{
        name: kind
        for name, kind in vars(fusedattn.errors).items()
        if isinstance(kind, type) and issubclass(kind, Exception)
    },
}


def _exception_class(name: str) -> type[BaseException] | None:
    if name in _ALIASED_CLASSES:
        return _ALIASED_CLASSES[name]
    found = getattr(builtins, name, None)
    return found if isinstance(found, type) and issubclass(found, Exception) else None


def unwrap(error: BaseException) -> BaseException:
    """The exception the user code raised, for dynamo's and fake tensors' wrapping of it.

    - Under fullgraph=True, dynamo reports an exception raised while tracing as
      Unsupported("Observed exception") caused by Observed<Name>Error: "raised exception
      Name('message')". Any builtin exception class is rebuilt (an AssertionError raised as
      torch raises it is a refusal for the drop-ins, a crash elsewhere).
    - A torch operator that fails on fake tensors while tracing is reported as
      TorchRuntimeError caused by the operator's own exception: that exception is returned.
    Anything else (Unsupported "Attempted to call function marked as skipped", say) is
    returned as is: it is not a refusal.
    """
    cause = error.__cause__
    name = type(error).__name__
    if name == "Unsupported" and cause is not None:
        match = _OBSERVED.search(str(cause))
        found = _exception_class(match.group(1)) if match else None
        if match and found is not None:
            try:
                message = ast.literal_eval(match.group(2))
            except (ValueError, SyntaxError):
                message = match.group(2)
            return found(str(message))
    if name == "TorchRuntimeError" and isinstance(cause, Exception) and type(cause).__module__ == "builtins":
        return cause
    return error


# ---- numeric comparison -------------------------------------------------------------------
def compare(
    name: str,
    actual: Any,
    oracle: torch.Tensor,
    lowprec: torch.Tensor,
    dtype: torch.dtype,
    *,
    expected_dtype: torch.dtype | None = None,
    magnitude: float = 1.0,
    nonfinite_unspecified: bool = False,
    noise: float = 0.0,
) -> str | None:
    """None when actual matches the float64 oracle under fusedattn.testing.check_tensor,
    with NaN required exactly where the oracle has NaN. Elements where the oracle is not NaN
    but the same-precision reference lowprec is not finite (the input dtype overflows or
    underflows where float64 does not) are not judged: neither rule says anything there.
    nonfinite_unspecified: elements non-finite in actual or oracle are not judged either."""
    if not isinstance(actual, torch.Tensor):
        return f"{name}: expected a tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(oracle.shape):
        return f"{name}: shape {tuple(actual.shape)}, expected {tuple(oracle.shape)}"
    if expected_dtype is not None and actual.dtype != expected_dtype:
        return f"{name}: dtype {actual.dtype}, expected {expected_dtype}"
    got = actual.detach().to("cpu", torch.float64)
    want = oracle.detach().to("cpu", torch.float64)
    low = lowprec.detach().to("cpu", torch.float64)
    # Where the same-precision reference is not finite but the float64 one is not NaN, the
    # input dtype overflows or underflows (exp underflowing to 0 against an Inf in v gives
    # 0 * Inf = NaN): a precision effect the float64 oracle does not have, not judged.
    unjudged = ~torch.isnan(want) & ~torch.isfinite(low)
    if nonfinite_unspecified:  # the spec leaves NaN/Inf propagation there open
        unjudged |= ~torch.isfinite(want) | ~torch.isfinite(got)
    got, want, low = got[~unjudged], want[~unjudged], low[~unjudged]
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    if bool((got_nan & ~want_nan).any()):
        return f"{name}: {int((got_nan & ~want_nan).sum())} NaN element(s) where the reference is finite"
    if bool((want_nan & ~got_nan).any()):
        return f"{name}: {int((want_nan & ~got_nan).sum())} element(s) not NaN where the reference is NaN"
    judged = ~want_nan
    result = check_tensor(name, got[judged], want[judged], low[judged], dtype, magnitude=magnitude, noise=noise)
    return None if result.passed else f"{name}: {result.reason}"


def first_failure(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


# ---- classification -----------------------------------------------------------------------
def run(case: Case, compiled: bool) -> Any:
    with case.environment(), poisoned_outputs():
        if compiled:
            return call_compiled(case)
        return case.function(*case.args, **case.kwargs)


def _torch_refusal(case: Case) -> BaseException | None:
    if case.torch_oracle is None:
        return None
    return case.torch_oracle()


def classify(case: Case, compiled: bool = False) -> Outcome:
    """Run case (eagerly, or through a compiled wrapper) and judge the outcome."""
    if compiled and case.compiled_refusal is not None:
        target, why = case.compiled_refusal
        case = dataclasses.replace(case, target=target, fault=why)
    try:
        result = run(case, compiled)
    except Exception as raised:  # noqa: BLE001  (every exception is judged below)
        return _judge_exception(case, unwrap(raised))
    if case.target is not None:
        if compiled and case.compiled_fault_check is not None:
            try:
                problem = case.compiled_fault_check(result)
            except Exception as failed:  # noqa: BLE001
                return Outcome("crash", f"oracle failed: {type(failed).__name__}: {_first_line(failed)}",
                               error=f"oracle:{type(failed).__name__}")  # fmt: skip
            if problem is None:  # the documented compiled answer to a bad value: NaN, nothing written
                return Outcome("refused", argument=f"{case.target} (NaN result)")
            return Outcome("wrong", f"compiled call with a faulty {case.target} ({case.fault}): {problem}")
        return Outcome("wrong", f"accepted a faulty {case.target} ({case.fault}) and returned a result")
    torch_error = _torch_refusal(case)
    if torch_error is not None:
        return Outcome("wrong", f"returned a result where torch raises {type(torch_error).__name__}: "
                                f"{_first_line(torch_error)}")  # fmt: skip
    try:
        reason = case.check(result)
    except Exception as failed:  # noqa: BLE001  (an oracle that cannot judge is a crash of the harness)
        return Outcome("crash", f"oracle failed: {type(failed).__name__}: {_first_line(failed)}",
                       error=f"oracle:{type(failed).__name__}")  # fmt: skip
    return Outcome("match") if reason is None else Outcome("wrong", reason)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _judge_exception(case: Case, error: BaseException) -> Outcome:
    kind = type(error).__name__
    message = _first_line(error)
    if case.same_class_as_torch:
        torch_error = _torch_refusal(case)
        if torch_error is None:
            return Outcome("wrong", f"refused a call torch accepts: {kind}: {message}", error=kind)
        if isinstance(error, type(torch_error)):
            return _refused(case, case.target or "(as torch)", kind)
        return Outcome("crash", f"raised {kind} where torch raises {type(torch_error).__name__}: {message}",
                       error=kind)  # fmt: skip
    if isinstance(error, REFUSALS):
        named = named_arguments(str(error))
        if case.target is None:
            torch_error = _torch_refusal(case)
            if torch_error is not None:
                return _refused(case, sorted(named)[0] if named else "(as torch)", kind)
            return Outcome("wrong", f"refused a valid call: {kind}: {message}", error=kind)
        if named & case.names:
            return _refused(case, case.target, kind)
    torch_error = _torch_refusal(case) if case.torch_oracle is not None else None
    if torch_error is not None and type(torch_error) is type(error):
        return _refused(case, case.target or "(as torch)", kind)
    if isinstance(error, REFUSALS):
        expected = "/".join(sorted(case.names))
        return Outcome("crash", f"refusal names {sorted(named) or 'no argument'}, expected {expected}: {message}",
                       error=kind)  # fmt: skip
    return Outcome("crash", f"{kind}: {message}", error=kind)


def _refused(case: Case, argument: str, kind: str) -> Outcome:
    if case.after_refusal is not None:
        problem = case.after_refusal()
        if problem:
            return Outcome("wrong", f"refused, but {problem}", argument=argument, error=kind)
    return Outcome("refused", argument=argument, error=kind)


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
