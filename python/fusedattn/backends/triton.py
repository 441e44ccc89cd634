"""The Triton backend: FlashAttention-2-style kernels in fusedattn.kernels.

Runs on CUDA GPUs, and on CPU tensors only under Triton's interpreter
(TRITON_INTERPRET=1, slow: used by the tests). Every feature of semantics.py is served,
forward and backward (paged caches and 8-bit K/V forward only); fp16, bf16 and fp32 (fp32 dots follow torch's matmul policy:
TF32 after torch.set_float32_matmul_precision("high") or with
torch.backends.cuda.matmul.fp32_precision = "tf32", exact IEEE otherwise).

Environment:
  * FUSEDATTN_DETERMINISTIC=1 (or torch.use_deterministic_algorithms(True)): the backward
    pass computes dQ in its own kernel instead of float32 atomic adds, so every gradient
    is bitwise reproducible (dK/dV are always reduced without atomics, GQA included).
  * FUSEDATTN_TRITON_DECODE=auto|always|never: the split-KV decode kernel serves dense
    calls with Sq <= 16 and Sk >= 512 by default.
  * FUSEDATTN_TRITON_TMA=auto|0|1: K/V through tensor descriptors (TMA) on sm_90+ by
    default; 0 disables; 1 also turns it on under the interpreter (tests).
  * FUSEDATTN_TRITON_WRAP=0: launch kernels directly instead of through
    torch.library.wrap_triton (outside torch.compile traces).

The forward and backward ops are torch.library.triton_op ops (Backend.triton_op):
torch.compile traces into them and sees the kernel launches. The dropout seed stays
the op's int64 tensor (the kernels derive the seed key from it), and no host-side
choice reads tensor values or addresses while tracing.

This module imports triton and the kernels lazily, so the package imports (and reports
this backend unavailable, with the reason) where triton is not installed.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from .. import environment, semantics
from ..semantics import AttentionCall
from .base import Backend, CallProfile, Capabilities


@lru_cache(maxsize=1)
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install must not break the package
        return False, f"triton failed to import ({type(error).__name__}: {error})"
    return True, ""


def _interpreting() -> bool:
    return environment.triton_interpreting()


@lru_cache(maxsize=1)
def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def availability() -> tuple[bool, str]:
    return _triton_status()


def refuse(profile: CallProfile) -> str | None:
    device = profile.device
    if device == "cpu" and not _interpreting():
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    if device == "cuda" and profile.dtype == torch.bfloat16 and not _bf16_supported():
        return "bfloat16 needs a GPU with compute capability 8.0 or newer"
    if device == "cpu" and profile.dtype == torch.bfloat16:
        return "Triton's interpreter does not support tl.dot on bfloat16"
    if {"paged_kv", "backward"} <= profile.features:
        return "no backward over a paged KV cache (inference only; the reference backend differentiates it)"
    if {"quantized_kv", "backward"} <= profile.features:
        return "no backward with 8-bit K/V (inference only; the reference backend differentiates it)"
    return None


def forward(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedattn.kernels.attention_forward import forward as run

    return run(call)


def backward(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    from fusedattn.kernels.attention_backward import backward as run

    return run(call, grad_out, out, lse, option_gradients)


BACKEND = Backend(
    name="triton",
    description="Triton FlashAttention-2-style kernels (CUDA; CPU only under TRITON_INTERPRET=1)",
    capabilities=Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        features=frozenset(semantics.FEATURES),
        max_head_dim=semantics.MAX_HEAD_DIM,
        priority={"cuda": 30, "cpu": -10},
        differentiable_options=frozenset({"sinks"}),
    ),
    forward=forward,
    backward=backward,
    availability=availability,
    refuse=refuse,
    # torch.compile traces into the kernels (the bodies below only launch through wrap_triton).
    triton_op=True,
)
