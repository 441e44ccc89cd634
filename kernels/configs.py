"""Block sizes, warps and stages for the attention kernels.

On a GPU the forward kernel is autotuned over a short list chosen by head dim, dtype and
features (pruned by hand: at most four configs, so a first call tunes in seconds), and
the autotuner keys on the GPU, the padded head dims, the features and the sequence
length bucket. Backward (one config per kernel) and decode use fixed configs. Under the Triton
interpreter every kernel gets one small config: the interpreter runs each program in
Python, so autotuning there would only multiply test time.
"""

from __future__ import annotations

from functools import cache

import torch
import triton

from .utils import interpreting

INTERPRETER_BLOCK = 16


def head_dim_bucket(block_d: int) -> int:
    """The config table a padded head dim reads: 64, 128, 256, 512 or 1024 (576 pads to 1024)."""
    return next(bucket for bucket in (64, 128, 256, 512, 1024) if block_d <= bucket)


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
    512: (((32, 32, 8, 1), (32, 16, 8, 1)), ((32, 16, 8, 1), (16, 32, 8, 1))),
    1024: (((32, 16, 8, 1), (16, 16, 8, 1)), ((16, 16, 8, 1),)),
}
# fp32 tiles take twice the shared memory. With TF32 dots (torch's policy allows them:
# kernels/utils.py input_precision) they run on the tensor cores; exact IEEE dots run on
# FMAs, which Triton unrolls in registers: those get small tiles over 8 warps (the 4-warp
# tiles of old spilled 144-1782 bytes with Triton 3.6). Every one of these compiles for
# sm_90 without spills in every feature class (benchmarks/results/triton-compile/).
_FLOAT32_CONFIGS = {
    "tf32": {
        64: ((64, 64, 4, 3), (64, 64, 8, 3)),
        128: ((32, 64, 8, 2), (32, 32, 4, 2)),
        256: ((32, 64, 8, 1), (32, 32, 8, 1)),
        512: ((16, 32, 8, 1),),
        1024: ((16, 16, 8, 1),),
    },
    "ieee": {
        64: ((32, 64, 8, 2),),
        128: ((16, 32, 8, 2),),
        256: ((16, 32, 8, 1),),
        512: ((16, 16, 8, 1),),
        1024: ((16, 16, 8, 1),),
    },
}


@cache
def forward_configs(
    block_d: int, dtype: torch.dtype, heavy_features: bool, precision: str = "ieee"
) -> tuple[triton.Config, ...]:
    """A few forward configs for a padded head dim and dtype (the same for the TMA and the
    plain-load kernel). Masks / dropout / softcap add registers: those get narrower tiles.
    precision is the fp32 dots' input precision ("tf32" or "ieee"; ignored for fp16/bf16).
    """
    bucket = head_dim_bucket(block_d)
    if dtype == torch.float32:
        chosen = _FLOAT32_CONFIGS[precision][bucket]
    else:
        chosen = _HALF_CONFIGS[bucket][1 if heavy_features else 0]
    return tuple(_config(*config) for config in chosen)


# Backward (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, for bf16 / fp16,
# each (without heavy features, with them): the dK/dV kernel first, the dQ kernel second.
# The two kernels want different shapes: dK/dV holds BLOCK_N keys (its dK, dV accumulators)
# and runs its dots in the transposed orientation, where BLOCK_N is the wgmma M dimension,
# so it takes many keys and few queries per step; dQ holds BLOCK_M query rows. Chosen by
# compiling candidates for sm_90 with Triton 3.6 (scripts/device_compile_check.py) for the
# fewest spills; results in benchmarks/results/triton-compile/.
_HALF_BACKWARD_CONFIGS = {
    64: (((32, 128, 8, 2), (32, 128, 8, 2)), ((64, 64, 8, 2), (64, 64, 8, 2))),
    128: (((32, 128, 8, 2), (16, 128, 8, 2)), ((64, 64, 8, 2), (64, 64, 8, 2))),
    256: (((64, 32, 8, 1), (64, 32, 8, 1)), ((32, 64, 8, 1), (32, 64, 8, 1))),
    512: (((32, 16, 8, 1), (32, 16, 8, 1)), ((16, 32, 8, 1), (16, 32, 8, 1))),
    1024: (((16, 16, 8, 1), (16, 16, 8, 1)), ((16, 16, 8, 1), (16, 16, 8, 1))),
}
# fp32: small tiles over 8 warps, one stage (its exact dots unroll to FMAs in registers;
# the 4-warp 32x64 / 32x32 tiles of old spilled up to 4892 bytes with Triton 3.6).
_FLOAT32_BACKWARD_CONFIGS = {
    64: ((32, 32, 8, 1), (32, 32, 8, 1)),
    128: ((16, 16, 8, 1), (32, 32, 8, 1)),
    256: ((16, 16, 8, 1), (16, 16, 8, 1)),
    512: ((16, 16, 8, 1), (16, 16, 8, 1)),
    1024: ((16, 16, 8, 1), (16, 16, 8, 1)),
}


def _launch_config(block_m: int, block_n: int, warps: int, stages: int) -> dict[str, int]:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# Head dims that are not a power of two (72, 40, 96...) load with a mask on the head dim
# and lose the 16-element stride hint: the dK/dV kernel then needs fewer keys per program.
_RAGGED_HALF_DKDV_CONFIG = (32, 64, 8, 2)


def backward_configs(
    block_d: int, dtype: torch.dtype, heavy_features: bool, ragged_head_dims: bool = False
) -> tuple[dict[str, int], dict[str, int]]:
    """(dK/dV kernel, dQ kernel) launch configs: BLOCK_M, BLOCK_N, num_warps, num_stages.
    ragged_head_dims: D or Dv is below its padded block (not a power of two)."""
    if interpreting():
        small = _launch_config(INTERPRETER_BLOCK, INTERPRETER_BLOCK, 4, 1)
        return small, small
    bucket = head_dim_bucket(block_d)
    if dtype == torch.float32:
        return tuple(_launch_config(*config) for config in _FLOAT32_BACKWARD_CONFIGS[bucket])
    dkdv, dq = _HALF_BACKWARD_CONFIGS[bucket]
    dkdv_config = _RAGGED_HALF_DKDV_CONFIG if ragged_head_dims and bucket <= 128 else dkdv[heavy_features]
    return _launch_config(*dkdv_config), _launch_config(*dq[heavy_features])


# fp32 decode (BLOCK_N, num_warps, num_stages) by padded head dim: the 4-warp, 32-key tile
# of old spilled 40-50 bytes at d128 with Triton 3.6.
_FLOAT32_DECODE_CONFIGS = {64: (16, 4, 2), 128: (32, 8, 2), 256: (32, 8, 1), 512: (16, 8, 1), 1024: (16, 8, 1)}


def decode_config(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_N, num_warps, num_stages of the split-KV decode kernel (BLOCK_M is the query rows)."""
    if interpreting():
        return dict(BLOCK_N=INTERPRETER_BLOCK, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        bucket = head_dim_bucket(block_d)
        block_n, warps, stages = _FLOAT32_DECODE_CONFIGS[bucket]
        return dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    if block_d > 256:
        return dict(BLOCK_N=16, num_warps=8, num_stages=1)
    if block_d > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def sequence_bucket(seqlen: int) -> int:
    """Autotune key for sequence length: the power of two at or above it (capped)."""
    return min(triton.next_power_of_2(max(seqlen, 1)), 16384)


@cache
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
