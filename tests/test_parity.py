"""The parity harness catches wrong kernels and reports them reproducibly.

Wrong backends are registered only inside these tests (monkeypatching the dispatcher's
registry): one perturbs the output, one writes NaN, one leaves an output row unwritten,
one raises. The reference must pass the same grid.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import fusedattn.parity as parity
import pytest
import torch
from fusedattn import dispatch
from fusedattn.backends import reference
from fusedattn.backends.base import Backend, Capabilities, allocate_output
from fusedattn.cli import main as cli_main
from fusedattn.parity.cases import GQA_RATIOS, PROFILES, make_case, make_inputs, select_cases
from fusedattn.parity.runner import FAIL, PASS, SKIP, choose_backends, run_case, validated_call
from fusedattn.semantics import DIFFERENTIABLE_OPTIONS, FEATURES

SMALL = PROFILES["small"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # Small matmuls on 2 threads per worker under `pytest -n 2` oversubscribe the 2 CI cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- deliberately wrong backends, registered only by the tests ----------------------------
def _backend(name: str, forward, backward=reference.backward, features=FEATURES) -> Backend:
    return Backend(
        name=name,
        capabilities=Capabilities(
            devices=frozenset({"cpu"}),
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            features=frozenset(features),
            differentiable_options=frozenset(DIFFERENTIABLE_OPTIONS),
        ),
        forward=forward,
        backward=backward,
        description="a deliberately wrong backend for tests/test_parity.py",
    )


def _perturbed_forward(call):
    out, lse = reference.forward(call)
    return out + 1e-2, lse


def _nan_forward(call):
    out, lse = reference.forward(call)
    out = out.clone()
    out[(0,) * (out.dim() - 1)] = float("nan")  # one row, whatever the layout
    return out, lse


def _nan_backward(call, grad_out, out, lse, option_gradients=()):
    dq, dk, dv, *option_grads = reference.backward(call, grad_out, out, lse, option_gradients)
    dk = dk.clone()
    dk[(0,) * dk.dim()] = float("nan")
    return dq, dk, dv, *option_grads


def _scaled_sink_backward(call, grad_out, out, lse, option_gradients=()):
    """d sinks off by 1%: the rule must catch it."""
    dq, dk, dv, *option_grads = reference.backward(call, grad_out, out, lse, option_gradients)
    return dq, dk, dv, *(g * 1.01 for g in option_grads)


def _unwritten_row_forward(call):
    """Allocates out as every backend must, then forgets the last query row."""
    expected, lse = reference.forward(call)
    out = allocate_output(call.out_shape, call.dtype, call.device)
    if call.is_varlen:  # (T, H, Dv): the last token's row
        out[:-1] = expected[:-1]
    else:  # (B, H, S, Dv)
        out[..., :-1, :] = expected[..., :-1, :]
    return out, lse


def _backward_from_correct_out(call, grad_out, out, lse, option_gradients=()):
    """The reference backward handed the correct out and lse: a backend whose only fault is
    its forward output (a backward reads the out it is handed, so a NaN there would spread)."""
    return reference.backward(call, grad_out, *reference.forward(call), option_gradients)


def _raising_forward(call):
    raise RuntimeError("kernel launch failed")


WRONG = {
    "parity_test_perturbed": _backend("parity_test_perturbed", _perturbed_forward, _backward_from_correct_out),
    "parity_test_nan_out": _backend("parity_test_nan_out", _nan_forward, _backward_from_correct_out),
    "parity_test_nan_dk": _backend("parity_test_nan_dk", reference.forward, _nan_backward),
    "parity_test_unwritten": _backend("parity_test_unwritten", _unwritten_row_forward, _backward_from_correct_out),
    "parity_test_raises": _backend("parity_test_raises", _raising_forward),
    "parity_test_wrong_sinks": _backend("parity_test_wrong_sinks", reference.forward, _scaled_sink_backward),
    "parity_test_no_dropout": _backend(
        "parity_test_no_dropout", reference.forward, features=set(FEATURES) - {"dropout"}
    ),
}


@pytest.fixture
def wrong_backends(monkeypatch):
    for name, backend in WRONG.items():
        monkeypatch.setitem(dispatch.registry(), name, backend)
    return WRONG


# ---- the grid -----------------------------------------------------------------------------
def test_grid_is_deterministic_and_ids_are_stable():
    first = select_cases(40, 7, SMALL)
    assert first == select_cases(40, 7, SMALL)
    assert [c.id for c in first] == [f"c{i:04d}" for i in range(40)]
    assert first != select_cases(40, 8, SMALL)
    # A filter selects cases; it never changes what an ID means.
    for case in select_cases(10, 7, SMALL, dtypes=frozenset({"fp32"}), features=frozenset({"window"})):
        assert case == make_case(case.index, 7, SMALL)
        assert case.dtype == "fp32" and "window" in case.features(True)
    q1, k1, v1, options1 = make_inputs(first[5], CPU)
    q2, k2, v2, options2 = make_inputs(make_case(5, 7, SMALL), CPU)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    assert options1.keys() == options2.keys()


def test_default_grid_covers_every_feature_and_awkward_size():
    cases = select_cases(parity.DEFAULT_CASES, 0, SMALL)
    used = set().union(*(c.features(True) for c in cases))
    assert used == set(FEATURES)
    seqlens = {c.seqlen_q for c in cases} | {c.seqlen_k for c in cases}
    assert {1, 7, 17, 127} <= seqlens and max(seqlens) >= 1000
    assert sum(c.large for c in cases) <= 2  # large cases stay few on CPU
    assert {16, 40, 64, 80, 96, 112, 128, 192, 256} <= {c.head_dim for c in cases}
    assert any(c.head_dim_v != c.head_dim for c in cases)
    assert {1, *GQA_RATIOS} <= {c.heads_q // c.heads_kv for c in cases}
    assert {1, 2, 3, 4} <= {c.batch for c in cases}
    assert {"fp16", "bf16", "fp32"} == {c.dtype for c in cases}
    assert {"dense", "varlen", "paged"} == {c.layout for c in cases}
    assert {c.block_size for c in cases if c.layout == "paged"} - {None}
    assert any(c.fully_masked for c in cases) and any(c.non_contiguous for c in cases)
    assert any(c.key_lengths for c in cases)


def test_cases_build_what_they_describe():
    for case in select_cases(parity.DEFAULT_CASES, 0, SMALL):
        if case.large:
            continue
        q, k, v, options = make_inputs(case, CPU)
        call = validated_call(q, k, v, options)
        assert call.features() == case.features(False), case.id
        if case.non_contiguous:
            assert not q.is_contiguous(), case.id
        if case.fully_masked:
            _, lse, _ = reference.reference_attention(call, torch.float64)
            # A fully masked row has lse -inf, or the sink's logit with sinks.
            masked = torch.isneginf(lse) if case.sinks is None else lse == options["sinks"].double()[:, None]
            assert masked.any(), f"{case.id} ({case.fully_masked}) has no fully masked row"


# ---- running --------------------------------------------------------------------------------
def test_reference_passes_the_default_grid():
    result = parity.run(device="cpu", backends="reference")
    assert result.passed and result.exit_code == 0, [(o.case.id, o.reason) for o in result.failures]
    assert len(result.checked) == parity.DEFAULT_CASES
    for outcome in result.checked:
        if outcome.case.layout == "paged" or outcome.case.kv_quantized:  # inference: checked forward only
            assert [c.name for c in outcome.checks] == ["out", "lse"]
            continue
        learned = ["dsinks"] if outcome.case.sinks else []  # a learned option's gradient is checked too
        assert [c.name for c in outcome.checks] == ["out", "lse", "dq", "dk", "dv", *learned]


def test_every_cpu_backend_passes_the_command_users_run_in_ci(tmp_path):
    # What a user's CI runs (README): the CLI in a fresh process, with Triton's interpreter
    # on from the start, over every backend that can run on the CPU (the C++ CPU backend and
    # Triton included once they exist). A few cases keep it within CI time; `make parity`
    # runs the full default grid.
    report = tmp_path / "parity.json"
    command = [sys.executable, "-m", "fusedattn", "parity", "--device", "cpu", "--cases", "8", "--no-progress",
               "--json", str(report)]  # fmt: skip
    completed = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(report.read_text())
    assert not [reason for reason in document["backends_not_run"].values() if "failed to import" in reason]
    passed_backends = {r["backend"] for r in document["results"] if r["status"] == PASS}
    assert "reference" in passed_backends and passed_backends == set(document["options"]["backends"])


def test_oracle_on_another_device_passes():
    # The path taken when a device lacks float64: the oracle runs on the CPU.
    case = make_case(14, 0, SMALL)
    (outcome,) = run_case(case, [dispatch.registry()["reference"]], CPU, oracle_device=CPU)
    assert outcome.status == PASS


def test_perturbed_output_fails(wrong_backends):
    result = parity.run(cases=8, device="cpu", backends="parity_test_perturbed", dtypes="fp32")
    assert result.exit_code == 1
    # Every case the backend takes fails (it refuses head dims over 256, which the grid draws now and then).
    assert len(result.failures) == len(result.checked) >= 6
    for outcome in result.failures:
        failed = {c.name for c in outcome.checks if not c.passed}
        assert failed == {"out"}, (outcome.case.id, outcome.reason)


@pytest.mark.parametrize(
    ("backend", "tensor"),
    [("parity_test_nan_out", "out"), ("parity_test_nan_dk", "dk"), ("parity_test_unwritten", "out")],
)
def test_nan_and_unwritten_outputs_fail(wrong_backends, backend, tensor):
    result = parity.run(cases=6, device="cpu", backends=backend)
    assert result.exit_code == 1
    assert len(result.failures) == len(result.checked) == 6
    for outcome in result.failures:
        (failed,) = [c for c in outcome.checks if not c.passed]
        assert failed.name == tensor and "NaN" in failed.reason and math.isinf(outcome.severity)


def test_wrong_sink_gradient_fails(wrong_backends):
    from fusedattn.testing import check_backend

    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    for dtype in (torch.float32, torch.float16):
        checks = check_backend("parity_test_wrong_sinks", q.to(dtype), k.to(dtype), v.to(dtype), causal=True,
                               sinks=torch.randn(3))  # fmt: skip
        assert [c.name for c in checks if not c.passed] == ["dsinks"], dtype


def test_raising_backend_is_an_error_not_a_crash(wrong_backends):
    result = parity.run(cases=2, device="cpu", backends="parity_test_raises")
    assert result.exit_code == 1
    assert all(o.status == "error" and "kernel launch failed" in o.reason for o in result.outcomes)


def test_refused_cases_are_skipped_with_the_reason(wrong_backends):
    result = parity.run(cases=3, device="cpu", backends="parity_test_no_dropout", features="dropout")
    assert all(o.status == SKIP and "dropout" in o.reason for o in result.outcomes)
    assert result.exit_code == 1  # nothing was checked: never a pass


def test_triton_on_cpu_skips_bf16():
    stand_in = _backend("triton", reference.forward)
    case = next(c for c in select_cases(20, 0, SMALL) if c.dtype == "bf16")
    (outcome,) = run_case(case, [stand_in], CPU)
    assert outcome.status == SKIP and "bfloat16" in outcome.reason


def test_backend_choice(wrong_backends, monkeypatch):
    chosen, not_run = choose_backends(["reference", "parity_test_perturbed"], CPU)
    assert [b.name for b in chosen] == ["reference", "parity_test_perturbed"]
    unavailable = Backend(
        name="parity_test_unavailable",
        capabilities=Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), features=frozenset()),
        forward=reference.forward,
        backward=None,
        availability=lambda: (False, "no such library"),
    )
    monkeypatch.setitem(dispatch.registry(), unavailable.name, unavailable)
    chosen, not_run = choose_backends(None, CPU)
    assert "reference" in [b.name for b in chosen]
    assert "no such library" in not_run["parity_test_unavailable"]
    with pytest.raises(ValueError, match="not available"):
        choose_backends(["parity_test_unavailable"], CPU)
    with pytest.raises(ValueError, match="expected names"):
        choose_backends(["no_such_backend"], CPU)


# ---- the command line ------------------------------------------------------------------------
def test_cli_exit_codes_reports_and_reproducer(wrong_backends, tmp_path, capsys):
    json_path, junit_path = tmp_path / "parity.json", tmp_path / "parity.xml"
    common = ["parity", "--device", "cpu", "--cases", "4", "--no-progress"]
    assert cli_main([*common, "--backend", "reference", "--json", str(json_path), "--junit", str(junit_path)]) == 0

    document = json.loads(json_path.read_text(), parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))
    assert document["passed"] is True and document["summary"]["pass"] == 4
    assert {"device", "torch", "git_commit", "fusedattn"} <= document["environment"].keys()
    assert [r["case"] for r in document["results"]] == ["c0000", "c0001", "c0002", "c0003"]
    assert [c["name"] for c in document["results"][0]["checks"]][:5] == ["out", "lse", "dq", "dk", "dv"]
    suites = ElementTree.parse(junit_path).getroot()
    assert suites.tag == "testsuites" and suites.get("tests") == "4" and suites.get("failures") == "0"
    assert len(suites.findall("./testsuite/testcase")) == 4
    capsys.readouterr()

    arguments = [*common, "--backend", "reference,parity_test_perturbed", "--dtype", "fp32"]
    assert cli_main([*arguments, "--json", str(json_path), "--junit", str(junit_path)]) == 1
    printed = capsys.readouterr().out
    reproducers = [line.split("reproduce: ", 1)[1] for line in printed.splitlines() if "reproduce: " in line]
    assert len(reproducers) == 4 and all("--backend parity_test_perturbed" in line for line in reproducers)
    document = json.loads(json_path.read_text(), parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))
    failed = [r for r in document["results"] if r["status"] == FAIL]
    assert len(failed) == 4 and all(r["reproducer"] in reproducers for r in failed)
    assert ElementTree.parse(junit_path).getroot().get("failures") == "4"

    # The reproducer reruns exactly the failing case, with the same errors.
    words = shlex.split(reproducers[0])
    assert words[:2] == ["fusedattn", "parity"]
    assert cli_main([*words[1:], "--no-progress", "--json", str(json_path)]) == 1
    rerun = json.loads(json_path.read_text())["results"]
    assert len(rerun) == 1 and rerun[0]["case"] == failed[0]["case"]
    assert rerun[0]["checks"] == failed[0]["checks"] and rerun[0]["parameters"] == failed[0]["parameters"]


@pytest.mark.parametrize(
    "arguments",
    [
        ["--dtype", "fp8"],
        ["--backend", "no_such_backend"],
        ["--case", "42"],
        ["--cases", "0"],
        ["--features", "no_such_feature"],
        ["--features", "varlen,bool_mask"],
        ["--features", "backward", "--no-grad"],
        ["--device", "no_such_device"],
        ["--json", "/no/such/folder/parity.json"],
        ["--unknown-option"],
    ],
)
def test_cli_bad_arguments_exit_2(arguments, capsys):
    assert cli_main(["parity", "--device", "cpu", "--backend", "reference", *arguments]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_lists_cases(capsys):
    assert cli_main(["parity", "--device", "cpu", "--list", "--cases", "3", "--dtype", "fp32"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [c.id for c in select_cases(3, 0, SMALL, dtypes=frozenset({"fp32"}))]


# ---- isolation: a backend that kills the process ----------------------------------------------
_CRASHING_WORKER = """
import os, sys, time
import torch
from fusedattn import dispatch
from fusedattn.backends import reference
from fusedattn.backends.base import Backend, Capabilities
from fusedattn.parity.worker import worker_main
from fusedattn.semantics import FEATURES

