"""A kept fuzzing campaign over fusedattn's public entry points (docs/reliability.md).

Modules:
    tensors     hypothesis strategies for dtypes, layouts (strides, offsets, zero strides)
                and special values (NaN, Inf, huge, denormal)
    case        the Case a strategy draws: the call, the fault it carries (if any), its oracle
    dense       fusedattn.attention, attention_varlen and scaled_dot_product_attention
    compat      fusedattn.compat's flash_attn_func, flash_attn_varlen_func (dense and paged)
                and flash_attn_with_kvcache (dense and paged caches, appends)
    module      fusedattn.nn.MultiheadAttention against torch.nn.MultiheadAttention
    oracle      classifies one run as match, refused, crash or wrong
    campaign    the hypothesis-driven loop and its figures
    runner      `python -m tests.fuzz`: a supervised child process, JSON figures, exit status
"""
