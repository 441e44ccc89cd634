"""How many Triton kernels a GPU run of the Triton tests compiles, measured here.

Runs the given pytest arguments (default: tests/test_triton_backend.py) under the
interpreter with every kernel launch recorded, and counts the distinct specializations a
GPU launch would compile: the kernel, its constexpr arguments, the dtypes of its tensor
arguments, and Triton's integer specializations (== 1, divisible by 16). The forward
kernel is autotuned on a GPU, so each of its specializations counts once per config of its
autotune list (USE_TMA launches on Hopper included). The device script sizes its test
step from this count.

    python scripts/count_test_compiles.py [PYTEST ARGS...] [--json PATH]
"""

from __future__ import annotations

import collections
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _key(kernel_name: str, arguments: dict) -> tuple:
    parts = []
    for name, value in sorted(arguments.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype)))
        elif isinstance(value, bool) or isinstance(value, str):
            parts.append((name, value))
        elif isinstance(value, int):
            parts.append((name, "one" if value == 1 else ("div16" if value % 16 == 0 else "int")))
        elif isinstance(value, float):
            parts.append((name, "float"))
    return (kernel_name, tuple(parts))


class Recorder:
    def __init__(self) -> None:
        self.keys: dict[tuple, int] = {}
        self.per_test: collections.Counter[str] = collections.Counter()
        self.current = ""

    def pytest_runtest_setup(self, item) -> None:
        self.current = item.nodeid
        from fusedattn.kernels import attention_backward, attention_decode, attention_forward, configs

        for module in (attention_forward, attention_backward, attention_decode):
            original = module.launch
            if getattr(original, "_recording", False):
                continue

            def recording(kernel, grid, _original=original, **arguments):
                name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
                key = _key(name, arguments)
                if key not in self.keys:
                    copies = 1
                    if name == "attention_forward_kernel":
                        heavy = (
                            arguments.get("MASK_KIND", 0) != 0
                            or arguments.get("HAS_DROPOUT")
                            or arguments.get("HAS_SOFTCAP")
                        )
                        block = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
                        dtype = arguments["Q"].dtype
                        precision = arguments.get("INPUT_PRECISION", "ieee")
                        copies = len(configs.forward_configs(block, dtype, bool(heavy), precision=precision))
                    self.keys[key] = copies
                    self.per_test[self.current] += copies
                return _original(kernel, grid, **arguments)

            recording._recording = True
            module.launch = recording


def main() -> int:
    argv = sys.argv[1:]
    json_path = None
    if "--json" in argv:
        index = argv.index("--json")
        json_path = argv[index + 1]
        del argv[index : index + 2]
    recorder = Recorder()
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", *(argv or ["tests/test_triton_backend.py"])], plugins=[recorder]
    )
    total = sum(recorder.keys.values())
    by_kernel = collections.Counter()
    for (name, _), copies in recorder.keys.items():
        by_kernel[name] += copies
    print(f"distinct GPU compiles: {total} ({dict(by_kernel)})")
    for test, count in recorder.per_test.most_common(10):
        print(f"  {count:4d}  {test}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(
                {"total": total, "by_kernel": dict(by_kernel), "per_test": dict(recorder.per_test)}, handle, indent=1
            )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
