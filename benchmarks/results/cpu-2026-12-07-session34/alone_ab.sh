#!/bin/sh
# Single decode calls alone, the base build (ce2cda4, session 33's last) and this build
# alternated, one thread by default (fusedattn against torch SDPA, session 33's script):
#   sh alone_ab.sh BASE_PYTHON_DIR NEW_PYTHON_DIR [THREADS] >> alone_ab.txt
# SMALL=1 times only the four fp32 Sk 16 multi-head calls.
base=$1 new=$2 threads=${3:-1} here=$(dirname "$0") python=${PYTHON:-/work/main/.venv/bin/python}
one=$here/../cpu-2026-12-07-session33/decode_gqa_one_case.py
cases='1,32,32,16,64 1,32,32,16,128 8,8,8,16,64 8,8,8,16,128'
[ -z "$SMALL" ] && cases="$cases 1,32,32,16,128_bf16 1,32,8,16,128 8,32,32,32,128 8,32,32,64,128 8,32,32,128,128 8,32,32,128,128_bf16"
uptime
for case in $cases; do
  for tree in base new; do
    dir=$base; [ $tree = new ] && dir=$new
    printf 'threads %s %-4s ' "$threads" $tree; OMP_NUM_THREADS=$threads PYTHONPATH=$dir $python $one $(echo $case | tr _ ' ')
  done
done
uptime
