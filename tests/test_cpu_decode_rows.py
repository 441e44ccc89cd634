"""Decoding on the CPU backend with every GQA group size from 1 to 8 query rows per KV head.

decode_scores reads K key by key, four query rows at a time (a pass of 4 and a remainder of
1-3 rows), prefetching each key's V row as it goes; these cases reach every remainder, tile
tails that are not a multiple of 16 keys, and a paged cache (rows read through the block
table). Checked against the float64 reference with outputs poisoned first.
"""

from __future__ import annotations

import pytest
import torch
from fusedattn.backends.cpu import BACKEND
from fusedattn.testing import assert_backend_matches, paged_case

available, why = BACKEND.availability()
pytestmark = pytest.mark.skipif(not available, reason=f"cpu backend unavailable: {why}")


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_every_group_size(group: int, dtype: torch.dtype) -> None:
    torch.manual_seed(group)
    heads_kv = 2
    q = torch.randn(2, heads_kv * group, 1, 64, dtype=dtype)
    k = torch.randn(2, heads_kv, 150, 64, dtype=dtype)
    v = torch.randn(2, heads_kv, 150, 64, dtype=dtype)
    assert_backend_matches("cpu", q, k, v, key_lengths=torch.tensor([150, 83], dtype=torch.int32))
    # D 128 (V rows of two column passes) and a tail of 9 keys.
    q = torch.randn(1, heads_kv * group, 1, 128, dtype=dtype)
    k = torch.randn(1, heads_kv, 201, 128, dtype=dtype)
    v = torch.randn(1, heads_kv, 201, 128, dtype=dtype)
    assert_backend_matches("cpu", q, k, v)


@pytest.mark.parametrize("group", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_paged_cache_every_group_size(group: int, dtype: torch.dtype) -> None:
    # Rows through a block table (blocks of 16 keys): a tile's key and value row pointers
    # are gathered, not strided.
    generator = torch.Generator().manual_seed(10 + group)
    (q, key_cache, value_cache), paged = paged_case(
        (1, 1),
        (150, 83),
        block_size=16,
        heads_q=2 * group,
        heads_kv=2,
        head_dim=128,
        dtype=dtype,
        generator=generator,
    )
    assert_backend_matches("cpu", q, key_cache, value_cache, **paged)
