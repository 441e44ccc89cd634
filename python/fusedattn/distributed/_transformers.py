"""Hugging Face transformers with its sequence sharded over a group: ``attn_implementation="fusedattn_ring"``.

    import fusedattn.distributed as fd
    fd.register_transformers(group=None, placement="zigzag")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fusedattn_ring")
    ids = fd.shard_sequence(input_ids, dim=1, placement="zigzag")
    positions = fd.shard_sequence(torch.arange(S)[None], dim=1, placement="zigzag")
    logits = model(input_ids=ids, position_ids=positions).logits   # this rank's tokens

Each rank runs the model on its tokens with their global position ids (rotary embeddings
need them); every attention layer is one ring_attention call over the group (the module's
causal flag, sliding window, softcap, dropout and gpt-oss sinks are passed on). Padding
masks are refused: pack or trim the batch so that every row is a full sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

IMPLEMENTATION_NAME = "fusedattn_ring"


def register_transformers(
    group: dist.ProcessGroup | None = None, placement: str = "contiguous", name: str = IMPLEMENTATION_NAME
) -> str:
    """Register ring attention over group with transformers' Attention(Mask)Interface.

    After this, ``attn_implementation=name`` runs every attention layer as ring_attention
    over group, with the shards cut by placement. Returns name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ..integrations.transformers import window_of
    from . import ring_attention

    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """query (B, Hq, S_local, D), key/value (B, Hkv, S_local, D) -> ((B, S_local, Hq, D), None)."""
        if attention_mask is not None:
            raise NotImplementedError(f"attn_implementation={name!r}: padding masks are not supported")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        window = window_of(sliding_window, causal)
        options: dict[str, Any] = dict(causal=causal, window=window, scale=scaling, softcap=softcap)
        if dropout:
            options["dropout_p"] = dropout
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        if sinks is not None:
            options["sinks"] = sinks
        out = ring_attention(query, key, value, group=group, placement=placement, **options)
        return out.transpose(1, 2).contiguous(), None

    def mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
        # Causality and windows come from the module; the shards are not one block of
        # the sequence, so no local mask could describe them.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError(f"attn_implementation={name!r}: padding masks are not supported")
        return None

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask)
    return name
