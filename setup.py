"""Builds fusedattn: maps the Python packages and runs CMake for fusedattn._C.

Sources, flags and options live in CMakeLists.txt alone. Extra CMake options come from
the environment: FUSEDATTN_CMAKE_ARGS (for example "-DFUSEDATTN_CUDA=OFF").
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


packages = find_packages("python") + ["fusedattn.kernels"] + [
    "fusedattn.kernels." + p for p in find_packages("kernels")
]
package_dir = {"": "python", "fusedattn.kernels": "kernels"}

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[CMakeExtension("fusedattn._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
