"""The `fusedattn` command: `fusedattn info`, and the subcommands of other modules.

Each subcommand lives in its own module with add_arguments(parser) and
main(args) -> int; this table maps names to those modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fusedattn.info", "versions, devices, build facts and backend availability"),
    "bench": ("fusedattn.bench.cli", "benchmark latency, TFLOP/s and memory against torch SDPA; compare reports"),
    "parity": ("fusedattn.parity.cli", "check every backend against the float64 reference on a seeded case grid"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedattn", description="fused attention kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits 2 on bad arguments, which is our documented code as well.
        return int(exit_request.code or 0)
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
