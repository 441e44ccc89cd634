#!/bin/sh
# A/B of two builds, alternated, one thread (OLD and NEW: folders holding the fusedattn package):
#   sh decode_stream_ab.sh OLD NEW > decode_stream_ab_1thread.jsonl
old=$1 new=$2 here=$(dirname "$0") python=${PYTHON:-/work/main/.venv/bin/python}
for round in 1 2; do
  for case in "fp32 1024" "fp32 4096" "fp32 32768" "bf16 1024" "bf16 4096" "bf16 32768" \
              "fp32 4096 1 32 32 128" "fp32 4096 8 8 8 64" "fp32 512 1 32 32 64"; do
    for build in old new; do
      if [ $build = old ]; then path=$old; else path=$new; fi
      echo "{\"build\": \"$build\", \"round\": $round, \"load\": \"$(cut -d' ' -f1 /proc/loadavg)\", \"result\": $(OMP_NUM_THREADS=1 PYTHONPATH=$path $python $here/decode_stream_ab.py $case)}"
    done
  done
done
