"""torch.nn.MultiheadAttention with fusedattn computing the attention.

:class:`MultiheadAttention` subclasses torch's module, so the constructor, parameters,
state_dict keys, attributes and isinstance checks are torch's own; only ``forward``
changes. It translates torch's conventions into a :func:`fusedattn.attention` call:

* ``key_padding_mask`` (N, S) bool uses True = ignore; fusedattn's bool masks use
  True = attend, so it becomes ``~key_padding_mask`` viewed as (N, 1, 1, S) (never
  expanded); float masks are additive in both.
* ``attn_mask`` (L, S) or (N * num_heads, L, S): bool True = ignore, or float additive.
* ``is_causal`` is torch's hint that ``attn_mask`` is the causal mask: as torch does, the
  mask is then replaced by causal masking (aligned top-left) when there is no
  key_padding_mask and no weights are asked for.
* Attention weights (``need_weights=True``, torch's default) are recomputed in plain
  PyTorch from the same call, dropout pattern included, on autograd's graph; pass
  ``need_weights=False`` to skip that (O(L * S)) work.
* Inputs torch refuses are refused first, with torch's exception class
  (fusedattn.validation_dropin.check_multihead_call); projections run in torch's (L, N, E)
  layout, so F.linear rounds and refuses dtypes as it does for torch.

docs/swap-in.md lists what still differs from torch (a query whose keys are all masked
gets a zero output, where torch's weights path returns NaN, for one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import semantics
from ..api import attention
from ..errors import RuntimeTypeError
from ..validation import validate_attention
from ..validation_dropin import check_multihead_call, mask_dtype
from .weights import attention_probabilities

__all__ = ["MultiheadAttention", "swap_modules"]


def _disable_layer_fast_path(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing.

    nn.TransformerEncoderLayer's inference fast path runs torch's fused kernel on the
    attention weights directly and never calls self_attn; it is skipped whenever a
    module inside the layer has a hook. This one keeps fusedattn in charge.
    """
    return None


def _install(module: torch.nn.MultiheadAttention) -> None:
    if _disable_layer_fast_path not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_disable_layer_fast_path)


