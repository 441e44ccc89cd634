"""The fuzz harness itself (tests/fuzz, docs/reliability.md): a short eager run of every entry
point, and the oracle's verdicts on results known to be wrong or crashing.

The long campaign is `make fuzz`; this only keeps the harness working under `make test`.
"""

from __future__ import annotations

import math
import time

import fusedattn
import pytest
import torch

pytest.importorskip("hypothesis")

from tests.fuzz.campaign import ENTRIES, Figures, run_chunk  # noqa: E402
from tests.fuzz.case import Case  # noqa: E402
from tests.fuzz.oracle import classify, compare, named_arguments, unwrap  # noqa: E402
from tests.fuzz.problem import Options, check_attention, oracle_call  # noqa: E402

EXAMPLES = 50


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_runs_eagerly(entry: str) -> None:
    # ~50 examples, no compile, no shrinking: every case gets an outcome, and the harness
    # neither errors nor stalls. (Crashes and wrong results are the campaign's business:
    # counted here, judged by `make fuzz`.)
    figures = Figures()
    started = time.monotonic()
    run_chunk(entry, 12345, figures, deadline=time.monotonic() + 30, compiled_fraction=0.0, examples=EXAMPLES,
              shrink=False)  # fmt: skip
    assert figures.tried[entry] > 0
    assert sum(count for key, count in figures.outcomes.items() if key.startswith(entry + "|")) == figures.tried[entry]
    assert time.monotonic() - started < 45


def _dense_case(function, check=None, target: str | None = None) -> Case:
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    call = oracle_call(q, k, v, Options(causal=True))
    return Case(entry="attention", function=function, args=(q, k, v), kwargs={"causal": True},
                check=check or (lambda result: check_attention(call, result, False)), target=target)  # fmt: skip


def test_a_correct_result_matches() -> None:
    assert classify(_dense_case(fusedattn.attention)).kind == "match"


def test_a_wrong_result_is_wrong() -> None:
    def off_by_a_little(q, k, v, **kwargs):
        return fusedattn.attention(q, k, v, **kwargs) + 1e-2

    outcome = classify(_dense_case(off_by_a_little))
    assert outcome.kind == "wrong" and "out" in outcome.reason


def test_an_unwritten_element_is_wrong() -> None:
    def leaves_one_element(q, k, v, **kwargs):
        out = fusedattn.attention(q, k, v, **kwargs).clone()
        out[0, 0, 0, 0] = math.nan  # what a poisoned, never written element looks like
        return out

    assert "NaN" in classify(_dense_case(leaves_one_element)).reason


def test_a_runtime_error_is_a_crash() -> None:
    def fails(q, k, v, **kwargs):
        raise RuntimeError("index out of range in self")

    outcome = classify(_dense_case(fails))
    assert outcome.kind == "crash" and outcome.error == "RuntimeError"


def test_refusals_must_name_the_faulty_argument() -> None:
    def refuses(q, k, v, **kwargs):
        raise ValueError("window: expected a pair")

    assert classify(_dense_case(refuses, target="window")).kind == "refused"
    assert classify(_dense_case(refuses, target="softcap")).kind == "crash"
    # A valid call refused is a wrong outcome, whatever the message.
    assert classify(_dense_case(refuses)).kind == "wrong"


def test_a_faulty_call_that_returns_is_wrong() -> None:
    outcome = classify(_dense_case(fusedattn.attention, target="scale"))
    assert outcome.kind == "wrong" and "accepted" in outcome.reason


def test_message_names() -> None:
    assert named_arguments("k, v: expected the dtype of q") == {"k", "v"}
    assert "backend" in named_arguments("backend 'cpu' cannot serve this call: dtype float64")
    assert "window_size" not in named_arguments("'<' not supported between instances of 'str' and 'int'")


def test_nan_must_appear_exactly_where_the_oracle_has_it() -> None:
    oracle = torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)
    assert compare("out", oracle.float(), oracle, oracle, torch.float32) is None
    assert "not NaN" in compare("out", torch.tensor([1.0, 2.0, 3.0]), oracle, oracle, torch.float32)
    assert "NaN" in compare("out", torch.tensor([math.nan, math.nan, 3.0]), oracle, oracle, torch.float32)


def test_compiled_refusals_are_unwrapped() -> None:
    compiled = torch.compile(lambda q: fusedattn.attention(q, q, q, softcap=-1.0), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    with pytest.raises(Exception) as raised:
        compiled(torch.randn(1, 1, 2, 4))
    inner = unwrap(raised.value)
    assert isinstance(inner, ValueError) and str(inner).startswith("softcap:")


def test_compiled_assertions_are_unwrapped_with_their_class() -> None:
    # The drop-ins raise what torch raises (AssertionError for MultiheadAttention's shapes).
    def refuses(q):
        raise AssertionError("expecting key weights shape of (2, 1)")

    compiled = torch.compile(refuses, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as raised:
        compiled(torch.randn(2))
    inner = unwrap(raised.value)
    assert type(inner) is AssertionError and "key weights" in str(inner)


def test_a_cancelled_gradient_keeps_its_nan() -> None:
    # dq of one key is an exact zero; a NaN row of it must still be NaN in the oracle.
    q, k, v = (torch.randn(1, 2, 1, 8, dtype=torch.float64) for _ in range(3))
    q[0, 1, 0, 0] = math.nan
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    call = oracle_call(q, k, v, Options()).with_tensors(needs_grad=True)
    out = fusedattn.attention(*leaves, backend="reference")
    assert check_attention(call, out, False, leaves) is None


def test_low_precision_overflow_is_not_judged() -> None:
    oracle = torch.tensor([1.0, math.inf], dtype=torch.float64)
    lowprec = torch.tensor([1.0, math.nan], dtype=torch.float64)  # 0 * Inf in the input dtype
    assert compare("out", torch.tensor([1.0, math.nan]), oracle, lowprec, torch.float16) is None


def test_a_compiled_bad_index_value_must_give_nan() -> None:
    case = _dense_case(lambda q, k, v, **kwargs: torch.full_like(q, math.nan), target="cache_seqlens")
    case.compiled_fault_check = lambda out: None if bool(torch.isnan(out).all()) else "not NaN"
    assert classify(case, compiled=True).kind == "refused"
    case.compiled_fault_check = lambda out: "not NaN"
    assert classify(case, compiled=True).kind == "wrong"
    assert classify(case, compiled=False).kind == "wrong"  # eagerly, a result for a faulty call is wrong
