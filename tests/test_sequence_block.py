"""query_start / key_start: a call that is one block of a longer sequence.

The block's rows and keys take their global positions (causal, windows, ALiBi) and their
global indices in the dropout hash, so blocks merged by their lse give exactly the call
on the whole sequence: the property context parallelism (fusedattn.distributed) rests on.
"""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn.backends.base import CallProfile
from fusedattn.backends.cpu import BACKEND as CPU_BACKEND
from fusedattn.backends.cuda import BACKEND as CUDA_BACKEND
from fusedattn.backends.triton import BACKEND as TRITON_BACKEND
from fusedattn.testing import assert_backend_matches
from fusedattn.validation import LATEST_SEQUENCE_START, validate_attention

OPTIONS = {
    "causal": {"causal": True},
    "window": {"window": (7, 3)},
    "causal_window": {"causal": True, "window": (5, None)},
    "alibi": {"alibi_slopes": "per_head", "causal": True},
    "alibi_non_causal": {"alibi_slopes": "per_head"},
    "dropout": {"dropout_p": 0.3, "dropout_seed": 5, "causal": True},
    "softcap_key_lengths": {"softcap": 3.0, "causal": True, "key_lengths": "short"},
}


def _inputs(dtype: torch.dtype, seqlen: int = 40):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, seqlen, 16, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 2, seqlen, 16, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 2, seqlen, 16, generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v


def _options(name: str, q: torch.Tensor, seqlen_k: int) -> dict:
    options = dict(OPTIONS[name])
    if options.get("alibi_slopes") == "per_head":
        options["alibi_slopes"] = torch.linspace(0.1, 0.9, q.shape[1], dtype=torch.float64)
    if options.get("key_lengths") == "short":
        options["key_lengths"] = torch.tensor([seqlen_k, seqlen_k - 9], dtype=torch.int32)
    return options


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (out, lse) over disjoint key sets, merged by their log-sum-exp (float64)."""
    lse = torch.logsumexp(torch.stack([part_lse.double() for _, part_lse in parts]), dim=0)
    out = sum(part_out.double() * torch.exp(part_lse.double() - lse)[..., None] for part_out, part_lse in parts)
    return out, lse


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_blocks_merge_to_the_whole_call(backend: str, name: str) -> None:
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = _inputs(torch.float64)
    options = _options(name, q, k.shape[2])
    whole, whole_lse = fusedattn.attention(q, k, v, return_lse=True, backend="reference", **options)
    rows = slice(10, 30)
    parts = []
    for first, last in ((0, 5), (5, 25), (25, 40)):
        block_options = dict(options)
        if "key_lengths" in options:  # key lengths stay local to the call
            block_options["key_lengths"] = (options["key_lengths"] - first).clamp(0, last - first).to(torch.int32)
        parts.append(
            fusedattn.attention(
                q[:, :, rows].to(dtype),
                k[:, :, first:last].to(dtype),
                v[:, :, first:last].to(dtype),
                causal_alignment="top_left",  # the whole call has Sq = Sk: both alignments agree
                query_start=rows.start,
                key_start=first,
                return_lse=True,
                backend=backend,
                **block_options,
            )
        )
    out, lse = _merge(parts)
    tolerance = 1e-12 if backend == "reference" else 2e-6
    torch.testing.assert_close(out, whole[:, :, rows], atol=tolerance, rtol=0)
    # A row whose keys are all hidden has lse -inf in both.
    torch.testing.assert_close(lse, whole_lse[:, :, rows], atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cpu_block_gradients_match_the_oracle(name: str) -> None:
    q, k, v = _inputs(torch.float32, seqlen=37)
    options = _options(name, q, k.shape[2])
    if "alibi_slopes" in options:
        options["alibi_slopes"] = options["alibi_slopes"].float()
    assert_backend_matches("cpu", q, k, v, query_start=70, key_start=45, causal_alignment="top_left", **options)


def test_starts_are_ignored_when_nothing_reads_positions() -> None:
    q, k, v = _inputs(torch.float32)
    call = validate_attention(q, k, v, query_start=8, key_start=3)
    assert (call.query_start, call.key_start) == (0, 0)
    assert "sequence_block" not in call.features()
    call = validate_attention(q, k, v, causal=True, query_start=8, key_start=3)
    assert (call.query_start, call.key_start) == (8, 3)
    assert "sequence_block" in call.features()


def test_backends_declare_sequence_blocks() -> None:
    q, k, v = _inputs(torch.float32)
    profile = CallProfile.of(validate_attention(q, k, v, causal=True, query_start=8))
    assert CPU_BACKEND.capabilities.features >= profile.features
    assert TRITON_BACKEND.capabilities.features >= profile.features
    assert "sequence_block" not in CUDA_BACKEND.capabilities.features  # not in its kernels yet


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, r"query_start: expected a value in \[0, 536870912\], got -1"),
        (LATEST_SEQUENCE_START + 1, ValueError, "query_start: expected a value in"),
        (True, TypeError, "query_start: expected an int, got"),
        (2.0, TypeError, "query_start: expected an int, got"),
    ],
)
def test_bad_starts_are_refused(value: object, error: type, message: str) -> None:
    q, k, v = _inputs(torch.float32)
    with pytest.raises(error, match=message):
        fusedattn.attention(q, k, v, causal=True, query_start=value)
    with pytest.raises(error, match=message.replace("query_start", "key_start")):
        fusedattn.attention(q, k, v, causal=True, key_start=value)
