"""fusedattn: fused attention kernels for PyTorch behind one API.

    import fusedattn
    out = fusedattn.attention(q, k, v, causal=True)          # (B, H, S, D)
    out = fusedattn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    out = fusedattn.attention_paged(q, key_cache, value_cache, block_table, cache_lengths, cu_q, max_q)
    torch.nn.functional.scaled_dot_product_attention = fusedattn.scaled_dot_product_attention
    print(fusedattn.explain(q, k, v, causal=True))

docs/semantics.md defines the function every backend computes.
"""

from .api import attention, attention_paged, attention_varlen, explain, scaled_dot_product_attention
from .dispatch import UnsupportedCallError, availability, registry
from .ops import ops_for
from .quantization import append_quantized_kv, quantize_kv
from .semantics import AttentionCall

__version__ = "0.1.0"

# Discover the backends, probe their availability and define their custom ops now,
# eagerly: doing it lazily inside a torch.compile trace would break the graph
# (torch.library.Library() cannot be traced).
for _backend in registry().values():
    availability(_backend)
    ops_for(_backend)
del _backend


# Submodules reachable as attributes after `import fusedattn` (fusedattn.nn.MultiheadAttention),
# imported on first access so that `import fusedattn` does not pay for them.
_LAZY_SUBMODULES = ("bench", "compat", "integrations", "nn", "parity", "testing")


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def list_backends() -> list[str]:
    """Names of every backend module found (available or not)."""
    return list(registry())


__all__ = [
    "AttentionCall",
    "UnsupportedCallError",
    "append_quantized_kv",
    "attention",
    "attention_paged",
    "attention_varlen",
    "list_backends",
    "explain",
    "quantize_kv",
    "scaled_dot_product_attention",
    "__version__",
]
