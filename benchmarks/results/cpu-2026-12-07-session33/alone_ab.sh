#!/bin/sh
# Single calls alone, the base build (7a16f30, before session 33) and this build alternated:
#   sh alone_ab.sh BASE_PYTHON_DIR NEW_PYTHON_DIR THREADS >> alone_ab.txt
base=$1 new=$2 threads=$3 here=$(dirname "$0") python=${PYTHON:-/work/main/.venv/bin/python}
uptime
for case in 1,32,32,16,64 1,32,32,16,128 8,8,8,16,64 8,8,2,16,128 1,32,8,4096,128 1,32,32,32768,64 8,8,2,4096,64; do
  printf 'threads %s base ' "$threads"; OMP_NUM_THREADS=$threads PYTHONPATH=$base $python $here/decode_gqa_one_case.py $case
  printf 'threads %s new  ' "$threads"; OMP_NUM_THREADS=$threads PYTHONPATH=$new $python $here/decode_gqa_one_case.py $case
done
uptime
