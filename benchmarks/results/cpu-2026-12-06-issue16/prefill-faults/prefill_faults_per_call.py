"""Minor page faults per call (one call after two warm-up calls) of fusedattn (the
repeated-call plan) and SDPA over the prefill cases of cpu-every-size.toml, with the
grid's fixed mmap threshold (128 KiB, as bench/measure.py sets it).

    OMP_NUM_THREADS=2 .venv/bin/python prefill_faults_per_call.py > prefill_faults_per_call-2threads-fixed.txt
"""

import ctypes
import resource

import torch
from fusedattn.api import attention

ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def faults(function) -> int:
    function()
    function()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    function()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


cases = []
for seqlen in (128, 512, 2048):
    for heads in (4, 32):
        for dim in (64, 128):
            for dtype in (torch.float32, torch.bfloat16):
                for causal in (False, True):
                    cases.append((2048 // seqlen, heads, heads, seqlen, dim, dtype, causal))
for seqlen in (128, 2048):
    for dim in (64, 128):
        for dtype in (torch.float32, torch.bfloat16):
            cases.append((2048 // seqlen, 32, 8, seqlen, dim, dtype, True))
for batch, heads, heads_kv, seqlen, dim, dtype, causal in cases:
    q = torch.randn(batch, heads, seqlen, dim).to(dtype)
    k = torch.randn(batch, heads_kv, seqlen, dim).to(dtype)
    v = torch.randn(batch, heads_kv, seqlen, dim).to(dtype)

    def ours(q=q, k=k, v=v, causal=causal):
        return attention(q, k, v, causal=causal, backend="cpu")

    def sdpa(q=q, k=k, v=v, causal=causal, gqa=heads != heads_kv):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    name = f"B{batch} H{heads}:{heads_kv} S{seqlen} D{dim} {str(dtype)[6:]} {'causal' if causal else ''}"
    pages = q.numel() * q.element_size() // 4096
    print(f"{name}: ours {faults(ours)} sdpa {faults(sdpa)} (out pages {pages})", flush=True)
