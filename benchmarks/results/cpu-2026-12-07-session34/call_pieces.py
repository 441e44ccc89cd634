"""What a plain repeated fusedattn.attention call spends before its remembered plan runs:
each piece of repeat_calls' key and lookup timed alone (timeit, best of five rounds of
200000 calls, microseconds), B1 H1 Sk16 D64 fp32.

    OMP_NUM_THREADS=1 python call_pieces.py
"""

import timeit

import fusedattn
import torch
from fusedattn import dispatch, environment, ops, repeat_calls  # noqa: F401  (used by the timed statements)

q = torch.randn(1, 1, 1, 64)
k = torch.randn(1, 1, 16, 64)
v = torch.randn_like(k)
fusedattn.attention(q, k, v)
key = repeat_calls.dense_key(q, k, v, False, "bottom_right", None, None, None, 0, 0, "auto", scales=(None, None))
plan = repeat_calls.lookup(key)
names = dict(globals())
for statement in (
    "fusedattn.attention(q, k, v)",
    "repeat_calls.dense_key(q, k, v, False, 'bottom_right', None, None, None, 0, 0, 'auto', scales=(None, None))",
    "ops.plain_eager_context()",
    "repeat_calls._plain_tensors_key(q, k, v, None, None)",
    "dispatch.choice_context(q.is_cuda)",
    "environment.backend_choice_key()",
    "dispatch.registry_key()",
    "repeat_calls.lookup(key)",
    "plan(q, k, v)",
):
    seconds = min(timeit.repeat(statement, globals=names, number=200000, repeat=5)) / 200000
    print(f"{seconds * 1e6:6.3f} us  {statement}")
