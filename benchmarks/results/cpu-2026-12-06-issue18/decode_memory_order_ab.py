"""A/B of one thread's CPU time of a decode step, two builds alternated (issue 18 item 4).

Runs decode_cycles_per_key.py (B1 H32:8 Sq1 D128, bf16 queries; CACHE bf16 / int8 / e4m3)
in a fresh process per measurement with OMP_NUM_THREADS=1, alternating the builds named on
the command line as NAME=PYTHONPATH, optionally with extra environment (NAME=PATH,VAR=VALUE),
for ROUNDS rounds, and appends one JSON line per measurement to OUTPUT:

    python decode_memory_order_ab.py OUTPUT ROUNDS CACHES SIZES base=/tmp/base/python new=/tmp/wt/python
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("decode_cycles_per_key.py")


def main() -> None:
    output, rounds, caches, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
    builds = []
    for argument in sys.argv[5:]:
        name, _, spec = argument.partition("=")
        path, *settings = spec.split(",")
        builds.append((name, path, dict(setting.split("=", 1) for setting in settings)))
    with open(output, "a") as sink:
        for round_index in range(rounds):
            for cache in caches:
                for size in sizes:
                    for name, path, settings in builds:
                        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **settings)
                        line = subprocess.run(
                            [sys.executable, str(SCRIPT), cache, size],
                            env=env,
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout.split()
                        record = {
                            "round": round_index,
                            "build": name,
                            "settings": settings,
                            "cache": cache,
                            "shape": f"B1 H32:8 Sq1 Sk{size} D128",
                            "threads": 1,
                            "cpu_ms": float(line[2]),
                            "gb_per_s_one_thread": float(line[4]),
                            "load_average": os.getloadavg()[0],
                        }
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                        print(round_index, name, settings, cache, size, line[2], "ms", f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
