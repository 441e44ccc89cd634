"""The checks of fusedattn's torch drop-ins: scaled_dot_product_attention and nn.MultiheadAttention.

Each takes torch's arguments, refuses what the installed torch refuses with torch's
exception class (the two-kind classes of :mod:`fusedattn.errors`, so that fusedattn's own
TypeError / ValueError still catch them). :func:`sdpa_call` also turns what torch accepts
into one :func:`fusedattn.attention` call: any number of batch dims, broadcast as torch
broadcasts them, flattened into (B, H, L, E) views. tests/test_dropin_conformance.py holds
both to the installed torch, call by call. Checks of fusedattn's own arguments stay in
validation.py.

torch's CPU dispatch decides some answers by the kernel it picks: its fused kernel accepts
attn_mask together with is_causal (its math kernel refuses them), refuses a negative or
NaN dropout_p (the math kernel drops nothing), and reads a mask's dim -2 (IndexError for
a 0-D or 1-D mask, which the math kernel broadcasts). :func:`_torch_fused_kernel` is that
choice, from the installed torch's behaviour.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from .dispatch import AUTO, select_backend
from .errors import (
    AssertionTypeError,
    AssertionValueError,
    IndexValueError,
    NotImplementedTypeError,
    RuntimeTypeError,
    RuntimeValueError,
)
from .semantics import MAX_HEAD_DIM
from .validation import FLOAT_DTYPES, _describe, validate_attention

NAMES = ("query", "key", "value")
# torch's own function, kept before anyone assigns the drop-in over it: head dims past
# fusedattn's largest run there.
_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention

SdpaPlan = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any], tuple[int, ...]]


def _tensor(name: str, value: object) -> torch.Tensor:
    # torch's argument parser raises TypeError for these.
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(value)}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {_describe(value)}")
    return value


def _number(name: str, value: object) -> float:
    # torch's parser takes an int or a float (a bool is an int) for a double argument.
    if not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {_describe(value)}")
    return float(value)


def _causal_bias(mask: torch.Tensor) -> Any | None:
    """mask if it is a torch.nn.attention.bias.CausalBias, else None."""
    if type(mask) is torch.Tensor:
        return None
    # A CausalBias exists only once its module is imported: no import here (it loads dynamo).
    module = sys.modules.get("torch.nn.attention.bias")
    return mask if module is not None and isinstance(mask, module.CausalBias) else None


def _lower_right_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """torch checks a lower-right CausalBias call (L != S) in Python, with ValueError."""
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"key, value: expected the dtype of query ({query.dtype}), got {key.dtype} and {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"key, value: expected the device of query ({query.device}), got {key.device} and {value.device}"
        )
    if min(query.dim(), key.dim(), value.dim()) < 2:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(NAMES, (query, key, value)))
        raise ValueError(f"query, key, value: expected at least 2 dims each, got {shapes}")


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> None:
    """What torch checks before anything else (all RuntimeError)."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeTypeError(
            f"query, key, value: expected one dtype, got query {query.dtype}, key {key.dtype} and value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise RuntimeValueError(
            f"query, key, value: expected one device, got query on {query.device}, key on {key.device} and value "
            f"on {value.device}"
        )
    for name, tensor in zip(NAMES, (query, key, value)):
        if tensor.dim() < 2:
            raise RuntimeValueError(
                f"{name}: expected at least 2 dims (..., length, features), got {tuple(tensor.shape)}"
            )
    # Integer masks: torch's rule is bool, float32 or the query's dtype, nothing else.
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeTypeError(
            f"attn_mask: expected dtype torch.bool, torch.float32 or {query.dtype} (that of query), got {mask.dtype}"
        )


