"""Multi-head decode steps (no GQA) against torch SDPA on the same inputs (issue 16): the
cases of decode_vs_sdpa.py with as many KV heads as query heads (B1 H32 and B8 H8).

    python decode_multihead_vs_sdpa.py THREADS float32,bfloat16 > decode_multihead_vs_sdpa_....txt
"""

from decode_vs_sdpa import main

if __name__ == "__main__":
    main([(1, 32, 32), (8, 8, 8)])
