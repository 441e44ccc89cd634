"""The build's CUDA rules (docs/building.md), checked without a GPU and without compiling.

Three layers:
* the helpers of cmake/FusedattnCuda.cmake in CMake script mode (milliseconds, no nvcc);
* configures of the real CMakeLists.txt (no build) against torch's own cmake files made to
  behave as a CUDA build of torch does, with no GPU visible: the Docker-build situation in
  which torch's Caffe2/public/cuda.cmake injects its "-gencode ... compute_50 ..." list;
* setup.py's AUTO fallback, driven by a fake command runner.

The installed torch is a CPU build. To emulate a CUDA torch, its share/cmake tree is copied
and the one switch baked in at torch's build time is flipped (Caffe2Config.cmake's CUDA
block, which includes public/cuda.cmake exactly as a CUDA torch does); lib/ and include/ are
links to the real ones. torch.version.cuda comes from FUSEDATTN_TORCH_CUDA_VERSION_OVERRIDE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CMAKE = shutil.which("cmake", path=str(BIN)) or shutil.which("cmake")
NINJA = shutil.which("ninja", path=str(BIN)) or shutil.which("ninja")

pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _find_nvcc()


def _nvcc_facts() -> tuple[str, set[str]]:
    """nvcc's "major.minor" and the sm_ numbers it can compile."""
    if NVCC is None:
        return "", set()
    version = re.search(
        r"release (\d+\.\d+)", subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    )
    codes = subprocess.run([NVCC, "--list-gpu-code"], capture_output=True, text=True).stdout
    return (version.group(1) if version else ""), set(re.findall(r"sm_(\d+)", codes))


NVCC_VERSION, NVCC_CODES = _nvcc_facts()
needs_nvcc = pytest.mark.skipif(
    not NVCC_VERSION or NINJA is None,
    reason="needs nvcc (CUDACXX, PATH or /usr/local/cuda/bin) and ninja: the CUDA configure checks run nvcc",
)
# An architecture this nvcc cannot compile (50 for CUDA 13, which dropped Maxwell).
UNSUPPORTED = next((arch for arch in ("50", "35", "30") if arch not in NVCC_CODES), "30")
NVCC_MAJOR = NVCC_VERSION.split(".")[0] if NVCC_VERSION else "13"
OTHER_MAJOR = f"{int(NVCC_MAJOR) - 1}.4"  # torch built for another CUDA major version


# ---- cmake/FusedattnCuda.cmake in script mode ------------------------------------------


def _cmake_script(tmp_path: Path, body: str, env: dict[str, str] | None = None, defines: tuple = ()) -> dict:
    """Runs `body` after including the helpers; each `message("OUT <key>=<value>")` is returned."""
    script = tmp_path / "script.cmake"
    script.write_text(f'include("{ROOT / "cmake" / "FusedattnCuda.cmake"}")\n{body}\n')
    run_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FUSEDATTN_CUDA_ARCHITECTURES")}
    run_env.update(env or {})
    result = subprocess.run(
        [CMAKE, *(f"-D{d}" for d in defines), "-P", str(script)], capture_output=True, text=True, env=run_env
    )
    assert result.returncode == 0, result.stderr
    values = dict(re.findall(r"^OUT (\w+)=(.*)$", result.stderr, re.MULTILINE))
    values["_stderr"] = result.stderr
    return values


@pytest.mark.parametrize(
    ("text", "archs", "invalid"),
    [
        ("8.0;9.0+PTX", "80-real;90", ""),  # torch: SASS only unless +PTX
        ("8.0 9.0a+PTX", "80-real;90a", ""),
        ("8.6(8.0),9.0", "86-real;90-real", ""),
        ("80;90", "80;90", ""),  # CMake: a bare number is SASS + PTX
        ("80-real;90-virtual;90-real", "80-real;90", ""),
        ("8.0;8.0+PTX;100f", "80;100f", ""),
        ("All;7.5;sm_80", "75-real", "All;sm_80"),
    ],
)
def test_architecture_spellings(tmp_path, text, archs, invalid):
    out = _cmake_script(
        tmp_path,
        f'fusedattn_parse_cuda_archs(a "{text}")\nmessage("OUT archs=${{a}}")\nmessage("OUT invalid=${{a_INVALID}}")',
    )
    assert (out["archs"], out["invalid"]) == (archs, invalid)


def test_build_info_names_what_is_compiled(tmp_path):
    out = _cmake_script(tmp_path, 'fusedattn_cuda_archs_text(t "80-real;90;100-virtual")\nmessage("OUT text=${t}")')
    assert out["text"] == "sm_80,sm_90+PTX,compute_100"


