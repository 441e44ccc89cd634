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
  PyTorch from the same call, dropout pattern included; pass ``need_weights=False`` to
  skip that (O(L * S)) work.

One deliberate difference: a query whose keys are all masked gets a zero output, where
torch returns NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import semantics
from ..api import attention
from ..validation import validate_attention
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
        self._refuse_like_torch(query, key, value, key_padding_mask, attn_mask, is_causal and not need_weights)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        return self._attend(query, key, value, key_padding_mask, None, need_weights, attn_mask,
                            average_attn_weights, is_causal)  # fmt: skip

    def _refuse_like_torch(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        causal_hint_used: bool,
    ) -> None:
        """Raise what torch's MultiheadAttention raises for these inputs (the same checks,
        through torch's own helpers where it has them), before anything is computed."""
        # torch's _canonical_mask checks (without its deprecation warning, which stops torch.compile).
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
                raise AssertionError(f"only bool and floating types of {name} are supported")
        F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim:
            batch_dims = slice(0, 2) if query.dim() == 3 else slice(0, 1)
            if key.shape[batch_dims] != value.shape[batch_dims]:
                raise AssertionError(
                    f"key's sequence and batch dims {key.shape[batch_dims]} do not match value's "
                    f"{value.shape[batch_dims]}"
                )
            for name, tensor, weight in (("key", key, self.k_proj_weight), ("value", value, self.v_proj_weight)):
                if tensor.shape[-1] != weight.shape[1]:
                    raise AssertionError(
                        f"expecting {name} weights shape of {(self.embed_dim, tensor.shape[-1])}, "
                        f"but got {tuple(weight.shape)}"
                    )
        weights = (self.in_proj_weight,) * 3 if self._qkv_same_embed_dim else (
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
        )  # fmt: skip
        if query.is_floating_point() and any(x.dtype != w.dtype for x, w in zip((query, key, value), weights)):
            # torch's in-projection (F.linear) refuses an input whose dtype is not its weight's.
            names = ", ".join(f"{x.dtype}" for x in (query, key, value))
            raise RuntimeError(
                f"query, key, value: expected the dtype of the weights ({weights[0].dtype}), got {names}"
            )
        if not query.is_floating_point():
            # torch turns a bool mask into the query's dtype first: a complex one it then
            # refuses (AssertionError); an integer one cannot hold -inf (RuntimeError).
            for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
                if mask is not None and mask.dtype == torch.bool and query.is_complex():
                    raise AssertionError(f"only bool and floating types of {name} are supported")
            raise RuntimeError(f"query: expected a floating-point tensor, got {query.dtype}")
        if query.dim() == 3:
            first, second = (1, 0) if self.batch_first else (0, 1)
            target, batch, source = query.shape[first], query.shape[second], key.shape[first]
        else:  # unbatched: torch adds a batch of one
            target, batch, source = query.shape[0], 1, key.shape[0]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if attn_mask is not None and not (causal_hint_used and key_padding_mask is None):
            expected = (target, source) if attn_mask.dim() == 2 else (batch * self.num_heads, target, source)
            if attn_mask.shape != expected:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be {expected}."
                )
        if key_padding_mask is not None:
            for dim, expected in ((0, batch), (1, source)):
                if key_padding_mask.shape[dim] != expected:
                    raise AssertionError(
                        f"Expected key_padded_mask.shape[{dim}] to be {expected}, but got {key_padding_mask.shape[dim]}"
                    )

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
        """In-projections of (N, L, E), (N, S, kdim), (N, S, vdim) inputs: three (N, *, E)."""
        if self._qkv_same_embed_dim and query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

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
        same_key_value = key is value
        self_attention = query is key and same_key_value
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if self_attention:
            key = value = query
        elif same_key_value:
            value = key
        batch, target_length, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch uses the hint instead of the mask here
        else:
            is_causal = False
        q, k, v = self._projections(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)
        q = q.view(batch, target_length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(batch, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_keys(attn_mask), _pad_keys(key_padding_mask)

        dropout_p = self.dropout if self.training else 0.0
        options = dict(
            causal=is_causal,
            causal_alignment="top_left",
            attn_mask=_fusedattn_mask(attn_mask, key_padding_mask, batch, heads, q.dtype),
            key_lengths=key_lengths,
            dropout_p=dropout_p,
            # The weights must show the kernel's dropout pattern, so the seed is drawn here.
            dropout_seed=int(torch.randint(0, 2**62, ()).item()) if need_weights and dropout_p > 0 else None,
        )
        out = attention(q, k, v, **options)
        out = F.linear(out.transpose(1, 2).reshape(batch, target_length, -1), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        with torch.no_grad():
            weights, keep = attention_probabilities(validate_attention(q, k, v, **options))
        if keep is not None:
            weights = weights * keep * semantics.dropout_keep_scale(dropout_p)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights[0]


def swap_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch.nn.MultiheadAttention in model a fusedattn one, in place.

    The modules keep their parameters (and so their weights, devices, dtypes and optimizer
    references); submodules of other types are untouched. Returns model.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            MultiheadAttention.from_torch(module)
    return model
