"""Every check on user input, in one place, before any kernel runs.

Each failure raises TypeError (wrong type or dtype) or ValueError (wrong shape or value)
with a message that names the argument, what was expected and what was given; bad values
of block tables and cache lengths raise CacheMetadataError, a ValueError that is also the
RuntimeError flash-attn raises. Backends never re-check arguments: they receive an
:class:`~fusedattn.semantics.AttentionCall` that is already valid. fusedattn.compat's
KV-cache indices are checked in validation_kvcache.py, with the helpers defined here.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch

from .errors import CacheMetadataError
from .semantics import CAUSAL_ALIGNMENTS, MAX_HEAD_DIM, QUANTIZED_KV_DTYPES, AttentionCall

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WIDEST_WINDOW = 2**30
# query_start / key_start at most this (2**29, half a billion tokens): positions plus the
# widest window stay below 2**31 in the kernels' 32-bit position arithmetic.
LATEST_SEQUENCE_START = 2**29
# Offsets and lengths reach the kernels as int32: larger packed lengths cannot be addressed.
LARGEST_PACKED_LENGTH = 2**31 - 1


def _is_compiling() -> bool:
    # Checks that read tensor values would force a graph break under torch.compile;
    # they run eagerly and are skipped while tracing.
    return torch.compiler.is_compiling()


def _values_readable(tensor: torch.Tensor, synchronize: bool = True) -> bool:
    """Whether the host may read tensor's values now: not while torch.compile traces (fake
    tensors), not while a CUDA graph is being captured (a copy to the host synchronizes,
    which capture forbids), and for device tensors only when synchronize is allowed."""
    if _is_compiling() or torch._subclasses.fake_tensor.is_fake(tensor):
        return False
    if tensor.device.type == "cpu":
        return True
    if tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return synchronize


def _as_int32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous int32 copy (kernels index it as a plain array) that saturates instead of
    wrapping: an int64 value of 2**32 must not turn into a valid-looking 0."""
    if tensor.dtype == torch.int64:
        tensor = tensor.clamp(-1, 2**31 - 1)
    return tensor.to(torch.int32).contiguous()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} ({', '.join(_describe(item) for item in value)})"
    if value is None or isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r}"
    # No repr of other objects (a numpy array's repr reads its values, and breaks torch.compile).
    return f"a {type(value).__module__}.{type(value).__name__}"


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(value)}")
    return value


def integer_argument(name: str, value: object) -> int | torch.SymInt:
    """value as an int, taking what flash-attn's custom ops convert (operator.index semantics):
    Python ints, numpy integers, 0-d integer tensors (read on the host) and SymInts.

    Bools are refused: a flag where a count is expected is a mistake, not a count.
    """
    if isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, (bool, torch.Tensor)):
        try:
            return operator.index(value)  # numpy's bools refuse it
        except TypeError:
            pass
    # numpy arrays as the tensors they convert to (torch.compile traces them as such).
    given = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if isinstance(given, torch.Tensor):
        if given.dim() == 0 and given.dtype != torch.bool and not (given.is_floating_point() or given.is_complex()):
            return int(given)
    raise TypeError(f"{name}: expected an int (Python, numpy or a 0-d integer tensor), got {_describe(value)}")