def test_architectures_nvcc_cannot_compile_are_dropped(tmp_path):
    out = _cmake_script(
        tmp_path,
        'fusedattn_filter_cuda_archs(f "50;80-real;90a;100;120-virtual" "75;80;90;100" "75;80;90")\n'
        'message("OUT kept=${f}")\nmessage("OUT dropped=${f_DROPPED}")',
    )
    assert out["kept"] == "80-real;90a;100-real"
    assert out["dropped"] == "50;100-virtual;120-virtual"


def test_torch_architecture_flags_are_stripped(tmp_path):
    flags = (
        "-DONNX_NAMESPACE=onnx_c2 -gencode arch=compute_50,code=sm_50 -gencode=arch=compute_90,code=compute_90 "
        "--generate-code=arch=compute_80,code=[sm_80] -arch=sm_50 -arch sm_60 --gpu-architecture compute_70 "
        "-code=sm_50 -Xcudafe --diag_suppress=cc_clobber_ignored --expt-relaxed-constexpr"
    )
    out = _cmake_script(
        tmp_path,
        f'set(f "{flags}")\nfusedattn_strip_cuda_arch_flags(f)\nmessage("OUT kept=${{f}}")\n'
        'set(l "-DX=1;-gencode;arch=compute_50,code=sm_50;--expt-extended-lambda")\n'
        'fusedattn_strip_cuda_arch_flag_list(l)\nmessage("OUT list=${l}")',
    )
    assert (
        out["kept"] == "-DONNX_NAMESPACE=onnx_c2 -Xcudafe --diag_suppress=cc_clobber_ignored --expt-relaxed-constexpr"
    )
    assert out["list"] == "-DX=1;--expt-extended-lambda"


