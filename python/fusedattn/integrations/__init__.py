"""Integrations with other libraries (imported on demand; each needs its library installed).

fusedattn.integrations.transformers: ``attn_implementation="fusedattn"`` for Hugging Face models.
fusedattn.integrations.transformers_cache: an 8-bit KV cache (QuantizedKVCache) it reads in place.
"""

_INTEGRATIONS = ("transformers", "transformers_cache")


def __getattr__(name: str) -> object:
    # fusedattn.integrations.transformers works without its own import statement; the
    # library it wraps is imported only then.
    if name in _INTEGRATIONS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