def _zeros(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """torch's answer when there is no query row or no value: zeros (..., L, Ev), on the graph."""
    if query.dtype in FLOAT_DTYPES:
        # As for every empty problem, a forced backend (FUSEDATTN_BACKEND) is still asked
        # whether it could serve the call's dtype and device (docs/semantics.md).
        empty = query.new_zeros(1, 1, 0, 1)
        select_backend(validate_attention(empty, empty, empty), AUTO)
    out = query.new_zeros(*query.shape[:-1], value.shape[-1])
    if out.is_floating_point() and any(t.requires_grad for t in (query, key, value)):
        out = out + sum(t.reshape(-1)[:0].sum() for t in (query, key, value))  # an empty sum: 0, with a graph
    return out


def _torch_fused_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, p: float, gqa: bool
) -> bool:
    """Whether torch's CPU dispatch runs its fused kernel for this call (else its math kernel).

    Raises IndexError, as torch does, for a 0-D or 1-D mask that reaches the mask check.
    """
    if query.device.type != "cpu" or not torch._C._get_flash_sdp_enabled() or p > 0.0:
        return False
    if not all(t.dim() == 4 for t in (query, key, value)):
        return False
    (batch, heads), (batch_k, heads_k), (batch_v, heads_v) = query.shape[:2], key.shape[:2], value.shape[:2]
    if not (batch == batch_k == batch_v) or not (
        heads == heads_k == heads_v or (gqa and heads_k == heads_v and heads_k > 0 and heads % heads_k == 0)
    ):
        return False
    if mask is not None:
        if mask.requires_grad:  # torch's fused kernel has no gradient for the mask
            return False
        if mask.dim() < 2:
            raise IndexValueError(
                f"attn_mask: expected at least 2 dims with 4-D query, key and value, got shape {tuple(mask.shape)}"
            )
        target = (batch, heads, query.shape[-2], key.shape[-2])[-mask.dim() :]
        if mask.dim() not in (2, 4) or any(size not in (1, want) for size, want in zip(mask.shape, target)):
            return False
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]) or key.shape[-2] == 0:
        return False
    return all(t.stride(-1) == 1 for t in (query, key, value)) and query.dtype in FLOAT_DTYPES


