"""Every check on user input, in one place, before any kernel runs.

Each failure raises TypeError (wrong type or dtype) or ValueError (wrong shape or value)
with a message that names the argument, what was expected and what was given. Backends
never re-check arguments: they receive an :class:`~fusedattn.semantics.AttentionCall`
that is already valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .semantics import CAUSAL_ALIGNMENTS, MAX_HEAD_DIM, AttentionCall

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WIDEST_WINDOW = 2**30


def _is_compiling() -> bool:
    # Checks that read tensor values would force a graph break under torch.compile;
    # they run eagerly and are skipped while tracing.
    return torch.compiler.is_compiling()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(value)}")
    return value


def _check_qkv(q: object, k: object, v: object, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = _require_tensor(name, t)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"k, v: expected the device of q ({q.device}), got k on {k.device} and v on {v.device}")


def _check_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (that of q), got {k.shape[-1]}")
    for name, dim in (("q", q.shape[-1]), ("v", v.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected a head dim from 1 to {MAX_HEAD_DIM}, got {dim}")


def _check_heads(heads_q: int, heads_k: int, heads_v: int) -> None:
    if heads_k != heads_v:
        raise ValueError(f"v: expected {heads_k} heads (those of k), got {heads_v}")
    if heads_k == 0 or heads_q % heads_k != 0:
        raise ValueError(f"k: expected a number of heads that divides the {heads_q} query heads, got {heads_k}")


def _scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {_describe(scale)}")
    return float(scale)


def _bool_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {_describe(value)}")
    return value


def _alignment(value: object) -> str:
    if value not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment: expected one of {CAUSAL_ALIGNMENTS}, got {value!r}")
    return value  # type: ignore[return-value]


def _window(window: object) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise TypeError(f"window: expected a pair (left, right) of ints or None, got {_describe(window)}")
    sides = []
    for side_name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, bool) or not isinstance(side, int):
            raise TypeError(f"window: expected the {side_name} side to be an int or None, got {_describe(side)}")
        if side < 0:
            raise ValueError(f"window: expected the {side_name} side to be >= 0 or None, got {side}")
        # Any side at least this wide hides nothing (no sequence is that long); capping it
        # keeps position arithmetic in every kernel and in the reference free of overflow.
        sides.append(min(int(side), WIDEST_WINDOW))
    return sides[0], sides[1]


def _softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float or None, got {_describe(softcap)}")
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap: expected a finite value >= 0 (0 disables it), got {softcap}")
    return float(softcap) if softcap > 0 else None


def _dropout(dropout_p: object, dropout_seed: object) -> tuple[float, int | torch.Tensor | None]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1], got {_describe(dropout_p)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1], got {dropout_p}")
    if dropout_seed is not None:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
            raise TypeError(f"dropout_seed: expected an int or None, got {_describe(dropout_seed)}")
        if not 0 <= dropout_seed < 2**63:
            raise ValueError(f"dropout_seed: expected a value in [0, 2**63), got {dropout_seed}")
    if dropout_p == 0.0:
        return 0.0, None
    if dropout_seed is None:
        # Drawn from torch's default generator, so torch.manual_seed makes runs repeatable.
        # While tracing it stays a 0-d tensor (reading it would break the graph); the op
        # layer turns it into an int before any backend sees it.
        drawn = torch.randint(0, 2**62, (), dtype=torch.int64)
        dropout_seed = drawn if _is_compiling() else int(drawn.item())
    return float(dropout_p), dropout_seed


def _alibi(alibi_slopes: object, q: torch.Tensor, batch: int, heads_q: int) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    slopes = _require_tensor("alibi_slopes", alibi_slopes)
    if slopes.dtype not in FLOAT_DTYPES:
        raise TypeError(f"alibi_slopes: expected a floating dtype, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes: expected device {q.device} (that of q), got {slopes.device}")
    if tuple(slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(
            f"alibi_slopes: expected shape ({heads_q},) or ({batch}, {heads_q}), got {tuple(slopes.shape)}"
        )
    return slopes.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _attn_mask(mask: object, q: torch.Tensor, target: tuple[int, int, int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = _require_tensor("attn_mask", mask)
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise TypeError(f"attn_mask: expected dtype torch.bool or {q.dtype} (that of q), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask: expected device {q.device} (that of q), got {mask.device}")
    if mask.dim() > 4:
        raise ValueError(f"attn_mask: expected at most 4 dims broadcastable to {target}, got shape {tuple(mask.shape)}")
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    for have, want in zip(shape, target):
        if have not in (1, want):
            raise ValueError(f"attn_mask: expected a shape broadcastable to {target}, got {tuple(mask.shape)}")
    # A view with zero strides on broadcast dims: the mask is never materialized.
    return mask.reshape(shape).expand(target)


def _key_lengths(key_lengths: object, q: torch.Tensor, batch: int, seqlen_k: int) -> torch.Tensor | None:
    if key_lengths is None:
        return None
    lengths = _require_tensor("key_lengths", key_lengths)
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"key_lengths: expected dtype torch.int32 or torch.int64, got {lengths.dtype}")
    if lengths.device != q.device:
        raise ValueError(f"key_lengths: expected device {q.device} (that of q), got {lengths.device}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"key_lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    if not _is_compiling() and lengths.numel() > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > seqlen_k:
            raise ValueError(f"key_lengths: expected values in [0, {seqlen_k}] (Sk), got values in [{low}, {high}]")
    return lengths.to(torch.int32)


def validate_attention(
    q: object,
    k: object,
    v: object,
    *,
    causal: object = False,
    causal_alignment: object = "bottom_right",
    scale: object = None,
    attn_mask: object = None,
    key_lengths: object = None,
    window: object = None,
    alibi_slopes: object = None,
    softcap: object = None,
    dropout_p: object = 0.0,
    dropout_seed: object = None,
) -> AttentionCall:
    """Check a dense call (B, H, S, D) and normalize it into an AttentionCall."""
    _check_qkv(q, k, v, 4, "(batch, heads, seq, head_dim)")
    batch, heads_q, seqlen_q, _ = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k, v: expected batch {batch} (that of q), got k {k.shape[0]} and v {v.shape[0]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected sequence length {k.shape[2]} (that of k), got {v.shape[2]}")
    _check_heads(heads_q, k.shape[1], v.shape[1])
    _check_head_dims(q, k, v)
    seqlen_k = k.shape[2]
    window_left, window_right = _window(window)
    dropout_p, dropout_seed = _dropout(dropout_p, dropout_seed)
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        scale=_scale(scale, q.shape[-1]),
        causal=_bool_flag("causal", causal),
        causal_alignment=_alignment(causal_alignment),
        attn_mask=_attn_mask(attn_mask, q, (batch, heads_q, seqlen_q, seqlen_k)),
        key_lengths=_key_lengths(key_lengths, q, batch, seqlen_k),
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=_alibi(alibi_slopes, q, batch, heads_q),
        softcap=_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        needs_grad=_needs_grad(q, k, v),
    )


def _cu_seqlens(name: str, cu: object, q: torch.Tensor, total: int) -> torch.Tensor:
    cu = _require_tensor(name, cu)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor of N + 1 offsets, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {cu.device}")
    if not _is_compiling():
        values = cu.detach().to("cpu", torch.int64)
        if int(values[0]) != 0:
            raise ValueError(f"{name}: expected the first offset to be 0, got {int(values[0])}")
        if cu.shape[0] > 1 and bool((values[1:] < values[:-1]).any()):
            raise ValueError(f"{name}: expected non-decreasing offsets, got {values.tolist()}")
        if int(values[-1]) != total:
            raise ValueError(
                f"{name}: expected the last offset to equal the packed length {total}, got {int(values[-1])}"
            )
    return cu.to(torch.int32)


def _max_seqlen(name: str, value: object, cu: torch.Tensor) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")
    if not _is_compiling() and cu.shape[0] > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if value < longest:
            raise ValueError(f"{name}: expected at least the longest sequence ({longest}), got {value}")
    return int(value)


def validate_varlen(
    q: object,
    k: object,
    v: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    *,
    causal: object = False,
    causal_alignment: object = "bottom_right",
    scale: object = None,
    window: object = None,
    alibi_slopes: object = None,
    softcap: object = None,
    dropout_p: object = 0.0,
    dropout_seed: object = None,
) -> AttentionCall:
    """Check a packed variable-length call (T, H, D) and normalize it."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} tokens (those of k), got {v.shape[0]}")
    _check_heads(q.shape[1], k.shape[1], v.shape[1])
    _check_head_dims(q, k, v)
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q, q.shape[0])
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, q, k.shape[0])
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: expected {cu_q.shape[0]} offsets (as many as cu_seqlens_q), got {cu_k.shape[0]}"
        )
    window_left, window_right = _window(window)
    dropout_p, dropout_seed = _dropout(dropout_p, dropout_seed)
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        scale=_scale(scale, q.shape[-1]),
        causal=_bool_flag("causal", causal),
        causal_alignment=_alignment(causal_alignment),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=_max_seqlen("max_seqlen_q", max_seqlen_q, cu_q),
        max_seqlen_k=_max_seqlen("max_seqlen_k", max_seqlen_k, cu_k),
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=_alibi(alibi_slopes, q, cu_q.shape[0] - 1, q.shape[1]),
        softcap=_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        needs_grad=_needs_grad(q, k, v),
    )
