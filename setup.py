"""Builds fusedattn: maps the Python packages and runs CMake for fusedattn._C.

Sources, flags and options live in CMakeLists.txt alone. Extra CMake options come from
the environment: FUSEDATTN_CMAKE_ARGS (for example "-DFUSEDATTN_CUDA=OFF").
With FUSEDATTN_CUDA=AUTO (the default), a configure or build that fails while the CUDA
backend is on is redone without it (docs/building.md).
"""

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cuda_mode(cmake_args: Sequence[str]) -> str:
    """The FUSEDATTN_CUDA value (AUTO, ON or OFF) that CMake arguments set; AUTO when none does."""
    mode = "AUTO"
    for index, arg in enumerate(cmake_args):
        definition = arg[2:] if arg.startswith("-D") else None
        if definition == "" and index + 1 < len(cmake_args):
            definition = cmake_args[index + 1]  # "-D" "FUSEDATTN_CUDA=ON"
        match = re.fullmatch(r"FUSEDATTN_CUDA(?::[A-Za-z]+)?=(.*)", definition or "")
        if match:
            value = match.group(1).strip().upper()
            mode = {"1": "ON", "TRUE": "ON", "YES": "ON", "0": "OFF", "FALSE": "OFF", "NO": "OFF"}.get(value, value)
    return mode


def cmake_cache_value(build_dir: Path, name: str) -> str | None:
    """A variable's value in build_dir/CMakeCache.txt, or None."""
    try:
        text = (Path(build_dir) / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return None
    match = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", text, re.MULTILINE)
    return match.group(1) if match else None


def run_cmake(
    configure: list[str],
    build: list[str],
    build_dir: Path,
    run: Callable[..., object] = subprocess.run,
    warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> bool:
    """Configures and builds; returns whether the CUDA backend could stay as asked.

    In AUTO mode a failed configure, or a failed build of a configuration with CUDA on, is
    redone in the same build dir with -DFUSEDATTN_CUDA=OFF (CPU backend only) after a
    warning. ON and OFF never retry: their failures are the user's to see.
    """
    mode = cuda_mode(configure)
    if mode == "AUTO":
        # Explicit, so that a fallback's OFF left in the cache never sticks to later builds.
        configure = [*configure, "-DFUSEDATTN_CUDA=AUTO"]
    step = "configure"
    try:
        run(configure, check=True)
        step = "build"
        run(build, check=True)
        return True
    except subprocess.CalledProcessError:
        cuda_was_on = cmake_cache_value(build_dir, "FUSEDATTN_CUDA_BUILT") == "ON"
        if mode != "AUTO" or (step == "build" and not cuda_was_on):
            raise
    warn(
        "\n"
        f"*** fusedattn: the {step} step failed with FUSEDATTN_CUDA=AUTO (see above); building again "
        "without the CUDA backend (CPU backend only). FUSEDATTN_CMAKE_ARGS=-DFUSEDATTN_CUDA=ON makes "
        "this an error instead; see docs/building.md. ***\n"
    )
    run([*configure, "-DFUSEDATTN_CUDA=OFF"], check=True)
    run(build, check=True)
    return False


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        configure += shlex.split(os.environ.get("FUSEDATTN_CMAKE_ARGS", ""))
        try:
            import ninja  # noqa: F401

            configure += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        run_cmake(configure, ["cmake", "--build", str(build_dir), "--parallel", jobs], build_dir)


packages = (
    find_packages("python") + ["fusedattn.kernels"] + ["fusedattn.kernels." + p for p in find_packages("kernels")]
)
package_dir = {"": "python", "fusedattn.kernels": "kernels"}

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import run_cmake
    setup(
        packages=packages,
        package_dir=package_dir,
        ext_modules=[CMakeExtension("fusedattn._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
