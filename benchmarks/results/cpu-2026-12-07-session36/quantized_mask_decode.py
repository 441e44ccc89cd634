"""python quantized_mask_decode.py: one decode step from an int8 cache with a key-padding
mask (the bench's: up to a quarter of each sequence's keys hidden at its end), median ms of
15 rounds of 20 calls, for the fusedattn package on PYTHONPATH. Two threads."""

import statistics
import time

import fusedattn
import torch

torch.set_num_threads(2)
torch.manual_seed(0)
for batch, heads_q, heads_kv, keys in ((8, 8, 2, 4096), (1, 32, 8, 32768)):
    q = torch.randn(batch, heads_q, 1, 128, dtype=torch.bfloat16)
    k, k_descale = fusedattn.quantize_kv(torch.randn(batch, heads_kv, keys, 128, dtype=torch.bfloat16), torch.int8)
    v, v_descale = fusedattn.quantize_kv(torch.randn(batch, heads_kv, keys, 128, dtype=torch.bfloat16), torch.int8)
    lengths = torch.tensor([keys - ((b + 1) * keys) // (4 * batch) for b in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]

    def call(q=q, k=k, v=v, mask=mask, k_descale=k_descale, v_descale=v_descale):
        return fusedattn.attention(q, k, v, attn_mask=mask, k_descale=k_descale, v_descale=v_descale)

    for _ in range(5):
        call()
    rounds = []
    for _ in range(15):
        began = time.perf_counter()
        for _ in range(20):
            call()
        rounds.append((time.perf_counter() - began) / 20 * 1e3)
    print(f"int8 B{batch} H{heads_q}:{heads_kv} Sk{keys} D128 padding mask: {statistics.median(rounds):.3f} ms")
