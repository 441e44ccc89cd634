"""Drop-in torch.nn modules backed by fusedattn.

from fusedattn.nn import MultiheadAttention, swap_modules
layer = MultiheadAttention(embed_dim=64, num_heads=4, batch_first=True)
swap_modules(model)  # every torch.nn.MultiheadAttention inside model now runs fusedattn
"""

from .multihead_attention import MultiheadAttention, swap_modules

__all__ = ["MultiheadAttention", "swap_modules"]