def _broadcast(shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    """The batch dims of the call, broadcast as torch's matmul broadcasts them."""
    rank = max(len(shape) for _, shape in shapes)
    result = [1] * rank
    for name, shape in shapes:
        for index, size in enumerate(shape, rank - len(shape)):
            if size != 1 and result[index] != size:
                if result[index] != 1:
                    raise RuntimeValueError(
                        f"{name}: expected batch dims broadcastable to {tuple(result[rank - len(shape) :])} (those "
                        f"of the arguments before it), got {shape}"
                    )
                result[index] = size
    return tuple(result)


def _as_4d(tensor: torch.Tensor, prefix: tuple[int, ...], heads: int) -> torch.Tensor:
    """tensor (..., X, Y) broadcast to prefix + (heads, X, Y), viewed as (prod(prefix), heads, X, Y)."""
    tail = tuple(tensor.shape[-2:])
    if tensor.dim() == 4 and len(prefix) == 1 and tensor.shape[0] == prefix[0] and tensor.shape[1] == heads:
        return tensor  # already (B, H, X, Y): the common call pays for no view
    if tensor.dim() > 2 and tensor.shape[-3] == heads and all(size == 1 for size in tensor.shape[:-3]):
        # Nothing to broadcast but the leading dims: a view, never a copy.
        return tensor.reshape(1, heads, *tail).expand(math.prod(prefix), heads, *tail)
    return tensor.expand(*prefix, heads, *tail).reshape(math.prod(prefix), heads, *tail)


def _plain_call(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
    enable_gqa: object,
) -> SdpaPlan | None:
    """The plan of the most common call, which torch accepts, without the checks below
    (they cost as much as a small attention call): plain 4-D tensors (B, H, L, E) of one
    floating dtype and device with the same B and H, non-empty, no mask, no dropout, no
    scale, no GQA flag. None for anything else (the full path decides)."""
    if attn_mask is not None or enable_gqa is not False or scale is not None or type(is_causal) is not bool:
        return None
    if not (type(dropout_p) is float and dropout_p == 0.0):
        return None
    tensors = (query, key, value)
    if any(type(t) is not torch.Tensor or t.dim() != 4 for t in tensors):
        return None
    if not (query.dtype == key.dtype == value.dtype and query.dtype in FLOAT_DTYPES):
        return None
    if not (query.device == key.device == value.device):
        return None
    batch, heads, length_q, features = query.shape
    if key.shape[:2] != (batch, heads) or value.shape[:3] != key.shape[:3] or key.shape[3] != features:
        return None
    if length_q == 0 or 0 in value.shape or features == 0 or max(features, value.shape[3]) > MAX_HEAD_DIM:
        return None
    return tensors, plain_sdpa_options(is_causal), (batch, heads, length_q, value.shape[3])


def plain_sdpa_options(is_causal: bool) -> dict:
    """attention()'s options for torch SDPA's most common call (no mask, dropout, scale)."""
    return dict(causal=is_causal, causal_alignment="top_left", scale=None, attn_mask=None, dropout_p=0.0)


def sdpa_call(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
    enable_gqa: object,
) -> torch.Tensor | SdpaPlan:
    """The fusedattn.attention call ((q, k, v), options) that computes torch's
    scaled_dot_product_attention(query, key, value, ...), and the output's shape; or the
    output itself where torch computes no attention (no query rows or no values, head dims
    past fusedattn's largest).

    Raises what torch raises for arguments torch refuses (the class, or one derived from
    it and from fusedattn's TypeError / ValueError), with a message naming the argument.
    """
    plain = _plain_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if plain is not None:
        return plain
    query, key, value = (_tensor(name, t) for name, t in zip(NAMES, (query, key, value)))
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {_describe(attn_mask)}")
    p = _number("dropout_p", dropout_p)
    is_causal, enable_gqa = _flag("is_causal", is_causal), _flag("enable_gqa", enable_gqa)
    arguments = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    scale = None if scale is None else _number("scale", scale)
    alignment = "top_left"
    mask = attn_mask
    bias = None if mask is None else _causal_bias(mask)
    if bias is not None:
        # torch.nn.attention.bias.CausalBias: the causal alignment it names, never a mask.
        if is_causal:
            raise ValueError("attn_mask: expected no CausalBias with is_causal=True (torch refuses both)")
        mask, is_causal = None, True
        if bias.variant.name == "LOWER_RIGHT" and bias.seq_len_q != bias.seq_len_kv:
            _lower_right_inputs(query, key, value)
            alignment = "bottom_right"
            if (bias.seq_len_q, bias.seq_len_kv) != (query.shape[-2], key.shape[-2]):
                # Sizes that are not the call's: torch applies the bias's own (L, S) matrix.
                mask = torch.ones(bias.seq_len_q, bias.seq_len_kv, dtype=torch.bool, device=query.device)
                mask, is_causal = mask.tril(bias.seq_len_kv - bias.seq_len_q), False

    _check_inputs(query, key, value, mask)
    if query.shape[-2] == 0 or value.numel() == 0:
        return _zeros(query, key, value)  # torch returns before any other check
    if _torch_fused_kernel(query, key, value, mask, p, enable_gqa):
        if p != 0.0:  # only a negative or NaN dropout_p reaches torch's fused kernel
            raise RuntimeValueError(f"dropout_p: expected 0 (torch's fused CPU kernel has no dropout), got {p}")
    else:
        if p > 1.0:
            raise RuntimeValueError(f"dropout_p: expected a probability between 0 and 1, got {p}")
        if is_causal and mask is not None:
            raise RuntimeValueError(
                "attn_mask: expected None with is_causal=True for these inputs (torch's math kernel refuses both; "
                "its fused CPU kernel, which takes 4-D inputs of one head dim, applies both)"
            )
        p = max(p, 0.0) if p == p else 0.0  # torch drops nothing unless dropout_p > 0 (NaN included)
    if query.is_complex():
        raise NotImplementedTypeError(
            f"query: expected a floating dtype (torch has no complex softmax), got {query.dtype}"
        )
    if not query.is_floating_point():
        raise RuntimeTypeError(f"query: expected a floating dtype, got {query.dtype}")

    length_q, features = query.shape[-2:]
    length_k, value_features = value.shape[-2:]
    if key.shape[-1] != features:
        raise RuntimeValueError(f"key: expected {features} features (those of query), got shape {tuple(key.shape)}")
    if key.shape[-2] != length_k:
        raise RuntimeValueError(f"value: expected length {key.shape[-2]} (that of key), got shape {tuple(value.shape)}")
    heads_k = heads_v = None
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexValueError("query, key, value: expected a head dim (-3) with enable_gqa=True, got 2-D tensors")
        heads_q, heads_k, heads_v = query.shape[-3], key.shape[-3], value.shape[-3]
        if heads_q == heads_k == heads_v:
            heads_k = heads_v = None
        elif 0 in (heads_k, heads_v) or heads_q % heads_k or heads_q % heads_v:
            raise RuntimeValueError(
                f"key, value: expected numbers of heads that divide the {heads_q} of query (enable_gqa=True), "
                f"got {heads_k} and {heads_v}"
            )
    leads = [(name, tuple(tensor.shape[:-2])) for name, tensor in zip(NAMES, (query, key, value))]
    if heads_k is not None:  # torch repeats key and value heads up to the query's
        leads[1:] = [(name, shape[:-1] + (query.shape[-3],)) for name, shape in leads[1:]]
    scores = _broadcast(leads[:2])
    if mask is not None:
        # torch adds the mask to the scores in place: it must fit their shape, never widen it.
        target = (*scores, length_q, length_k)
        if mask.dim() > len(target) or any(s not in (1, t) for s, t in zip(reversed(mask.shape), reversed(target))):
            raise RuntimeValueError(
                f"attn_mask: expected a shape broadcastable to {target} (the scores), got {tuple(mask.shape)}"
            )
    batch = _broadcast([("query and key", scores), leads[2]])
    if max(features, value_features) > MAX_HEAD_DIM:
        return _TORCH_SDPA(query, key, value, **arguments)

    prefix, heads = (batch[:-1], batch[-1]) if batch else ((), 1)
    q = _as_4d(query, prefix, heads)
    k = _as_4d(key, prefix, heads if heads_k is None else heads_k)
    v = _as_4d(value, prefix, heads if heads_v is None else heads_v)
    if heads_k is not None and heads_k != heads_v:
        # fusedattn shares one head count between key and value: repeat both to a common one.
        common = math.lcm(heads_k, heads_v)
        k, v = k.repeat_interleave(common // heads_k, dim=1), v.repeat_interleave(common // heads_v, dim=1)
    if mask is not None:
        if mask.is_floating_point() and mask.dtype != q.dtype:
            if torch.finfo(mask.dtype).bits > torch.finfo(q.dtype).bits:
                # A float32 mask with a 16-bit query: torch adds it in float32 (a -1e9 that
                # float16 cannot hold, say), and so does fusedattn, by attending in float32
                # (its kernels read a mask in q's dtype); the caller rounds the output back.
                q, k, v = q.to(mask.dtype), k.to(mask.dtype), v.to(mask.dtype)
            mask = mask.to(q.dtype)
        mask = mask.reshape((1,) * (len(batch) + 2 - mask.dim()) + tuple(mask.shape))
        mask = _as_4d(mask, prefix, mask.shape[-3]) if batch else mask[None, None]
    if features == 0:
        # No features: every score is 0 (torch multiplies empty rows); one zero feature computes that.
        q, k, scale = torch.nn.functional.pad(q, (0, 1)), torch.nn.functional.pad(k, (0, 1)), 1.0
    options = dict(causal=is_causal, causal_alignment=alignment, scale=scale, attn_mask=mask, dropout_p=p)
    return (q, k, v), options, (*batch, length_q, value_features)


# ---- torch.nn.MultiheadAttention --------------------------------------------------------------
def _mha_shapes(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padding: Any, mask: Any, heads: int
) -> None:
    """torch's _mha_shape_check, with fusedattn's classes and messages (AssertionError)."""
    if query.dim() not in (2, 3):
        raise AssertionValueError(f"query: expected 2 (unbatched) or 3 dims, got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != query.dim():
            raise AssertionValueError(
                f"{name}: expected {query.dim()} dims (those of query), got {tuple(tensor.shape)}"
            )
    if padding is not None and padding.dim() != (2 if batched else 1):
        raise AssertionValueError(
            f"key_padding_mask: expected {2 if batched else 1} dims with a {query.dim()}-D query, got "
            f"{tuple(padding.shape)}"
        )
    if mask is not None and mask.dim() not in (2, 3):
        raise AssertionValueError(f"attn_mask: expected 2 or 3 dims, got {tuple(mask.shape)}")
    if (
        mask is not None
        and not batched
        and mask.dim() == 3
        and tuple(mask.shape) != (heads, *query.shape[:1], key.shape[0])
    ):
        raise AssertionValueError(
            f"attn_mask: expected shape {(heads, query.shape[0], key.shape[0])} with an unbatched query, got "
            f"{tuple(mask.shape)}"
        )


def check_multihead_call(
    module: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    need_weights: bool,
    is_causal: bool,
) -> None:
    """Raise what torch's MultiheadAttention(query, key, value, ...) raises (its class, in torch's
    order), before anything is computed; nothing for calls torch accepts."""
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        # Integer masks: torch's rule is bool or floating, nothing else (a uint8 mask is not a bool one).
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise AssertionTypeError(f"{name}: expected a bool or floating dtype, got {mask.dtype}")
    _mha_shapes(query, key, value, key_padding_mask, attn_mask, module.num_heads)
    if is_causal and attn_mask is None:
        raise RuntimeValueError(
            "attn_mask: Need attn_mask if specifying the is_causal hint (is_causal=True says attn_mask is the causal "
            "mask). You may use the Transformer module method `generate_square_subsequent_mask` to create this mask."
        )
    if query.shape[-1] != module.embed_dim:
        raise AssertionValueError(f"query: expected embedding dimension {module.embed_dim}, got {query.shape[-1]}")
    batch_dims = slice(0, query.dim() - 1)
    if module._qkv_same_embed_dim and key.shape != value.shape:
        raise AssertionValueError(f"value: expected the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
    if not module._qkv_same_embed_dim:
        if key.shape[batch_dims] != value.shape[batch_dims]:
            raise AssertionValueError(
                f"value: expected the sequence and batch dims of key {tuple(key.shape[batch_dims])}, got "
                f"{tuple(value.shape[batch_dims])}"
            )
        for name, tensor, weight in (("key", key, module.k_proj_weight), ("value", value, module.v_proj_weight)):
            if tensor.shape[-1] != weight.shape[1]:
                raise AssertionValueError(
                    f"{name}: expected {weight.shape[1]} features (kdim / vdim of the module), got {tensor.shape[-1]}"
                )
    weights = (module.in_proj_weight,) * 3 if module._qkv_same_embed_dim else (
        module.q_proj_weight, module.k_proj_weight, module.v_proj_weight,
    )  # fmt: skip
    if query.is_floating_point() and any(x.dtype != w.dtype for x, w in zip((query, key, value), weights)):
        # torch's in-projection (F.linear) refuses an input whose dtype is not its weight's.
        names = ", ".join(f"{x.dtype}" for x in (query, key, value))
        raise RuntimeTypeError(
            f"query, key, value: expected the dtype of the weights ({weights[0].dtype}), got {names}"
        )
    if not query.is_floating_point():
        # torch turns a bool mask into the query's dtype first: a complex one it then
        # refuses (AssertionError); an integer one cannot hold -inf (RuntimeError).
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype == torch.bool and query.is_complex():
                raise AssertionTypeError(f"{name}: expected a bool or floating dtype, got {mask.dtype}")
        raise RuntimeTypeError(f"query: expected a floating-point tensor, got {query.dtype}")
    if query.dim() == 3:
        first, second = (1, 0) if module.batch_first else (0, 1)
        target, batch, source = query.shape[first], query.shape[second], key.shape[first]
        key_batch = key.shape[second]
    else:  # unbatched: torch adds a batch of one
        target, batch, source, key_batch = query.shape[0], 1, key.shape[0], 1
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
    # With the causal hint and nothing else asking for the mask, torch drops attn_mask unseen.
    mask_used = attn_mask is not None and not (is_causal and key_padding_mask is None and not need_weights)
    if mask_used:
        expected = (target, source) if attn_mask.dim() == 2 else (batch * module.num_heads, target, source)
        if tuple(attn_mask.shape) != expected:
            raise RuntimeValueError(f"attn_mask: expected shape {expected}, got {tuple(attn_mask.shape)}")
    if key_batch != batch:
        raise RuntimeValueError(f"key, value: expected batch {batch} (that of query), got {key_batch}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, source):
            raise AssertionValueError(
                f"key_padding_mask: expected shape {(batch, source)}, got {tuple(key_padding_mask.shape)}"
            )
    masks = [m for m in ((attn_mask if mask_used else None), key_padding_mask) if m is not None]
    if masks:
        # torch sums the masks as float (bool ones in the query's dtype); its need_weights
        # path adds them with baddbmm (the query's dtype only), SDPA takes float32 too.
        merged = mask_dtype(masks, query.dtype)
        allowed = (query.dtype,) if need_weights else (query.dtype, torch.float32)
        if merged not in allowed:
            names = " and ".join(
                n for n, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)) if m is not None
            )
            raise RuntimeTypeError(
                f"{names}: expected float masks of dtype {' or '.join(map(str, allowed))} (query {query.dtype}, "
                f"need_weights={need_weights}), got {', '.join(str(m.dtype) for m in masks)}"
            )


def mask_dtype(masks: list[torch.Tensor], dtype: torch.dtype) -> torch.dtype:
    """The dtype of torch's summed float mask: bool masks count as dtype (the query's)."""
    result = masks[0].dtype if masks[0].dtype != torch.bool else dtype
    for mask in masks[1:]:
        result = torch.promote_types(result, mask.dtype if mask.dtype != torch.bool else dtype)
    return result
