"""The CPU kernels' softcap tanh (`tanh_vector`), read back through the log-sum-exp.

One query row against one key with scale 1 gives lse = softcap * tanh(score / softcap)
exactly as the kernel computed it (the row's only probability is exp(0) = 1), so the lse
shows the kernel's tanh with only the rounding of score / cap and of the product by the cap
added. A 16-lane vector of scores takes the odd series when every |score / cap| is under
1/8 and the rational function otherwise; at a large cap, a second key whose capped score
is -cap (so far below the row's max that its exp is 0) puts a small first score through
the rational function too. Every instruction-set variant is checked: each compiles its own tanh.
"""

from __future__ import annotations

import math

import fusedattn
import pytest
import torch
from fusedattn.backends.cpu import BACKEND

available, why = BACKEND.availability()
pytestmark = pytest.mark.skipif(not available, reason=f"cpu backend unavailable: {why}")

# tanh's relative error bound (docs in vector_math.inc: under 4e-7) plus the two roundings
# around it (score / cap, cap * tanh) and the lse's max + log(1).
RELATIVE_BOUND = 1e-6


def capped_lse(ratios: torch.Tensor, cap: float, second_key: bool) -> torch.Tensor:
    """lse of rows whose first score is cap * ratios[i] (float32 lse, one per row)."""
    rows, dim = ratios.numel(), 16
    q = torch.zeros(1, 1, rows, dim)
    q[0, 0, :, 0] = (ratios.double() * cap).float()
    q[0, 0, :, 1] = 1.0
    keys = 2 if second_key else 1
    k = torch.zeros(1, 1, keys, dim)
    k[0, 0, 0, 0] = 1.0  # score = cap * ratio
    if second_key:
        k[0, 0, 1, 1] = -9.0 * cap  # score = -9 cap: capped to about -cap
    v = torch.randn(1, 1, keys, dim)
    _, lse = fusedattn.attention(q, k, v, softcap=cap, scale=1.0, backend="cpu", return_lse=True)
    return lse[0, 0]


def expected_lse(ratios: torch.Tensor, cap: float) -> torch.Tensor:
    scores = (ratios.double() * cap).float().double()  # the score the kernel sees
    return cap * torch.tanh(scores / cap)


def check(ratios: torch.Tensor, cap: float, second_key: bool) -> None:
    got = capped_lse(ratios, cap, second_key).double()
    want = expected_lse(ratios, cap)
    assert not torch.isnan(got).any()
    relative = ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    assert relative < RELATIVE_BOUND, f"tanh relative error {relative:.3g} at cap {cap}"


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512bf16"])
def test_softcap_tanh_is_relatively_exact(isa: str, cpu_variant) -> None:
    cpu_variant(isa)
    magnitudes = torch.logspace(-6, math.log10(30.0), 400, dtype=torch.float64)
    steps = torch.linspace(-9.5, 9.5, 381, dtype=torch.float64)
    ratios = torch.cat([magnitudes, -magnitudes, steps[steps != 0]])
    for cap in (2.0, 50.0, 1e5):
        check(ratios, cap, second_key=False)  # the series below 1/8, the rational function above
    small = torch.cat([magnitudes[magnitudes < 1.0], steps[(steps.abs() <= 1.0) & (steps != 0)]])
    for cap in (1e3, 1e5):  # exp(-cap (1 - tanh(1))) is 0 in float32 from cap 440 on
        check(small, cap, second_key=True)  # every lane through the rational function
    # tanh(0) is 0, past the clamp tanh is +-1 (also for +-inf scores), a NaN score stays NaN.
    q = torch.zeros(1, 1, 4, 16)
    q[0, 0, :, 0] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    k = torch.zeros(1, 1, 1, 16)
    k[0, 0, 0, 0] = 1.0
    _, lse = fusedattn.attention(q, k, torch.ones(1, 1, 1, 16), softcap=3.0, scale=1.0, backend="cpu", return_lse=True)
    assert lse[0, 0, 0].item() == 3.0 and lse[0, 0, 1].item() == -3.0
    assert math.isnan(lse[0, 0, 2].item()) and lse[0, 0, 3].item() == 0.0
