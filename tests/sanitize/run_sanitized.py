"""Run CPU backend tests against a sanitizer build of fusedattn._C.

Usage: python tests/sanitize/run_sanitized.py PATH/TO/_C.so [pytest arguments...]
The sanitized extension is installed as fusedattn._C before fusedattn is imported, so the
normal editable build is never touched. scripts/sanitize.sh runs this under LD_PRELOAD
of libasan/libubsan.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys


def main() -> int:
    library, *pytest_arguments = sys.argv[1:]
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    loader = importlib.machinery.ExtensionFileLoader("fusedattn._C", library)
    spec = importlib.util.spec_from_file_location("fusedattn._C", library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["fusedattn._C"] = module
    import fusedattn

    assert fusedattn._native.build_info().get("sanitizers"), "the loaded extension is not a sanitizer build"
    import pytest

    return pytest.main(pytest_arguments)


if __name__ == "__main__":
    sys.exit(main())
