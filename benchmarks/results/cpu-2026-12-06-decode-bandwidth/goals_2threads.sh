#!/bin/sh
# The issue-16 decode goals with two threads (wall time), the copy bandwidth before and after:
#   sh goals_2threads.sh TREE_PYTHON_DIR SUFFIX
tree=$1 suffix=$2 here=$(dirname "$0") python=${PYTHON:-/work/main/.venv/bin/python}
copy() { PYTHONPATH=$tree $python -c "import torch; torch.set_num_threads(2); from fusedattn.bench.ceilings import copy_gb_per_s; print('copy GB/s (read + write, 2 threads, 256 MiB):', round(copy_gb_per_s(torch.device('cpu')), 1))"; }
{ uptime; copy; PYTHONPATH=$tree $python $here/decode_vs_sdpa.py 2 float32,bfloat16; copy; uptime; } > $here/decode_vs_sdpa_2threads_$suffix.txt 2>&1
{ uptime; PYTHONPATH=$tree $python $here/decode_multihead_vs_sdpa.py 2 float32; copy; uptime; } > $here/decode_multihead_vs_sdpa_2threads_$suffix.txt 2>&1
