"""One process, one thread: attention forward + backward over q (1, 4, 4096, 64) and k, v
(1, 2, 4096, 64) as one call, or cut into query parts x key pieces (the ring's blocks).

    .venv/bin/python benchmarks/results/cpu-2026-12-06-issue17/block_split.py

Prints "query parts, key pieces, seconds" twice (interleaved repeats against noise).
"""

import time

import fusedattn
import torch

torch.set_num_threads(1)
LENGTH = 4096
q = torch.randn(1, 4, LENGTH, 64, requires_grad=True)
k = torch.randn(1, 2, LENGTH, 64, requires_grad=True)
v = torch.randn(1, 2, LENGTH, 64, requires_grad=True)


def run(query_parts: int, key_pieces: int) -> float:
    start = time.perf_counter()
    for i in range(query_parts):
        rows = slice(i * LENGTH // query_parts, (i + 1) * LENGTH // query_parts)
        for j in range(key_pieces):
            keys = slice(j * LENGTH // key_pieces, (j + 1) * LENGTH // key_pieces)
            fusedattn.attention(q[:, :, rows], k[:, :, keys], v[:, :, keys]).sum().backward()
    return time.perf_counter() - start


for _repeat in range(2):
    for query_parts, key_pieces in [(1, 1), (1, 16), (4, 16), (2, 8), (4, 4)]:
        print(query_parts, key_pieces, round(run(query_parts, key_pieces), 3), flush=True)
