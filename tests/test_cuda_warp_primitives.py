"""The warp primitives of csrc/cuda/warp_mma.cuh (mma.sync m16n8k16, ldmatrix, cp.async) as
the CPU emulation runs them, against plain matrix products.

csrc/cuda/emulation/primitive_checks.h computes d = 1 + a b with one m16n8k16 mma on one
emulated warp, its operands reaching the registers by the documented fragment layouts
directly, through ldmatrix (x4 for a; x2.trans or two x1 for b) after cp.async, or with
ldmatrix reading before cp.async.wait_group (which the emulation must report). Values are
small integers, so every product and sum is exact and the comparison is exact too: a single
element in the wrong lane or register changes the result.
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch

REGISTERS_FROM_LAYOUT, LDMATRIX_TRANSPOSED, LDMATRIX_PLAIN, READ_BEFORE_WAIT, NEVER_WAITED = range(5)


@pytest.fixture(scope="module")
def operators():
    return cuda_emulation.build()


def _operands(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (16, 16), generator=generator).to(dtype)
    b = torch.randint(-8, 9, (16, 8), generator=generator).to(dtype)
    return a, b


def _expected(a, b, valid_rows=16):
    a = a.double().clone()
    a[valid_rows:] = 0
    return (1 + a @ b.double()).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("check", [REGISTERS_FROM_LAYOUT, LDMATRIX_TRANSPOSED, LDMATRIX_PLAIN])
def test_mma_with_each_operand_path_is_the_matrix_product(operators, dtype, check):
    for seed in range(3):
        a, b = _operands(dtype, seed)
        d = operators.primitive_check(a, b, check, 16)
        assert torch.equal(d, _expected(a, b)), f"seed {seed}: d differs from 1 + a b"


def test_every_lane_and_register_position_matters(operators):
    # One nonzero element of a (and of b) at each position in turn: d must show it in
    # exactly the row (column) of the documented layout, whichever path loaded it.
    for check in (REGISTERS_FROM_LAYOUT, LDMATRIX_TRANSPOSED, LDMATRIX_PLAIN):
        b = torch.arange(1, 129, dtype=torch.float32).reshape(16, 8).to(torch.bfloat16)
        for row in range(16):
            for column in range(16):
                a = torch.zeros(16, 16, dtype=torch.bfloat16)
                a[row, column] = 1
                d = operators.primitive_check(a, b, check, 16)
                assert torch.equal(d, _expected(a, b)), f"check {check}: a[{row}, {column}]"


def test_cp_async_zero_fills_rows_out_of_bounds(operators):
    a, b = _operands(torch.float16, 7)
    for valid_rows in (0, 5, 9, 15):
        d = operators.primitive_check(a, b, LDMATRIX_TRANSPOSED, valid_rows)
        assert torch.equal(d, _expected(a, b, valid_rows))


def test_a_read_before_the_wait_is_reported(operators):
    a, b = _operands(torch.float16, 3)
    with pytest.raises(RuntimeError, match="while a cp.async to them is pending"):
        operators.primitive_check(a, b, READ_BEFORE_WAIT, 16)
    # The same operands with the wait in place: no error (the report is about the order).
    assert torch.equal(operators.primitive_check(a, b, LDMATRIX_TRANSPOSED, 16), _expected(a, b))


def test_a_copy_never_waited_for_is_reported(operators):
    a, b = _operands(torch.bfloat16, 4)
    with pytest.raises(RuntimeError, match="never waited for"):
        operators.primitive_check(a, b, NEVER_WAITED, 16)
