"""The Triton kernels compile for sm_90 (H100) as a real launch builds them, without a GPU.

Runs the CI slice of scripts/device_compile_check.py (a representative set: every
forward config of one head dim with and without TMA, a narrow and a ragged head dim,
decode in bf16 and fp16, one backward kernel) in a subprocess: the script needs Triton
out of interpreter mode. Skipped where Triton cannot compile for CUDA (no ptxas).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_compile_check.py"


def _cuda_compiler_missing() -> str | None:
    """Why Triton cannot compile CUDA kernels here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as error:  # noqa: BLE001 - no triton, or no nvidia backend
        return f"no Triton CUDA backend: {error}"
    try:
        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # Triton before 3.5: one ptxas for every arch
            ptxas = get_ptxas().path
        subprocess.run([ptxas, "--version"], capture_output=True, check=True, timeout=60)
    except Exception as error:  # noqa: BLE001
        return f"no working ptxas: {error}"
    return None


@pytest.fixture(scope="module")
def ci_slice(tmp_path_factory) -> dict:
    reason = _cuda_compiler_missing()
    if reason:
        pytest.skip(reason)
    output = tmp_path_factory.mktemp("triton-compile") / "ci.json"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--slice", "ci", "--jobs", "2", "--timeout", "300", "--json", str(output)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert output.exists(), completed.stdout[-4000:] + completed.stderr[-4000:]
    document = json.loads(output.read_text())
    document["log"] = completed.stdout[-4000:] + completed.stderr[-2000:]
    document["returncode"] = completed.returncode
    return document


@pytest.mark.slow
def test_ci_slice_compiles_without_failures(ci_slice):
    results = ci_slice["results"]
    failed = [f"{r['kernel']}: {r['status'][:300]}" for r in results if r["status"] != "ok"]
    assert not failed, "\n".join(failed)
    assert ci_slice["returncode"] == 0, ci_slice["log"]
    families = {r["family"] for r in results}
    assert {"forward", "decode", "backward"} <= families, families
    # The JIT's own binder (where this Triton has it) gives the same specialization.
    assert all(r["binder"] in ("same", "unavailable") for r in results if r["specialized"])


@pytest.mark.slow
def test_half_precision_forward_and_decode_do_not_spill(ci_slice):
    spilling = [
        f"{r['kernel']}: {r['spills']} words local, {r['spill_stores']} bytes spill stores, {r['registers']} registers"
        for r in ci_slice["results"]
        if r["specialized"]
        and r["dtype"] in ("bfloat16", "float16")
        and r["family"] in ("forward", "forward-tma", "decode")
        and (r["spills"] or r["spill_stores"])
    ]
    assert not spilling, "\n".join(spilling)
    assert all(r["registers"] is not None for r in ci_slice["results"]), "register counts not read"


@pytest.mark.slow
def test_specialization_builds_the_pipelined_kernel(ci_slice):
    """Aligned pointers and strides (tt.divisibility=16) let Triton pipeline the K/V loads
    through cp.async into multi-stage shared buffers; without them it builds scalar loads."""
    results = ci_slice["results"]
    controls = [r for r in results if not r["specialized"]]
    assert controls, "the CI slice compiles one unspecialized control"
    for control in controls:
        twin = next(r for r in results if r["specialized"] and r["kernel"] == control["kernel"])
        assert control["config"]["num_stages"] > 1
        assert "cp.async" in twin["ptx"] and "cp.async" not in control["ptx"], (twin["ptx"], control["ptx"])
        assert twin["shared"] > control["shared"], (twin["shared"], control["shared"])
        assert "stride_ks" in twin["divisible"] and "K" in twin["divisible"]
    forward = [r for r in results if r["specialized"] and r["family"] == "forward"]
    # Head dims that are multiples of 16 give strides with the hint: the K/V loads are pipelined.
    assert all("cp.async" in r["ptx"] for r in forward if r["config"]["num_stages"] > 1 and r["head_dim"] % 16 == 0)
    assert all("tma" in r["ptx"] for r in results if r["family"] == "forward-tma")
