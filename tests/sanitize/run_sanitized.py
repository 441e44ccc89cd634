"""Run CPU backend tests (or a module's main) against a sanitizer build of fusedattn._C.

Usage: python tests/sanitize/run_sanitized.py PATH/TO/_C.so [pytest arguments...]
       python tests/sanitize/run_sanitized.py PATH/TO/_C.so --module tests.fuzz [its arguments...]
The sanitized extension is installed as fusedattn._C before fusedattn is imported, so the
normal editable build is never touched. With --module, the module runs as `python -m` would
run it, and FUSEDATTN_FUZZ_NATIVE_LIBRARY names the library so that the processes it starts
(the fuzz runner's workers) install it too. scripts/sanitize.sh runs this under LD_PRELOAD
of libasan/libubsan.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys


def install_extension(library: str) -> None:
    """Load library as fusedattn._C (before fusedattn is imported) and check it is sanitized."""
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    loader = importlib.machinery.ExtensionFileLoader("fusedattn._C", library)
    spec = importlib.util.spec_from_file_location("fusedattn._C", library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["fusedattn._C"] = module
    import fusedattn

    assert fusedattn._native.build_info().get("sanitizers"), "the loaded extension is not a sanitizer build"


def main() -> int:
    library, *arguments = sys.argv[1:]
    if arguments[:1] == ["--module"]:
        module_name, *module_arguments = arguments[1:]
        os.environ["FUSEDATTN_FUZZ_NATIVE_LIBRARY"] = os.path.abspath(library)
        sys.path.insert(0, os.getcwd())  # the module is named from the repository root
        install_extension(library)
        sys.argv = [module_name, *module_arguments]
        try:
            runpy.run_module(module_name, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        return 0
    install_extension(library)
    import pytest

    return pytest.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