@pytest.mark.parametrize(
    ("defines", "env", "archs", "source"),
    [
        ((), {}, "80;90", "the default"),
        ((), {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, "80-real;90", "environment TORCH_CUDA_ARCH_LIST"),
        (
            (),
            {"TORCH_CUDA_ARCH_LIST": "8.0", "FUSEDATTN_CUDA_ARCHITECTURES": "86"},
            "86",
            "environment FUSEDATTN_CUDA_ARCHITECTURES",
        ),
        (
            ("FUSEDATTN_CUDA_ARCHITECTURES=90a",),
            {"TORCH_CUDA_ARCH_LIST": "8.0", "FUSEDATTN_CUDA_ARCHITECTURES": "86"},
            "90a",
            "FUSEDATTN_CUDA_ARCHITECTURES",
        ),
        # A source with nothing usable is skipped (with a warning), not fatal.
        ((), {"TORCH_CUDA_ARCH_LIST": "9.0", "FUSEDATTN_CUDA_ARCHITECTURES": "Hopper"}, "90-real", None),
    ],
)
def test_architecture_sources_in_order(tmp_path, defines, env, archs, source):
    out = _cmake_script(
        tmp_path,
        'fusedattn_choose_cuda_archs(a s "")\nmessage("OUT archs=${a}")\nmessage("OUT source=${s}")',
        env=env,
        defines=defines,
    )
    assert out["archs"] == archs
    assert out["source"] == (source or "environment TORCH_CUDA_ARCH_LIST")
    if source is None:
        assert "ignoring CUDA architecture(s) 'Hopper'" in " ".join(out["_stderr"].split())


# ---- configures of the project against an emulated CUDA torch ------------------------------


def _fake_cuda_torch(prefix: Path) -> Path:
    """torch's share/cmake, switched to what a CUDA build of torch installs; returns Torch_DIR."""
    torch_root = Path(importlib.util.find_spec("torch").origin).parent
    shutil.copytree(torch_root / "share" / "cmake", prefix / "share" / "cmake")
    for name in ("lib", "include"):
        (prefix / name).symlink_to(torch_root / name, target_is_directory=True)
    config = prefix / "share" / "cmake" / "Caffe2" / "Caffe2Config.cmake"
    text = config.read_text()
    text = re.sub(r"if\(0\)(\s*# The file public/cuda\.cmake)", r"if(1)\1", text)
    text = text.replace("set(CAFFE2_USE_CUDA 0)", "set(CAFFE2_USE_CUDA 1)")
    text = re.sub(r"if\(\s*AND NOT CAFFE2_USE_CUDA\)", "if(ON AND NOT CAFFE2_USE_CUDA)", text)
    if not re.search(r"if\((1|ON)\)\s*# The file public/cuda\.cmake", text) or "public/cuda.cmake" not in text:
        pytest.skip("torch's Caffe2Config.cmake does not have the expected CUDA block: cannot emulate a CUDA torch")
    config.write_text(text)
    return prefix / "share" / "cmake"


# name: (FUSEDATTN_CUDA, torch.version.cuda, extra -D definitions, environment)
SCENARIOS = {
    # A Docker build: CUDA torch, nvcc, no GPU, nothing chosen -> torch injects its defaults.
    "default": ("ON", NVCC_VERSION, (), {}),
    "torch_arch_list": ("AUTO", NVCC_VERSION, (), {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}),
    "fusedattn_archs": (
        "ON",
        NVCC_VERSION,
        (f"FUSEDATTN_CUDA_ARCHITECTURES={UNSUPPORTED};90",),
        {"TORCH_CUDA_ARCH_LIST": "8.0", "FUSEDATTN_CUDA_ARCHITECTURES": "86"},
    ),
    "mismatch_auto": ("AUTO", OTHER_MAJOR, (), {}),
    "mismatch_on": ("ON", OTHER_MAJOR, (), {}),
    # nvcc works, but CUDA code including cuda_bf16.h does not compile (a stand-in for a broken
    # toolkit or host compiler): the configure-time probe turns CUDA off.
    "probe_fails": ("AUTO", NVCC_VERSION, ("CMAKE_CUDA_FLAGS=-D__nv_bfloat16=int",), {}),
    # A CUDA torch and no usable nvcc at all (needs no nvcc on this machine).
    "no_nvcc_auto": ("AUTO", "13.0", (), {"CUDACXX": "/nonexistent/bin/nvcc"}),
}


class Configures:
    """Configures each scenario once. In a plain pytest run the first use starts all of them
    at once (they are independent); under pytest-xdist each worker runs only those its tests
    ask for, so no scenario runs twice."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.results: dict[str, dict] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.cmake_dir: Path | None = None
        self.lock = threading.Lock()

    def _configure(self, name: str, cmake_dir: Path) -> None:
        mode, torch_cuda, defines, env = SCENARIOS[name]
        build = self.base / name
        run_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TORCH_CUDA_ARCH_LIST", "FUSEDATTN_CUDA_ARCHITECTURES", "CUDAARCHS", "CUDAFLAGS")
        }
        run_env.update(CUDACXX=NVCC or "/nonexistent/bin/nvcc", CUDA_VISIBLE_DEVICES="")
        run_env.update(env)
        command = [
            CMAKE,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={NINJA}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTorch_DIR={cmake_dir / 'Torch'}",
            f"-DCaffe2_DIR={cmake_dir / 'Caffe2'}",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
            f"-DFUSEDATTN_CUDA={mode}",
            f"-DFUSEDATTN_TORCH_CUDA_VERSION_OVERRIDE={torch_cuda}",
            *(f"-D{d}" for d in defines),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=300)
        except subprocess.TimeoutExpired as error:
            result = subprocess.CompletedProcess(command, -1, str(error.stdout or ""), "configure timed out")
        commands_file = build / "compile_commands.json"
        commands = json.loads(commands_file.read_text()) if commands_file.exists() else []
        ninja_file = build / "build.ninja"
        self.results[name] = {
            "rc": result.returncode,
            "log": " ".join((result.stdout + result.stderr).split()),  # CMake wraps warnings
            "commands": commands,
            "ninja": ninja_file.read_text() if ninja_file.exists() else "",
        }

    def __getitem__(self, name: str) -> dict:
        with self.lock:
            if self.cmake_dir is None:
                self.cmake_dir = _fake_cuda_torch(self.base / "torch-prefix")
            names = [name]
            if not self.threads and not os.environ.get("PYTEST_XDIST_WORKER"):
                names = [n for n in SCENARIOS if NVCC_VERSION or n == "no_nvcc_auto"]
            for new in names:
                if new not in self.threads:
                    self.threads[new] = threading.Thread(target=self._configure, args=(new, self.cmake_dir))
                    self.threads[new].start()
        self.threads[name].join()
        return self.results[name]


@pytest.fixture(scope="module")
def configures(tmp_path_factory):
    return Configures(tmp_path_factory.mktemp("configures"))


def _cuda_commands(result: dict) -> list[str]:
    return [entry["command"] for entry in result["commands"] if entry["file"].endswith(".cu")]


def _compiled_codes(command: str) -> set[str]:
    """The sm_/compute_ targets an nvcc command line compiles for."""
    codes: set[str] = set()
    for match in re.finditer(r"(?:--generate-code|-gencode)[= ]\"?arch=\w+,code=\[?([\w,]+)\]?", command):
        codes.update(match.group(1).split(","))
    codes.update(re.findall(r"(?:^|\s)(?:-arch|--gpu-architecture)[= ](\S+)", command))
    return codes


def _build_info_archs(result: dict) -> str:
    registration = next(e["command"] for e in result["commands"] if e["file"].endswith("registration.cpp"))
    return re.search(r'FUSEDATTN_CUDA_ARCHS=\\?"([^"\\]*)', registration).group(1)


def _assert_compiled(result: dict, expected: set[str]) -> None:
    commands = _cuda_commands(result)
    assert commands, "no .cu file in compile_commands.json: the CUDA backend is off\n" + result["log"][-3000:]
    for command in commands:
        assert _compiled_codes(command) == expected, command
        assert "compute_50" not in command and "sm_50" not in command, command


@needs_nvcc
def test_torch_injected_gencode_flags_are_replaced(configures):
    result = configures["default"]
    assert result["rc"] == 0, result["log"][-3000:]
    # torch's cuda.cmake really ran and injected its default list, compute_50 included ...
    injected = re.search(r"Added CUDA NVCC flags for: (\S+)", result["log"])
    assert injected and "arch=compute_50,code=sm_50" in injected.group(1), result["log"][-3000:]
    assert re.search(r"removed torch's CUDA architecture flags \(-gencode arch=compute_50", result["log"])
    # ... and the kernels compile for the project's default only.
    _assert_compiled(result, {"sm_80", "compute_80", "sm_90", "compute_90"})
    assert _build_info_archs(result) == "sm_80+PTX,sm_90+PTX"
    assert "FUSEDATTN_CUDA_ENABLED=1" in result["ninja"]


@needs_nvcc
def test_torch_cuda_arch_list_is_honoured_in_auto_mode(configures):
    result = configures["torch_arch_list"]
    assert result["rc"] == 0, result["log"][-3000:]
    assert "fusedattn: compiling a test .cu file for 80-real;90 - works" in result["log"]
    _assert_compiled(result, {"sm_80", "sm_90", "compute_90"})
    assert _build_info_archs(result) == "sm_80,sm_90+PTX"


@needs_nvcc
def test_fusedattn_architectures_win_and_unsupported_ones_are_dropped(configures):
    result = configures["fusedattn_archs"]
    assert result["rc"] == 0, result["log"][-3000:]
    assert f"cannot compile CUDA architecture(s) {UNSUPPORTED} (from FUSEDATTN_CUDA_ARCHITECTURES)" in result["log"]
    _assert_compiled(result, {"sm_90", "compute_90"})
    assert _build_info_archs(result) == "sm_90+PTX"


@needs_nvcc
def test_torch_cuda_major_mismatch_gives_a_cpu_build_in_auto_mode(configures):
    result = configures["mismatch_auto"]
    assert result["rc"] == 0, result["log"][-3000:]
    assert f"building without the CUDA backend (CPU only): torch is built with CUDA {OTHER_MAJOR}" in result["log"]
    _assert_cpu_only(result)


@needs_nvcc
def test_torch_cuda_major_mismatch_is_an_error_when_forced_on(configures):
    result = configures["mismatch_on"]
    assert result["rc"] != 0
    assert "FUSEDATTN_CUDA=ON, but torch is built with CUDA" in result["log"]
    assert "Point CUDACXX (or -DCMAKE_CUDA_COMPILER) at the nvcc of a" in result["log"]


def _assert_cpu_only(result: dict) -> None:
    assert result["rc"] == 0, result["log"][-3000:]
    assert not _cuda_commands(result)
    assert _build_info_archs(result) == ""
    assert "FUSEDATTN_CUDA_ENABLED=0" in result["ninja"]
    # torch's CUDA cmake never ran, and nothing links a CUDA runtime.
    assert "PyTorch: CUDA detected" not in result["log"]
    assert "cudart" not in result["ninja"]


@needs_nvcc
def test_a_cuda_compile_failure_at_configure_gives_a_cpu_build_in_auto_mode(configures):
    result = configures["probe_fails"]
    assert "fusedattn: compiling a test .cu file for 80;90 - failed" in result["log"]
    assert "building without the CUDA backend (CPU only): a test .cu file does not compile" in result["log"]
    _assert_cpu_only(result)


@pytest.mark.skipif(NINJA is None, reason="needs ninja")
def test_a_cuda_torch_without_nvcc_gives_a_cpu_build_in_auto_mode(configures):
    result = configures["no_nvcc_auto"]
    assert "building without the CUDA backend (CPU only): no working CUDA compiler" in result["log"]
    _assert_cpu_only(result)


# ---- setup.py: the AUTO fallback -----------------------------------------------------------


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("fusedattn_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not called
    return module


class FakeRunner:
    """Records commands; fails those for which `fails(command, index)` is true."""

    def __init__(self, fails) -> None:
        self.fails = fails
        self.calls: list[list[str]] = []

    def __call__(self, command, check):
        assert check
        self.calls.append(list(command))
        if self.fails(command, len(self.calls) - 1):
            raise subprocess.CalledProcessError(1, command)


def _is_build(command) -> bool:
    return "--build" in command


def _write_cache(build_dir: Path, cuda_built: str) -> None:
    (build_dir / "CMakeCache.txt").write_text(
        f"FUSEDATTN_CUDA:STRING=AUTO\nFUSEDATTN_CUDA_BUILT:INTERNAL={cuda_built}\n"
    )


@pytest.mark.parametrize(
    ("args", "mode"),
    [
        ([], "AUTO"),
        (["-DFUSEDATTN_CUDA=ON"], "ON"),
        (["-DFUSEDATTN_CUDA:STRING=off"], "OFF"),
        (["-D", "FUSEDATTN_CUDA=1"], "ON"),
        (["-DFUSEDATTN_CUDA=ON", "-DFUSEDATTN_CUDA=AUTO"], "AUTO"),
        (["-DFUSEDATTN_CUDA_ARCHITECTURES=90"], "AUTO"),
    ],
)
def test_setup_reads_the_cuda_mode(setup_module_, args, mode):
    assert setup_module_.cuda_mode(["cmake", "-S", ".", *args]) == mode


def test_setup_falls_back_to_cpu_when_the_cuda_build_fails(setup_module_, tmp_path):
    _write_cache(tmp_path, "ON")
    runner = FakeRunner(lambda command, index: _is_build(command) and index == 1)
    warnings: list[str] = []
    configure, build = ["cmake", "-S", ".", "-B", str(tmp_path)], ["cmake", "--build", str(tmp_path)]
    assert setup_module_.run_cmake(configure, build, tmp_path, run=runner, warn=warnings.append) is False
    assert runner.calls == [
        [*configure, "-DFUSEDATTN_CUDA=AUTO"],
        build,
        [*configure, "-DFUSEDATTN_CUDA=AUTO", "-DFUSEDATTN_CUDA=OFF"],
        build,
    ]
    assert len(warnings) == 1 and "without the CUDA backend" in warnings[0]


def test_setup_falls_back_to_cpu_when_the_cuda_configure_fails(setup_module_, tmp_path):
    runner = FakeRunner(lambda command, index: index == 0)
    configure, build = ["cmake", "-B", str(tmp_path)], ["cmake", "--build", str(tmp_path)]
    assert setup_module_.run_cmake(configure, build, tmp_path, run=runner, warn=lambda text: None) is False
    assert runner.calls == [
        [*configure, "-DFUSEDATTN_CUDA=AUTO"],
        [*configure, "-DFUSEDATTN_CUDA=AUTO", "-DFUSEDATTN_CUDA=OFF"],
        build,
    ]


def test_setup_never_retries_a_forced_cuda_build(setup_module_, tmp_path):
    _write_cache(tmp_path, "ON")
    runner = FakeRunner(lambda command, index: _is_build(command))
    configure = ["cmake", "-B", str(tmp_path), "-DFUSEDATTN_CUDA=ON"]
    with pytest.raises(subprocess.CalledProcessError):
        setup_module_.run_cmake(configure, ["cmake", "--build", "x"], tmp_path, run=runner, warn=pytest.fail)
    assert runner.calls == [configure, ["cmake", "--build", "x"]]


def test_setup_does_not_retry_a_failed_cpu_only_build(setup_module_, tmp_path):
    _write_cache(tmp_path, "OFF")  # AUTO had already turned CUDA off: nothing to fall back to
    runner = FakeRunner(lambda command, index: _is_build(command))
    with pytest.raises(subprocess.CalledProcessError):
        setup_module_.run_cmake(["cmake"], ["cmake", "--build", "x"], tmp_path, run=runner, warn=pytest.fail)
    assert len(runner.calls) == 2


def test_setup_succeeds_without_retrying(setup_module_, tmp_path):
    runner = FakeRunner(lambda command, index: False)
    assert setup_module_.run_cmake(["cmake"], ["cmake", "--build", "x"], tmp_path, run=runner, warn=pytest.fail)
    assert runner.calls == [["cmake", "-DFUSEDATTN_CUDA=AUTO"], ["cmake", "--build", "x"]]
