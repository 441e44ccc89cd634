"""An 8-bit KV cache for Hugging Face transformers, read by ``attn_implementation="fusedattn"``.

    import fusedattn.integrations.transformers as fusedattn_hf
    from fusedattn.integrations.transformers_cache import QuantizedKVCache

    fusedattn_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fusedattn")
    cache = QuantizedKVCache(model.config, torch.float8_e4m3fn)  # or torch.int8
    model.generate(ids, past_key_values=cache, max_new_tokens=64)

Each layer keeps K and V as float8_e4m3fn or int8 with one float32 scale per token and KV
head (fusedattn.quantize_kv: a row's largest |x| maps to the format's largest value), in
buffers that grow by doubling; new tokens are quantized and written in place
(fusedattn.append_quantized_kv). ``update`` hands the attention function the 8-bit keys and
values themselves, each carrying its scales in the attribute named by
``fusedattn.integrations.transformers.DESCALE_ATTRIBUTE``; the attention function passes
them on as ``k_descale`` / ``v_descale``, so the kernels read the 8-bit cache where it lies
(no dequantized copy). Only ``attn_implementation="fusedattn"`` reads such a cache: another
attention function would get 8-bit tensors and refuse them.

Every token is kept (no sliding-window eviction: the kernels apply windows). Beam search's
reordering, the batch operations of generate and ``crop`` move or drop each row's scales
with it; offloading is not supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..quantization import append_quantized_kv
from ..semantics import QUANTIZED_KV_DTYPES
from .transformers import DESCALE_ATTRIBUTE

__all__ = ["QuantizedKVCache", "QuantizedKVLayer"]


class QuantizedKVLayer(DynamicLayer):
    """One layer's 8-bit K and V: buffers (B, Hkv, capacity, D) and scales (B, Hkv, capacity)."""

    def __init__(self, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        if dtype not in QUANTIZED_KV_DTYPES:
            raise TypeError(f"dtype: expected torch.float8_e4m3fn or torch.int8, got {dtype}")
        super().__init__()
        self.quantized_dtype = dtype
        self.length = 0
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.key_scales = self._buffers(key_states, 0)
        self.values, self.value_scales = self._buffers(value_states, 0)
        self.is_initialized = True

    def _buffers(self, states: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _, dim = states.shape
        values = torch.zeros(batch, heads, capacity, dim, dtype=self.quantized_dtype, device=states.device)
        return values, torch.ones(batch, heads, capacity, dtype=torch.float32, device=states.device)

    def _grow(self, needed: int) -> None:
        """Room for needed tokens: the buffers double (amortized O(1) copies per token)."""
        capacity = self.keys.shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity)
        for name, scales_name in (("keys", "key_scales"), ("values", "value_scales")):
            old, old_scales = getattr(self, name), getattr(self, scales_name)
            new, new_scales = self._buffers(old, capacity)
            new[:, :, : self.length] = old[:, :, : self.length]
            new_scales[:, :, : self.length] = old_scales[:, :, : self.length]
            setattr(self, name, new)
            setattr(self, scales_name, new_scales)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize key_states / value_states (B, Hkv, S_new, D) into the cache, in place, and
        return the cached (B, Hkv, length, D) 8-bit views, each with its scales attached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[2]
        self._grow(end)
        rows = (slice(None), slice(None), slice(start, end))
        append_quantized_kv(self.keys, self.key_scales, key_states, rows)
        append_quantized_kv(self.values, self.value_scales, value_states, rows)
        self.length = end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        setattr(keys, DESCALE_ATTRIBUTE, self.key_scales[:, :, :end])
        setattr(values, DESCALE_ATTRIBUTE, self.value_scales[:, :, :end])
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def _change_batch(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply change (along the batch dim) to K, V and their scales alike: a scale left
        behind would dequantize another sequence's row."""
        if self.get_seq_length() > 0:
            for name in ("keys", "values", "key_scales", "value_scales"):
                setattr(self, name, change(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._change_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._change_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._change_batch(lambda buffer: buffer[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (transformers' convention: a negative count);
        their rows stay allocated and the next update overwrites them."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self.key_scales = self.value_scales = None


class QuantizedKVCache(Cache):
    """A transformers Cache of :class:`QuantizedKVLayer`, one per decoder layer of config."""

    def __init__(self, config: object, dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[QuantizedKVLayer(dtype) for _ in range(layers)])