def forward(call):
    if call.dtype == torch.bfloat16:
        os.abort()  # what a heap corruption in a native kernel looks like from outside
    if call.dtype == torch.float32:
        time.sleep(600)  # a hung kernel
    return reference.forward(call)

dispatch.registry()["parity_test_crash"] = Backend(
    name="parity_test_crash",
    capabilities=Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float16, torch.bfloat16,
        torch.float32}), features=frozenset(FEATURES)),
    forward=forward,
    backward=reference.backward,
)
sys.exit(worker_main(sys.argv[1:]))
"""


def test_isolated_run_survives_crashing_and_hanging_backends(monkeypatch, tmp_path):
    from fusedattn.parity import isolation

    script = tmp_path / "crashing_worker.py"
    script.write_text(_CRASHING_WORKER)
    monkeypatch.setattr(isolation, "WORKER_COMMAND", [sys.executable, str(script)])
    monkeypatch.setitem(dispatch.registry(), "parity_test_crash", _backend("parity_test_crash", reference.forward))
    # c0000 fp16 passes, c0001 bf16 kills its worker, c0002 fp32 hangs until the timeout
    # (the last item, so two workers do it all); the reference runs every case. A tiny case takes
    # well under a second, so 6 s only ever kills the hang.
    result = parity.run(cases=3, device="cpu", backends="reference,parity_test_crash", grad=False, timeout=6)
    crashing = [o for o in result.outcomes if o.backend == "parity_test_crash"]
    assert [(o.case.id, o.status) for o in crashing] == [("c0000", PASS), ("c0001", "error"), ("c0002", "error")]
    assert "died (signal SIGABRT)" in crashing[1].reason and "--timeout" in crashing[2].reason
    assert result.exit_code == 1
    # Outcomes travel between processes intact.
    in_process = parity.run(cases=3, device="cpu", backends="reference", grad=False)
    isolated = [o for o in result.outcomes if o.backend == "reference"]
    assert [(o.case, o.status, o.checks) for o in isolated] == [
        (o.case, o.status, o.checks) for o in in_process.outcomes
    ]


def test_every_focus_meets_every_dtype():
    from fusedattn.parity.cases import DTYPES, FOCUS

    cases = select_cases(3 * len(FOCUS), 3, SMALL)
    pairs = {(FOCUS[c.index % len(FOCUS)], c.dtype) for c in cases}
    assert pairs == {(focus, dtype) for focus in FOCUS for dtype in DTYPES}


def test_a_gradient_that_cancels_to_zero_is_judged_on_the_scale_of_its_terms():
    # Every row sees one key: the true dq is exactly zero, a flash-style backward leaves
    # rounding noise there (case c0032 of seed 0 on the cpu backend).
    from fusedattn.testing import check_tensor

    zero = torch.zeros(4, 8, dtype=torch.float64)
    noise = zero + 2.5e-3
    assert not check_tensor("dq", noise, zero, zero, torch.float16).passed
    assert check_tensor("dq", noise, zero, zero, torch.float16, magnitude=10.0).passed
    assert not check_tensor("dq", noise + 1.0, zero, zero, torch.float16, magnitude=10.0).passed
    nan = noise.clone()
    nan[0, 0] = float("nan")
    assert not check_tensor("dq", nan, zero, zero, torch.float16, magnitude=10.0).passed


def test_grid_draws_options_from_the_shared_feature_case_table():
    # The parity grid and every backend's tests share fusedattn.testing.FEATURE_CASES: each
    # option focus has table entries, and the grid adopts them (window sides, softcaps and
    # dropout rates the random draws never produce).
    from fusedattn.parity.cases import FOCUS, _table_entries_for
    from fusedattn.testing import FEATURE_CASES, SHAPE_FEATURES

    option_foci = [f for f in FOCUS if f not in SHAPE_FEATURES and f not in ("fully_masked", "non_contiguous")]
    assert all(_table_entries_for(focus) for focus in option_foci)
    cases = select_cases(40 * len(FOCUS), 3, SMALL)
    windows = {c.window for c in cases}
    assert {tuple(o["window"]) for o in FEATURE_CASES.values() if "window" in o} <= windows
    assert {o["softcap"] for o in FEATURE_CASES.values() if "softcap" in o} <= {c.softcap for c in cases}


def test_every_layout_focus_keeps_its_layout():
    # A dense-only option (a sequence block) drawn at random never takes a varlen or paged
    # case's focus away.
    from fusedattn.parity.cases import FOCUS, make_case

    for index in range(len(FOCUS) * 60):
        focus = FOCUS[index % len(FOCUS)]
        if focus in ("varlen", "paged_kv"):
            assert focus in make_case(index, 0, SMALL).features(False), index
