"""Integrations with other libraries (imported on demand; each needs its library installed).

fusedattn.integrations.transformers: ``attn_implementation="fusedattn"`` for Hugging Face models.
"""
