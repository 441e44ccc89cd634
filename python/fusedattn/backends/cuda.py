"""The CUDA backend: hand-written C++/CUDA flash kernels in csrc/cuda (fusedattn._C).

The fallback GPU path for when Triton is missing or cannot compile for the GPU. The
fp16/bf16 forward has FlashAttention 2's structure (csrc/cuda/attention_forward_mma.cuh):
mma.sync with S and O in registers, ldmatrix, cp.async double-buffered K/V tiles, and a
split over keys with an lse combine for decode-sized grids (chosen by the launcher,
attention_params.h forward_split_count). The fp16/bf16 backward has the same structure
(csrc/cuda/attention_backward_mma.cuh: dK and dV in registers, split over two warps per 16
keys above head dim 128, Q/dO tiles double-buffered by cp.async, dQ added into a float32
buffer by atomics). One block per key tile and query head (GQA groups summed after); fp32
runs on FMA units both ways (exact fp32, no TF32). Every feature
of semantics.py is served, including dropout (the same counter-based hash, recomputed in
the kernels) and boolean/additive masks read through their broadcast strides.

No batch size or head count is refused: the launchers flatten (tile, head, sequence) onto
grid.x (up to 2**31 - 1 blocks; grid.y and grid.z would stop at 65535). Metadata values
the host could not check (cu_seqlens, key_lengths, max_seqlen under torch.compile or CUDA
graph capture) are clamped by the kernels so that every access stays inside the tensors;
the op layer poisons the outputs of such calls (docs/semantics.md, "Invalid metadata").

The native operators are ``torch.ops.fusedattn_native.cuda_attention_forward`` and
``..._backward``; they exist only when fusedattn._C was built with CUDA (CMake option
FUSEDATTN_CUDA, on by default where nvcc and a CUDA build of torch are present).
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch

from .. import semantics
from .._native import build_info, native_error
from ..ops import native_option_values
from ..semantics import AttentionCall
from .base import Backend, CallProfile, Capabilities, allocate_output

# Shared memory per block of the largest tile configuration in csrc/cuda (the fp32 forward
# for head dims 225..256). Every configuration fits sm_80's 163 KB (a static_assert there);
# GPUs that offer less (sm_86/sm_89: 99 KB) are refused.
_SHARED_BYTES_NEEDED = 142_592


def _native_ops() -> object | None:
    """torch.ops.fusedattn_native, when the CUDA operators are registered there."""
    namespace = torch.ops.fusedattn_native
    try:
        namespace.cuda_attention_forward  # noqa: B018  (raises when the op is not registered)
        namespace.cuda_attention_backward  # noqa: B018
    except (AttributeError, RuntimeError):
        return None
    return namespace


@lru_cache(maxsize=1)
def _compiled_capabilities() -> tuple[int, ...]:
    """Compute capabilities (major * 10 + minor) the build holds kernels for, e.g. (80, 90)."""
    archs = build_info().get("cuda_architectures", [])
    found = []
    for arch in archs:
        digits = "".join(ch for ch in str(arch) if ch.isdigit())
        if digits:
            found.append(int(digits))
    return tuple(sorted(found))


def availability() -> tuple[bool, str]:
    info = build_info()
    if not info:
        return False, native_error() or "fusedattn._C is not built"
    if not info.get("cuda"):
        return False, (
            "fusedattn._C was built without CUDA (the build needs nvcc and a CUDA build of torch; "
            "force it with FUSEDATTN_CMAKE_ARGS=-DFUSEDATTN_CUDA=ON)"
        )
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if _native_ops() is None:
        return False, "fusedattn._C was built with CUDA but its operators are not registered"
    return True, ""


@cache
def _shared_bytes_per_block(device_index: int) -> int | None:
    """The opt-in shared memory per block of a GPU, or None when torch does not report it."""
    return getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)


def refuse(profile: CallProfile) -> str | None:
    if profile.device != "cuda":
        return None  # the capability table already explains other devices
    shared_bytes = _shared_bytes_per_block(torch.cuda.current_device())
    if shared_bytes is not None and shared_bytes < _SHARED_BYTES_NEEDED:
        return (
            f"the GPU offers {shared_bytes // 1024} KB of shared memory per block; "
            f"the kernels need {_SHARED_BYTES_NEEDED // 1024} KB (sm_80/sm_90 class GPUs)"
        )
    major, minor = torch.cuda.get_device_capability()
    capability = major * 10 + minor
    compiled = _compiled_capabilities()
    if compiled and capability < min(compiled):
        return (
            f"the GPU has compute capability {major}.{minor}; this build has kernels for "
            f"{', '.join(f'sm_{c}' for c in compiled)} only (set FUSEDATTN_CUDA_ARCHITECTURES and rebuild)"
        )
    return None


def forward(call: AttentionCall, operators: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (*q.shape[:-1], Dv) in q's dtype and lse float32 (B, Hq, Sq) or (Hq, Tq).

    operators is the op namespace holding cuda_attention_forward: torch.ops.fusedattn_native,
    or the CPU emulation's namespace in the tests.
    """
    operators = torch.ops.fusedattn_native if operators is None else operators
    out = allocate_output(call.out_shape, call.dtype, call.device)
    lse = allocate_output(call.lse_shape, torch.float32, call.device)
    operators.cuda_attention_forward(call.q, call.k, call.v, out, lse, *native_option_values(call))
    return out, lse


def backward(
    call: AttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    operators: object | None = None,
    option_gradients: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) shaped like q, k, v; dk and dv are summed over each GQA group. With
    option_gradients=("sinks",) also d sinks (Hq,) float32, from lse and delta."""
    operators = torch.ops.fusedattn_native if operators is None else operators
    dq = allocate_output(tuple(call.q.shape), call.dtype, call.device)
    dk = allocate_output(tuple(call.k.shape), call.dtype, call.device)
    dv = allocate_output(tuple(call.v.shape), call.dtype, call.device)
    operators.cuda_attention_backward(
        grad_out, call.q, call.k, call.v, out, lse, dq, dk, dv, *native_option_values(call)
    )
    if call.key_lengths is not None:
        # Storage past key_lengths gets dK = dV = 0 (docs/semantics.md). The kernels zero-fill
        # its K and V, but a NaN in q or dO still reaches those rows as 0 * NaN, and a select
        # in the mma kernel's epilogue made its d128 variant spill.
        storage = ~semantics.within_key_lengths(call.key_lengths.to(dk.device), call.k.shape[2])[:, None, :, None]
        dk.masked_fill_(storage, 0.0)
        dv.masked_fill_(storage, 0.0)
    if "sinks" in option_gradients:
        return dq, dk, dv, semantics.call_sink_gradient(call, grad_out, out, lse)
    return dq, dk, dv


BACKEND = Backend(
    name="cuda",
    description="C++/CUDA flash kernels (csrc/cuda): tensor cores for fp16/bf16 on sm_80+, FMA for fp32",
    capabilities=Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        # No paged KV caches: the kernels address keys as dense rows only.
        features=frozenset(semantics.FEATURES) - {"paged_kv", "sequence_block", "quantized_kv"},
        max_head_dim=256,  # the kernels' head-dim buckets end at 256 (attention_common.cuh)
        differentiable_options=frozenset({"sinks"}),
        priority={"cuda": 20},
    ),
    forward=forward,
    backward=backward,
    availability=availability,
    refuse=refuse,
)
