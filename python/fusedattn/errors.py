"""Exception classes that must be more than one built-in exception at once."""

from __future__ import annotations


class CacheMetadataError(ValueError, RuntimeError):
    """Out-of-range values in KV-cache metadata (block_table, cache_seqlens / cache_lengths,
    cache_batch_idx, cache_leftpad).

    A ValueError like every other bad value fusedattn refuses, and a RuntimeError because
    flash-attn raises one for these: code written for flash_attn_with_kvcache catches
    RuntimeError, and fusedattn.compat must not slip past it.
    """


# fusedattn's torch drop-ins (scaled_dot_product_attention, nn.MultiheadAttention) refuse
# what torch refuses with torch's class (RuntimeError or AssertionError), and stay the
# TypeError (wrong type or dtype) or ValueError (wrong shape or value) of fusedattn's API.
class RuntimeValueError(ValueError, RuntimeError):
    """A wrong shape or value, where torch raises RuntimeError."""


class RuntimeTypeError(TypeError, RuntimeError):
    """A wrong dtype, where torch raises RuntimeError."""


class AssertionValueError(ValueError, AssertionError):
    """A wrong shape or value, where torch raises AssertionError."""


class AssertionTypeError(TypeError, AssertionError):
    """A wrong dtype, where torch raises AssertionError."""


class IndexValueError(ValueError, IndexError):
    """A wrong shape, where torch raises IndexError (a dimension it looks up is missing)."""


class NotImplementedTypeError(TypeError, NotImplementedError):
    """A dtype torch has no kernel for (NotImplementedError, itself a RuntimeError)."""