def number_argument(name: str, value: object) -> float:
    """value as a float: Python or numpy ints and floats, 0-d integer or floating tensors
    (read on the host), as flash-attn's custom ops convert its float arguments. No bools."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's too, not its bools
        return float(value)
    # numpy arrays as the tensors they convert to (torch.compile traces them as such).
    given = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if isinstance(given, torch.Tensor):
        if given.dim() == 0 and given.dtype != torch.bool and not given.is_complex():
            return float(given)
    raise TypeError(f"{name}: expected a number (Python, numpy or a 0-d tensor), got {_describe(value)}")


def integer_pair(name: str, value: object) -> tuple[int, int]:
    """Two integer_arguments given as a tuple, a list, or a 1-D tensor or numpy array of two
    (flash-attn's own tests pass window_size=torch.randint(0, s, (2,)))."""
    pair = isinstance(value, (tuple, list)) or getattr(value, "ndim", None) == 1
    if not pair or len(value) != 2:
        raise TypeError(f"{name}: expected a pair of ints, got {_describe(value)}")
    first, second = value
    return integer_argument(f"{name}[0]", first), integer_argument(f"{name}[1]", second)


def _integer_tensor(name: str, value: object, q: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An int32 or int64 tensor on q's device (of exactly shape, unless None), unconverted."""
    tensor = _require_tensor(name, value)
    if tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {tensor.dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {tensor.device}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
    return tensor


def _check_kv_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str = "k, v") -> None:
    """K and V in q's dtype, or both in one 8-bit dtype (quantized, with k_descale / v_descale)."""
    quantized = k.dtype in QUANTIZED_KV_DTYPES and v.dtype == k.dtype
    if not (quantized or q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{names}: expected the dtype of q ({q.dtype}), or both float8_e4m3fn or both int8 (a quantized "
            f"cache), got {k.dtype} and {v.dtype}"
        )


def _check_qkv(q: object, k: object, v: object, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = _require_tensor(name, t)
        if t.dtype not in FLOAT_DTYPES and (name == "q" or t.dtype not in QUANTIZED_KV_DTYPES):
            raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
    _check_kv_dtypes(q, k, v)
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


def require_dtype_of_q(q: torch.Tensor, named: tuple[tuple[str, object], ...]) -> None:
    """flash-attn's rule (fusedattn.compat): every named tensor in q's dtype. The core API
    also reads 8-bit K/V (with k_descale / v_descale), which flash-attn's functions refuse."""
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {tensor.dtype}")


def _sequence_start(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    if not 0 <= value <= LATEST_SEQUENCE_START:
        raise ValueError(f"{name}: expected a value in [0, {LATEST_SEQUENCE_START}], got {value}")
    return int(value)


def _descale(name: str, value: object, tensor: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    """A scale of an 8-bit K or V: float, broadcastable to tensor.shape[:-1]; returned as a
    float32 view expanded to that shape (zero strides, no copy)."""
    if value is None:
        return None
    cache = name.split("_")[0]  # "k" or "v"
    if tensor.dtype not in QUANTIZED_KV_DTYPES:
        raise ValueError(f"{name}: expected None when {cache} is {tensor.dtype} (scales go with 8-bit caches)")
    scale = _require_tensor(name, value)
    if not scale.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {scale.dtype}")
    if scale.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {scale.device}")
    try:
        return expanded_descale(scale, tensor)
    except RuntimeError:
        target = tuple(tensor.shape[:-1])
        raise ValueError(f"{name}: expected a shape broadcastable to {target}, got {tuple(scale.shape)}") from None


def expanded_descale(scale: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """What validation makes of an 8-bit cache's scale (checked by _descale): a float32 view
    expanded to cache.shape[:-1] (zero strides, no copy for a float32 scale)."""
    return torch.broadcast_to(scale, tuple(cache.shape[:-1])).to(torch.float32)


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


def _per_head_floats(name: str, value: object, q: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """A floating tensor on q's device with one of shapes, as float32 (float64 for float64 q)."""
    tensor = _require_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {tensor.dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {tensor.device}")
    if tuple(tensor.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
    return tensor.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _alibi(alibi_slopes: object, q: torch.Tensor, batch: int, heads_q: int) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    return _per_head_floats("alibi_slopes", alibi_slopes, q, ((heads_q,), (batch, heads_q)))


def _sinks(sinks: object, q: torch.Tensor, heads_q: int) -> torch.Tensor | None:
    """One logit per query head."""
    if sinks is None:
        return None
    return _per_head_floats("sinks", sinks, q, ((heads_q,),))


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
    lengths = _integer_tensor("key_lengths", key_lengths, q, (batch,))
    if _values_readable(lengths):
        _check_key_length_values(lengths, seqlen_k)
    return _as_int32(lengths)


def _check_key_length_values(lengths: torch.Tensor, seqlen_k: int) -> None:
    if lengths.numel() > 0:
        values = lengths.detach().to("cpu", torch.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > seqlen_k:
            raise ValueError(f"key_lengths: expected values in [0, {seqlen_k}] (Sk), got values in [{low}, {high}]")


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
    sinks: object = None,
    softcap: object = None,
    dropout_p: object = 0.0,
    dropout_seed: object = None,
    query_start: object = 0,
    key_start: object = 0,
    k_descale: object = None,
    v_descale: object = None,
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
    query_start = _sequence_start("query_start", query_start)
    key_start = _sequence_start("key_start", key_start)
    if not (causal or window_left is not None or window_right is not None or alibi_slopes is not None or dropout_p):
        # Nothing reads positions: the block is computed as any call (every backend serves it).
        query_start = key_start = 0
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
        sinks=_sinks(sinks, q, heads_q),
        softcap=_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        query_start=query_start,
        key_start=key_start,
        k_descale=_descale("k_descale", k_descale, k, q),
        v_descale=_descale("v_descale", v_descale, v, q),
        needs_grad=_needs_grad(q, k, v),
        metadata_checked=key_lengths is None or _values_readable(key_lengths),
    )


def _cu_seqlens(name: str, cu: object, q: torch.Tensor) -> torch.Tensor:
    cu = _require_tensor(name, cu)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor of N + 1 offsets, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {cu.device}")
    return cu


def _check_offset_values(name: str, cu: torch.Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    if cu.shape[0] <= 256:
        # A decoding step checks a few offsets: plain Python beats a dozen small operators.
        offsets = cu.tolist()
        lengths = [end - start for start, end in zip(offsets, offsets[1:])]
        if offsets[0] == 0 and min(lengths, default=0) >= 0 and offsets[-1] == total:
            if max(lengths, default=0) <= max_seqlen:
                return
    values = cu.detach().to("cpu", torch.int64)
    if int(values[0]) != 0:
        raise ValueError(f"{name}: expected the first offset to be 0, got {int(values[0])}")
    if cu.shape[0] > 1 and bool((values[1:] < values[:-1]).any()):
        shown = values.tolist() if values.numel() <= 16 else f"{values[:16].tolist()}..."
        raise ValueError(f"{name}: expected non-decreasing offsets, got {shown}")
    if int(values[-1]) != total:
        raise ValueError(f"{name}: expected the last offset to equal the packed length {total}, got {int(values[-1])}")
    if cu.shape[0] > 1:
        longest = int((values[1:] - values[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"{max_name}: expected at least the longest sequence ({longest}), got {max_seqlen}")


def _same_count(cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: expected {cu_q.shape[0]} offsets (as many as cu_seqlens_q), got {cu_k.shape[0]}"
        )


def _max_seqlen(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"{name}: expected a value >= 0, got {value}")
    return value


def _packed_length(name: str, tensor: torch.Tensor) -> int:
    if tensor.shape[0] > LARGEST_PACKED_LENGTH:
        raise ValueError(
            f"{name}: expected at most {LARGEST_PACKED_LENGTH} packed tokens (int32 offsets), got {tensor.shape[0]}"
        )
    return tensor.shape[0]


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
    sinks: object = None,
    softcap: object = None,
    dropout_p: object = 0.0,
    dropout_seed: object = None,
    k_descale: object = None,
    v_descale: object = None,
) -> AttentionCall:
    """Check a packed variable-length call (T, H, D) and normalize it."""
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} tokens (those of k), got {v.shape[0]}")
    _check_heads(q.shape[1], k.shape[1], v.shape[1])
    _check_head_dims(q, k, v)
    total_q, total_k = _packed_length("q", q), _packed_length("k", k)
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    _same_count(cu_q, cu_k)
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
    checked = _values_readable(cu_q) and _values_readable(cu_k)
    if checked:
        _check_offset_values("cu_seqlens_q", cu_q, total_q, "max_seqlen_q", max_q)
        _check_offset_values("cu_seqlens_k", cu_k, total_k, "max_seqlen_k", max_k)
    window_left, window_right = _window(window)
    dropout_p, dropout_seed = _dropout(dropout_p, dropout_seed)
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        scale=_scale(scale, q.shape[-1]),
        causal=_bool_flag("causal", causal),
        causal_alignment=_alignment(causal_alignment),
        cu_seqlens_q=_as_int32(cu_q),
        cu_seqlens_k=_as_int32(cu_k),
        # No sequence is longer than the packed tokens: a larger bound only sizes grids.
        max_seqlen_q=torch.sym_min(max_q, total_q),
        max_seqlen_k=torch.sym_min(max_k, total_k),
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=_alibi(alibi_slopes, q, cu_q.shape[0] - 1, q.shape[1]),
        sinks=_sinks(sinks, q, q.shape[1]),
        softcap=_softcap(softcap),
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        k_descale=_descale("k_descale", k_descale, k, q),
        v_descale=_descale("v_descale", v_descale, v, q),
        needs_grad=_needs_grad(q, k, v),
        metadata_checked=checked,
    )


# ---- paged KV caches -------------------------------------------------------------------------
def _check_caches(q: object, key_cache: object, value_cache: object) -> None:
    """q (Tq, Hq, D); caches (num_blocks, block_size, Hkv, D / Dv) of q's dtype and device."""
    q = _require_tensor("q", q)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor (total_tokens, heads, head_dim), got shape {tuple(q.shape)}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        cache = _require_tensor(name, cache)
        if cache.dim() != 4:
            raise ValueError(
                f"{name}: expected a 4-D tensor (num_blocks, block_size, heads, head_dim), got shape {tuple(cache.shape)}"
            )
        if cache.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {cache.device}")
    _check_kv_dtypes(q, key_cache, value_cache, "key_cache, value_cache")
    if tuple(value_cache.shape[:3]) != tuple(key_cache.shape[:3]):
        raise ValueError(
            f"value_cache: expected (num_blocks, block_size, heads) = {tuple(key_cache.shape[:3])} (those of "
            f"key_cache), got {tuple(value_cache.shape[:3])}"
        )
    if key_cache.shape[1] < 1:
        raise ValueError(f"key_cache: expected a block size >= 1, got {key_cache.shape[1]}")


def _block_table(block_table: object, q: torch.Tensor, sequences: int) -> torch.Tensor:
    table = _integer_tensor("block_table", block_table, q)
    if table.dim() != 2 or table.shape[0] != sequences:
        raise ValueError(f"block_table: expected shape ({sequences}, max_blocks), got {tuple(table.shape)}")
    return table


def _outside(name: str, values: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int, what: str) -> None:
    """CacheMetadataError (a ValueError and a RuntimeError) naming the first entry of values
    outside [low, high]: every caller checks KV-cache metadata."""
    bad = (values < low) | (values > high)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = index[0] if len(index) == 1 else index
        limit_low = low if isinstance(low, int) else int(torch.as_tensor(low).expand_as(values)[index])
        limit_high = high if isinstance(high, int) else int(torch.as_tensor(high).expand_as(values)[index])
        raise CacheMetadataError(
            f"{name}: expected {what} in [{limit_low}, {limit_high}], got {int(values[index])} at index {where}"
        )


def _used_blocks(table: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block table with 0 in every slot past a sequence's last block (slots at or past
    ceil(lengths[n] / block_size) are never read, and may hold anything)."""
    in_use = torch.arange(table.shape[1], device=table.device)[None, :] * block_size < lengths[:, None]
    return torch.where(in_use, table, 0)


def _blocks_outside(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """0-d bool, on the blocks' device: some used block number is not in [0, num_blocks)."""
    return ((blocks < 0) | (blocks >= num_blocks)).any()


def _check_paged_values(table: torch.Tensor, lengths: torch.Tensor, block_size: int, num_blocks: int) -> None:
    """cache_lengths within the table's room; every block a sequence uses inside the cache."""
    # Extremes first (a few operators: this runs on every decoding step); _outside finds the
    # offending entry for the message only when there is one.
    lengths = lengths.detach().to("cpu", torch.int64)
    table = table.detach().to("cpu", torch.int64)
    if lengths.numel() == 0:
        return
    capacity = table.shape[1] * block_size
    low, high = torch.aminmax(lengths)
    if low < 0 or high > capacity:
        room = f"lengths that fit block_table's {table.shape[1]} blocks of {block_size} keys"
        _outside("cache_lengths", lengths, 0, capacity, room)
    blocks = _used_blocks(table, lengths, block_size)
    low, high = torch.aminmax(blocks)
    if low < 0 or high >= num_blocks:
        _outside("block_table", blocks, 0, num_blocks - 1, "block numbers (in the blocks in use)")


def validate_paged(
    q: object,
    key_cache: object,
    value_cache: object,
    block_table: object,
    cache_lengths: object,
    cu_seqlens_q: object,
    max_seqlen_q: object,
    *,
    causal: object = False,
    causal_alignment: object = "bottom_right",
    scale: object = None,
    window: object = None,
    alibi_slopes: object = None,
    sinks: object = None,
    softcap: object = None,
    k_descale: object = None,
    v_descale: object = None,
) -> AttentionCall:
    """Check a call over a paged KV cache (fusedattn.attention_paged) and normalize it."""
    _check_caches(q, key_cache, value_cache)
    _check_heads(q.shape[1], key_cache.shape[2], value_cache.shape[2])
    _check_head_dims(q, key_cache, value_cache)
    total_q = _packed_length("q", q)
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    sequences = cu_q.shape[0] - 1
    table = _block_table(block_table, q, sequences)
    lengths = _integer_tensor("cache_lengths", cache_lengths, q, (sequences,))
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    block_size, num_blocks = key_cache.shape[1], key_cache.shape[0]
    capacity = table.shape[1] * block_size
    if capacity > LARGEST_PACKED_LENGTH:
        raise ValueError(
            f"block_table: expected room for at most {LARGEST_PACKED_LENGTH} keys per sequence (int32 "
            f"positions), got {table.shape[1]} blocks of {block_size}"
        )
    checked = all(_values_readable(t) for t in (cu_q, table, lengths))
    if checked:
        _check_offset_values("cu_seqlens_q", cu_q, total_q, "max_seqlen_q", max_q)
        _check_paged_values(table, lengths, block_size, num_blocks)
    window_left, window_right = _window(window)
    return AttentionCall(
        q=q,
        k=key_cache,
        v=value_cache,
        scale=_scale(scale, q.shape[-1]),
        causal=_bool_flag("causal", causal),
        causal_alignment=_alignment(causal_alignment),
        cu_seqlens_q=_as_int32(cu_q),
        block_table=_as_int32(table),
        cache_lengths=_as_int32(lengths),
        max_seqlen_q=torch.sym_min(max_q, total_q),
        max_seqlen_k=capacity,
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=_alibi(alibi_slopes, q, sequences, q.shape[1]),
        sinks=_sinks(sinks, q, q.shape[1]),
        softcap=_softcap(softcap),
        k_descale=_descale("k_descale", k_descale, key_cache, q),
        v_descale=_descale("v_descale", v_descale, value_cache, q),
        needs_grad=_needs_grad(q, key_cache, value_cache),
        metadata_checked=checked,
    )


# ---- metadata values the host did not read at validation -----------------------------------
def metadata_guard(call: AttentionCall, synchronize: bool = False) -> torch.Tensor | None:
    """Make sure no result computed from invalid integer metadata is ever returned as valid.

    Called by the op layer (fusedattn/ops.py) before a backend runs. Returns None when the
    metadata values (cu_seqlens_q/k with max_seqlen_q/k, key_lengths, a paged call's
    block_table and cache_lengths) are known valid:
    checked at validation, or readable on the host now (CPU tensors; device tensors when
    synchronize is allowed) and checked here, raising the same ValueError as validation.
    Otherwise (device tensors in a compiled graph, a torch.compile trace, CUDA graph
    capture) returns a 0-d bool tensor on the call's device, True when the values are
    invalid, computed without synchronizing: the op layer then replaces every output by
    NaN. Kernels clamp what they read, so invalid values are memory-safe either way
    (docs/semantics.md, "Invalid metadata").
    """
    if call.metadata_checked:
        return None
    metadata = (call.cu_seqlens_q, call.cu_seqlens_k, call.key_lengths, call.block_table, call.cache_lengths)
    tensors = [t for t in metadata if t is not None]
    if not tensors:
        return None
    if all(_values_readable(t, synchronize) for t in tensors):
        if call.is_varlen:
            _check_offset_values("cu_seqlens_q", call.cu_seqlens_q, call.q.shape[0], "max_seqlen_q", call.max_seqlen_q)
        if call.cu_seqlens_k is not None:
            _check_offset_values("cu_seqlens_k", call.cu_seqlens_k, call.k.shape[0], "max_seqlen_k", call.max_seqlen_k)
        if call.key_lengths is not None:
            _check_key_length_values(call.key_lengths, call.seqlen_k)
        if call.is_paged:
            _check_paged_values(call.block_table, call.cache_lengths, call.block_size, call.k.shape[0])
        return None
    invalid = torch.zeros((), dtype=torch.bool, device=call.device)
    if call.is_paged:
        lengths = call.cache_lengths
        invalid = invalid | (lengths < 0).any() | (lengths > call.seqlen_k).any()
        invalid = invalid | _blocks_outside(_used_blocks(call.block_table, lengths, call.block_size), call.k.shape[0])
    if call.is_varlen:
        spans = [(call.cu_seqlens_q, call.q.shape[0], call.max_seqlen_q)]
        if call.cu_seqlens_k is not None:
            spans.append((call.cu_seqlens_k, call.k.shape[0], call.max_seqlen_k))
        for offsets, total, longest in spans:
            offsets = offsets.to(torch.int64)
            lengths = offsets[1:] - offsets[:-1]
            invalid = invalid | (offsets[0] != 0) | (offsets[-1] != total)
            invalid = invalid | (lengths < 0).any() | (lengths > longest).any()
    if call.key_lengths is not None:
        lengths = call.key_lengths
        invalid = invalid | (lengths < 0).any() | (lengths > call.seqlen_k).any()
    return invalid


def poison_if_invalid(invalid: torch.Tensor | None, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """outputs unchanged, or all NaN where metadata_guard found the metadata invalid."""
    if invalid is None:
        return outputs
    return tuple(output.masked_fill(invalid, float("nan")) for output in outputs)