def _pad_keys(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key column that everyone may attend (False = not ignored, 0 = no bias)."""
    return None if mask is None else F.pad(mask, (0, 1))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask with True = ignore, or a float mask, as an additive mask in dtype."""
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _fusedattn_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """torch MHA's masks (True = ignore) as one fusedattn mask (bool True = attend, or additive).

    attn_mask (L, S) or (N * heads, L, S); key_padding_mask (N, S). Broadcastable views
    are kept as views; the two masks are merged only when both are given.
    """
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(batch, 1, 1, key_padding_mask.shape[-1])
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        ignored = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~ignored
    combined = _additive(masks[0], dtype)
    return combined if len(masks) == 1 else combined + _additive(masks[1], dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention whose attention runs in fusedattn.

    Same constructor (embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
    dtype=None), parameters and state_dict keys as torch's module: it loads a torch
    module's state_dict and returns the same outputs.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _install(self)

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """Turn a torch MultiheadAttention into this class in place, keeping its parameters."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if not isinstance(module, cls):
            # No state is added by this subclass, so changing the class keeps every
            # parameter, buffer, hook and reference (optimizers included) intact.
            module.__class__ = cls
        _install(module)
        return module

    def __prepare_scriptable__(self) -> MultiheadAttention:
        """torch.jit.script calls this on every module it is about to compile: refuse here,
        at script time, with the reason, rather than with a TorchScript parse error."""
        raise RuntimeError(
            "fusedattn.nn.MultiheadAttention does not support TorchScript (torch.jit.script): a scripted "
            "module runs without Python, and fusedattn checks its arguments and picks a kernel in Python. "
            "Use torch.compile (it captures fusedattn's kernels, no graph breaks), or script a "
            "torch.nn.MultiheadAttention loaded with this module's state_dict (the keys are the same)."
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch.nn.MultiheadAttention.forward.

        Args:
            query: (L, N, E) or (N, L, E) with batch_first, or (L, E) unbatched.
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim); value likewise with vdim.
            key_padding_mask: (N, S) or (S,); bool True = ignore that key, or float additive.
            need_weights: also return the attention weights.
            attn_mask: (L, S) or (N * num_heads, L, S); bool True = not allowed, or float additive.
            average_attn_weights: average the weights over heads.
            is_causal: hint that attn_mask is the causal mask (it must be given).

        Returns:
            (attn_output shaped like query with E features, weights (N, L, S) averaged or
            (N, num_heads, L, S), unbatched without N; None unless need_weights).
        """
        if query.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        check_multihead_call(self, query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        if self.head_dim > semantics.MAX_HEAD_DIM:  # past fusedattn's kernels: torch's own implementation
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        return self._attend(query, key, value, key_padding_mask, None, need_weights, attn_mask,
                            average_attn_weights, is_causal)  # fmt: skip

    def _forward_nested(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over a nested (N, L_i, E) query, as nn.TransformerEncoder sends it."""
        # nn.TransformerEncoder packs padded batches into nested tensors in inference; the
        # lengths of the pieces are exactly fusedattn's key_lengths.
        if query is not key or key is not value or key_padding_mask is not None or attn_mask is not None:
            raise RuntimeError(
                "MultiheadAttention: NestedTensor input is supported for self-attention without masks only"
            )
        lengths = torch.tensor([piece.shape[0] for piece in query.unbind()], device=query.device)
        padded = query.to_padded_tensor(0.0)
        out, weights = self._attend(padded, padded, padded, None, lengths, need_weights, None, True, is_causal)
        valid = torch.arange(padded.shape[1], device=query.device)[None, :] < lengths[:, None]
        return torch._nested_tensor_from_mask(out, valid, mask_check=False), weights

    def _projections(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-projections of (L, N, E), (S, N, kdim), (S, N, vdim) inputs: three (*, N, E)."""
        if self._qkv_same_embed_dim and query is key and key is value:
            return _linear("in_proj_bias", query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(_linear("in_proj_bias", x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        key_lengths: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward() for dense inputs (see its docstring); key_lengths (N,) masks padded keys."""
        batched = query.dim() == 3
        # torch's layout, (L, N, E): the projections then take torch's F.linear path, with
        # its rounding and its dtype rules (a half in_proj_bias on a float64 module, say).
        if not batched:
            query, key, value = _same_tensors(lambda x: x.unsqueeze(1), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif self.batch_first:
            query, key, value = _same_tensors(lambda x: x.transpose(0, 1), query, key, value)
        target_length, batch, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch uses the hint instead of the mask here
        else:
            is_causal = False
        q, k, v = self._projections(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)
        q, k, v = (x.reshape(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)

        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        dtype = q.dtype
        if masks and mask_dtype(masks, dtype) != dtype:
            # A float32 mask with a 16-bit query (need_weights=False): torch's SDPA adds it in
            # float32 (a -1e9 that float16 cannot hold, say), and so does fusedattn, by
            # attending in float32 (its kernels read a mask in q's dtype).
            dtype = mask_dtype(masks, dtype)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        dropout_p = self.dropout if self.training else 0.0
        options = dict(
            causal=is_causal,
            causal_alignment="top_left",
            attn_mask=_fusedattn_mask(attn_mask, key_padding_mask, batch, heads, dtype),
            key_lengths=key_lengths,
            dropout_p=dropout_p,
            # The weights must show the kernel's dropout pattern, so the seed is drawn here.
            dropout_seed=int(torch.randint(0, 2**62, ()).item()) if need_weights and dropout_p > 0 else None,
        )
        out = attention(q, k, v, **options).to(query.dtype)
        out = out.permute(2, 0, 1, 3).reshape(target_length * batch, -1)  # torch's (L * N, E), then its out_proj
        out = _linear("out_proj.bias", out, self.out_proj.weight, self.out_proj.bias).view(target_length, batch, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        # On autograd's graph (when grad mode is on), as torch's weights are.
        weights, keep = attention_probabilities(validate_attention(q, k, v, **options), differentiable=True)
        if keep is not None:
            weights = weights * keep * semantics.dropout_keep_scale(dropout_p)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights[0]


def _same_tensors(change, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """change applied to each input, keeping which of them are one tensor (torch's packed
    self-attention projection depends on it)."""
    query_changed = change(query)
    key_changed = query_changed if key is query else change(key)
    return query_changed, key_changed, key_changed if value is key else change(value)


def _linear(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, whose dtype refusals (a bias of another dtype, on its addmm path) name the argument."""
    try:
        return F.linear(x, weight, bias)
    except RuntimeError as error:
        if bias is None or bias.dtype == weight.dtype:
            raise
        raise RuntimeTypeError(
            f"{name}: expected dtype {weight.dtype} (that of the weight), got {bias.dtype}: {error}"
        ) from error


def swap_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch.nn.MultiheadAttention in model a fusedattn one, in place.

    The modules keep their parameters (and so their weights, devices, dtypes and optimizer
    references); submodules of other types are untouched. Returns model.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            MultiheadAttention.from_torch(module)
    return model
