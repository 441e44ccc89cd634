"""Outputs of the CPU backend's forward (csrc/cpu/output_memory.cpp): torch's memory, whose
whole 2 MiB pages are advised MADV_HUGEPAGE when an output of at least 4 MiB is fresh from
the OS; every element is written by the kernel either way."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fusedattn
import pytest
import torch
from fusedattn._native import native
from fusedattn.ops import native_option_values
from fusedattn.validation import validate_attention

pytestmark = pytest.mark.skipif(native() is None, reason="fusedattn._C is not built")


def _plan_and_inputs(shape, dtype, causal):
    generator = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=generator).to(dtype) for _ in range(3))
    call = validate_attention(q, k, v, causal=causal)
    plan = native().CpuForwardPlan(list(call.out_shape), list(call.lse_shape), *native_option_values(call))
    return plan, q, k, v


@pytest.mark.parametrize(
    "shape, dtype, causal",
    [
        ((8, 4, 256, 128), torch.float32, False),  # 4 MiB exactly
        ((5, 4, 300, 160), torch.float32, True),  # 3.7 MiB: below the advised size
        ((6, 4, 300, 160), torch.float32, True),  # 4.4 MiB: whole huge pages and partial ends
    ],
)
def test_plan_outputs_are_written_everywhere_and_match_the_reference(shape, dtype, causal):
    plan, q, k, v = _plan_and_inputs(shape, dtype, causal)
    # Poison the memory the next output is likely to reuse (a freed heap block): a row
    # the kernel left unwritten would keep the NaN.
    for _ in range(2):
        out, lse = plan(q, k, v)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        del out, lse
    out, lse = plan(q, k, v)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
    expected, expected_lse = fusedattn.attention(
        q.double(), k.double(), v.double(), causal=causal, backend="reference", return_lse=True
    )
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    # The storage stays resizable (torch's allocator) and keeps its values.
    copy = out.clone()
    out.resize_(out.numel() + 1000)
    assert torch.equal(out[: copy.numel()].view(shape), copy)


def test_a_fresh_large_output_is_advised_huge_pages():
    # In a process whose malloc maps every block above 128 KiB (as a process that fixed its
    # mmap threshold does), each 4 MiB output is fresh memory: the mapping of its first whole
    # 2 MiB page carries MADV_HUGEPAGE ("hg" in smaps' VmFlags), from the plan and from the
    # full path alike, and every element is the kernel's (fresh pages read 0: the reference
    # has no zero row).
    script = textwrap.dedent(
        """
        import ctypes, torch, fusedattn
        from fusedattn._native import native
        from fusedattn.ops import native_option_values
        from fusedattn.validation import validate_attention
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)

        def advised(tensor):
            huge = 2 << 20
            address, inside, flags = (tensor.data_ptr() + huge - 1) // huge * huge, False, None
            for line in open("/proc/self/smaps"):
                fields = line.split()
                if "-" in fields[0] and ":" not in fields[0]:
                    low, high = (int(part, 16) for part in fields[0].split("-"))
                    inside = low <= address < high
                elif inside and fields[0] == "VmFlags:":
                    flags = fields[1:]
            return "hg" in flags

        q, k, v = (torch.randn(16, 4, 128, 128) for _ in range(3))
        call = validate_attention(q, k, v)
        plan = native().CpuForwardPlan(list(call.out_shape), list(call.lse_shape), *native_option_values(call))
        plan(q, k, v)
        out, _ = plan(q, k, v)
        # A call with an option tensor takes the full path (backends/cpu.py forward).
        lengths = torch.full((16,), 128, dtype=torch.int32)
        full_path = fusedattn.attention(q, k, v, key_lengths=lengths, backend="cpu")
        expected = fusedattn.attention(q.double(), k.double(), v.double(), backend="reference")
        torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(full_path.double(), expected, atol=2e-6, rtol=2e-6)
        print(advised(out), advised(full_path), advised(torch.empty(16, 4, 128, 128)))
        """
    )
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "False"]  # torch.empty's is not advised


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("dim", "dim_v", "heads_q", "heads_kv"), [(40, 80, 4, 2), (128, 128, 2, 2), (8, 24, 3, 1)])
def test_bfloat16_packed_tiles_of_many_query_blocks(dim, dim_v, heads_q, heads_kv, causal):
    # Several 64-row query blocks per (sequence, KV head): K and V are packed once as
    # bfloat16 pairs into slots half a float32 tile's size; odd and padded head dims.
    from fusedattn.outputs import poisoned_outputs

    generator = torch.Generator().manual_seed(dim * 7 + dim_v)
    q = torch.randn(2, heads_q, 200, dim, generator=generator).bfloat16()
    k = torch.randn(2, heads_kv, 230, dim, generator=generator).bfloat16()
    v = torch.randn(2, heads_kv, 230, dim_v, generator=generator).bfloat16()
    with poisoned_outputs():
        out, lse = fusedattn.attention(q, k, v, causal=causal, backend="cpu", return_lse=True)
    expected, expected_lse = fusedattn.attention(
        q.double(), k.double(), v.double(), causal=causal, backend="reference", return_lse=True
    )
    torch.testing.assert_close(out.double(), expected.bfloat16().double(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-2, rtol=1e-3)
