"""Attention backends: one module each, discovered by fusedattn.dispatch.

A backend module defines ``BACKEND = Backend(...)`` (see base.py). Nothing else in the
package names a backend, so adding one is adding a module here plus its kernels.
"""
