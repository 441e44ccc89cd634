"""The compiled extension loads and reports honest build facts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import fusedattn
import torch
from fusedattn import _native


def test_extension_loads_and_reports_build_facts():
    module = _native.native()
    assert module is not None, _native.native_error()
    info = _native.build_info()
    assert set(info) >= {"compiler", "cxx_standard", "simd", "openmp", "cuda", "cuda_architectures"}
    assert re.match(r"(GNU|Clang|AppleClang|MSVC) \d+", info["compiler"]), info["compiler"]
    assert info["cxx_standard"] == "C++17"
    assert isinstance(info["simd"], list) and info["simd"]
    # CUDA can only be on when torch itself was built with CUDA (the AUTO rule).
    if torch.version.cuda is None:
        assert info["cuda"] is False and info["cuda_architectures"] == []
    assert info["cuda"] == bool(info["cuda_architectures"])


def test_info_command_text_and_json():
    text = subprocess.run(
        [sys.executable, "-m", "fusedattn", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in text and "reference" in text and "compiler" in text
    facts = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fusedattn", "info", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert facts["fusedattn"] == fusedattn.__version__
    assert facts["backends"]["reference"]["available"] is True
    assert facts["build"]["cxx_standard"] == "C++17"


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fusedattn, fusedattn.kernels, torch\n"
        "from fusedattn.info import collect\n"
        "q = torch.randn(1, 1, 2, 4); fusedattn.attention(q, q, q)\n"
        "state = collect()['backends']\n"
        "assert all(v['available'] is False for k, v in state.items() if k == 'triton'), state\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
