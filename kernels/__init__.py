"""Triton kernels, installed as fusedattn.kernels.

Importing this package never needs a GPU. Kernel modules import triton themselves;
the triton backend reports itself unavailable when triton is missing.
"""
