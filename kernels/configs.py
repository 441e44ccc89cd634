"""Block sizes, warps and stages for the attention kernels.

On a GPU the forward kernel is autotuned over a short list chosen by head dim, dtype and
features (pruned by hand: at most four configs, so a first call tunes in seconds), and
the autotuner keys on the GPU, the padded head dims, the features and the sequence
length bucket. Backward and decode use one heuristic config each. Under the Triton
interpreter every kernel gets one small config: the interpreter runs each program in
Python, so autotuning there would only multiply test time.
"""

from __future__ import annotations

from functools import cache

import torch
import triton

from .utils import interpreting

INTERPRETER_BLOCK = 16


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, for bf16 / fp16 without
# and with the heavy features (mask, dropout, softcap). Every one compiles for sm_90 with
# Triton 3.6 and 3.9, with and without TMA, at zero register spills and within the shared
# memory limit (scripts/device_compile_check.py; results in benchmarks/results/triton-compile/).
# No num_stages=2 here: the ptxas of Triton 3.6 (CUDA 12.8) crashes (SIGSEGV) on the TMA +
# wgmma kernel pipelined over two stages. Heavy features get narrower tiles or more warps:
# the old 4-warp tiles spilled. The lists serve the TMA and the plain-load kernel alike.
_HALF_CONFIGS = {
    64: (
        ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)),
        ((64, 64, 4, 3), (128, 64, 8, 3)),
    ),
    128: (
        ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)),
        ((64, 32, 8, 3), (128, 32, 8, 3)),
    ),
    256: (
        ((64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3)),
        ((32, 32, 8, 3), (64, 16, 8, 3)),
    ),
}
# fp32 tiles take twice the shared memory, and its exact ("ieee") dots run on FMAs (no
# wgmma: two stages compile with TMA too). They spill heavily (unrolled FMA dots); kept as
# they were.
_FLOAT32_CONFIGS = {
    64: ((64, 64, 4, 3), (128, 32, 4, 3)),
    128: ((64, 32, 4, 2), (64, 64, 4, 2)),
    256: ((32, 32, 4, 1), (64, 32, 4, 1)),
}


@cache
def forward_configs(block_d: int, dtype: torch.dtype, heavy_features: bool) -> tuple[triton.Config, ...]:
    """A few forward configs for a padded head dim and dtype (the same for the TMA and the
    plain-load kernel). Masks / dropout / softcap add registers: those get narrower tiles.
    """
    bucket = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    if dtype == torch.float32:
        chosen = _FLOAT32_CONFIGS[bucket]
    else:
        chosen = _HALF_CONFIGS[bucket][1 if heavy_features else 0]
    return tuple(_config(*config) for config in chosen)


def backward_config(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_M, BLOCK_N, num_warps, num_stages for the dK/dV and dQ kernels."""
    if interpreting():
        return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_d > 128:
        return dict(BLOCK_M=32, BLOCK_N=64 if block_d <= 64 else 32, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def decode_config(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_N, num_warps, num_stages of the split-KV decode kernel (BLOCK_M is the query rows)."""
    if interpreting():
        return dict(BLOCK_N=INTERPRETER_BLOCK, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_d > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def sequence_bucket(seqlen: int) -> int:
    """Autotune key for sequence length: the power of two at or above it (capped)."""
    return min(triton.next_power_of_2(max(seqlen, 1)), 16384)


@cache
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
