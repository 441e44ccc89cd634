#!/bin/sh
# One thread's CPU time per decode step (B1 H32:8 D128, bf16 queries; fp32 for fp32), the
# base build (7a16f30, before session 33) and this build alternated, two rounds:
#   sh decode_ab.sh BASE_PYTHON_DIR NEW_PYTHON_DIR >> decode_ab_1thread.txt
base=$1 new=$2 here=$(dirname "$0") python=${PYTHON:-/work/main/.venv/bin/python}
script=$here/../cpu-2026-12-06-issue18/decode_cycles_per_key.py
uptime
for round in 1 2; do
  for sk in 4096 32768; do
    for dtype in fp32 bf16 int8 e4m3; do
      printf 'base '; OMP_NUM_THREADS=1 PYTHONPATH=$base $python $script $dtype $sk
      printf 'new  '; OMP_NUM_THREADS=1 PYTHONPATH=$new $python $script $dtype $sk
    done
  done
done
uptime
