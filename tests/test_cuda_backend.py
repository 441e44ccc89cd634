"""The CUDA backend (csrc/cuda): dispatch, and its kernels against the float64 reference.

Three groups:
  * dispatch and declarations, on any machine: what the backend claims, and how the
    dispatcher treats it where it cannot run (CPU tensors, no GPU, no CUDA build);
  * the kernels on the CPU, everywhere: csrc/cuda/emulation builds the real kernels and
    operator bodies against a host emulation of CUDA (fibers for CUDA threads, scheduled
    in random order between barriers; mma.sync, ldmatrix and cp.async emulated by
    their documented layouts and rules) and registers them as a test backend
    "cuda_emulated": the fp16/bf16 forward runs the mma kernel (more of it in
    tests/test_cuda_emulated_forward.py), the backward its mma kernel (more in
    tests/test_cuda_emulated_backward.py), fp32 the FMA path. The launchers and the real
    hardware are all it leaves out;
  * marked gpu: the compiled kernels on a GPU for every claimed feature, forward and
    backward, skipped unless the backend is available (fusedattn._C built with CUDA).
Both kernel groups go through fusedattn.testing.assert_backend_matches. At the end, the
emulated native ops are called directly (as a compiled graph calls them) with invalid
metadata, checking that no access leaves the tensors, and on grids past 65535 sequences
or heads.
"""

from __future__ import annotations

import math
import random

import cuda_emulation
import fusedattn
import pytest
import torch
from fusedattn import dispatch, semantics
from fusedattn.backends import cuda as cuda_backend
from fusedattn.backends.base import CallProfile
from fusedattn.ops import NATIVE_OPTIONS
from fusedattn.testing import FEATURE_CASES, assert_backend_matches, feature_case, undeclared_features
from fusedattn.validation import validate_attention

AVAILABLE, UNAVAILABLE_REASON = cuda_backend.availability()


def needs_gpu(test):
    """Mark a test gpu and skip it unless the cuda backend can run here."""
    skip = pytest.mark.skipif(not AVAILABLE, reason=f"cuda backend unavailable: {UNAVAILABLE_REASON}")
    return pytest.mark.gpu(skip(test))


# ---- what runs everywhere ---------------------------------------------------------------
def test_backend_is_discovered_with_consistent_capabilities():
    backend = dispatch.registry()["cuda"]
    assert backend is cuda_backend.BACKEND
    capabilities = backend.capabilities
    assert capabilities.devices == frozenset({"cuda"})
    assert capabilities.dtypes == frozenset({torch.float16, torch.bfloat16, torch.float32})
    assert capabilities.features <= frozenset(semantics.FEATURES)
    assert "backward" in capabilities.features and backend.backward is not None
    assert capabilities.max_head_dim == 256 < semantics.MAX_HEAD_DIM  # the kernels stop at 256
    # Below Triton (the main GPU path), above the reference.
    registry = dispatch.registry()
    assert capabilities.priority["cuda"] > registry["reference"].capabilities.priority.get("cuda", 0)
    if "triton" in registry:
        assert capabilities.priority["cuda"] < registry["triton"].capabilities.priority["cuda"]


def test_availability_matches_the_build_and_the_machine():
    info = fusedattn._native.build_info()
    available, reason = cuda_backend.availability()
    if available:
        assert info["cuda"] and torch.cuda.is_available() and reason == ""
    else:
        assert reason, "an unavailable backend must say why"
        if not info.get("cuda"):
            assert "without CUDA" in reason
        elif not torch.cuda.is_available():
            assert "no CUDA GPU" in reason


def test_dispatcher_refuses_cpu_tensors_with_a_reason():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    call = validate_attention(q, k, v, causal=True)
    reason = dispatch.refusal(cuda_backend.BACKEND, call)
    assert reason is not None
    if AVAILABLE:
        assert "device 'cpu' is not supported" in reason
    else:
        assert reason.startswith("not available: ") and UNAVAILABLE_REASON in reason
    # The refusal is explained, and auto picks another backend.
    explanation = fusedattn.explain(q, k, v, causal=True)
    assert explanation.chosen != "cuda"
    assert explanation.refusals["cuda"] == reason


def test_forcing_cuda_on_cpu_tensors_raises_with_the_reason():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(fusedattn.UnsupportedCallError, match="backend 'cuda' cannot serve this call") as error:
        fusedattn.attention(q, k, v, backend="cuda")
    assert dispatch.refusal(cuda_backend.BACKEND, validate_attention(q, k, v)) in str(error.value)


def test_refuse_leaves_other_devices_to_the_capability_table():
    profile = CallProfile("cpu", torch.float16, 64, 64, frozenset())
    assert cuda_backend.refuse(profile) is None


# ---- feature cases shared by the emulation and the GPU -----------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v=None, *, dtype, device):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v, dtype=dtype, device=device)
    return q, k, v


def _check_feature(backend, device, case, dtype, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim):
    q, k, v = _inputs(2, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=dtype, device=device)
    options = feature_case(case, q, k)
    if missing := undeclared_features(backend, q, k, options):
        pytest.skip(f"the {backend} backend does not declare {sorted(missing)}")
    assert_backend_matches(backend, q, k, v, **options)


def _check_varlen(backend, device, dtype, causal, options):
    lengths_q = [5, 0, 33, 70, 1]
    lengths_k = [9, 12, 33, 50, 1]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), 4, 64, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), 2, 64, dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), 2, 48, dtype=dtype, device=device)
    kwargs = dict(options)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = torch.rand(len(lengths_q), 4, device=device)
    assert_backend_matches(
        backend, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k), causal=causal, **kwargs,
    )  # fmt: skip


def _check_strided(backend, device, dtype):
    # (B, S, H, D) memory viewed as (B, H, S, D): a slice of a packed QKV buffer.
    packed = torch.randn(2, 75, 3, 4, 64, dtype=dtype, device=device)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert_backend_matches(backend, q, k, v, causal=True)
    # A head dim that is not a multiple of 16 bytes: no vector loads.
    odd = torch.randn(2, 4, 75, 3 * 35, dtype=dtype, device=device)[..., :35]
    assert_backend_matches(backend, odd, odd.flip(2), odd, window=(20, 20))


VARLEN_OPTIONS = [{}, {"window": (13, 2), "softcap": 3.0, "alibi": True}, {"dropout_p": 0.2}]
HEAD_DIMS = [(1, 1), (16, 16), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128), (160, 160), (200, 200),
             (256, 256), (64, 128), (128, 32), (256, 96), (8, 256)]  # fmt: skip


# ---- the kernels on the CPU, through the host emulation -----------------------------------
@pytest.fixture(scope="module")
def emulated():
    """Build csrc/cuda/emulation (once; cached under build/) and register "cuda_emulated"."""
    with cuda_emulation.registered_backend() as name:
        yield name


def test_emulated_schemas_take_the_native_options_in_order(emulated):
    for operator in (torch.ops.fusedattn_cuda_emulation.cuda_attention_forward,
                     torch.ops.fusedattn_cuda_emulation.cuda_attention_backward):  # fmt: skip
        names = [argument.name for argument in operator.default._schema.arguments]
        assert names[names.index("attn_mask") :] == list(NATIVE_OPTIONS)


def test_refusal_threshold_is_the_largest_tile_configuration(emulated):
    assert torch.ops.fusedattn_cuda_emulation.largest_shared_bytes() == cuda_backend._SHARED_BYTES_NEEDED


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_emulated_features_match_reference(emulated, case):
    _check_feature(emulated, "cpu", case, torch.float32, 2, 1, 70, 97, 32)


@pytest.mark.parametrize("heads_kv", [1, 2], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_no_gradient_into_storage_past_key_lengths(emulated, dtype, heads_kv):
    # The key tile that straddles key_lengths computes its storage rows too (0 * a NaN in q
    # or dO is NaN): both backward kernels (fp32 FMA, fp16 mma), with and without the GQA
    # partials, store 0 there (docs/semantics.md).
    q, k, v = _inputs(2, 2, heads_kv, 20, 70, 32, dtype=dtype, device="cpu")
    q[0, 1, 3] = float("nan")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    lengths = torch.tensor([29, 70], dtype=torch.int32)
    out = fusedattn.attention(*leaves, key_lengths=lengths, backend=emulated)
    grad_out = torch.randn_like(out)
    grad_out[0, 0, 5] = float("nan")
    _, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    assert (dk[0, :, 29:] == 0).all() and (dv[0, :, 29:] == 0).all()


@pytest.mark.parametrize("case", ["causal_bottom_right", "causal_top_left", "window_top_left", "everything"])
def test_emulated_more_queries_than_keys(emulated, case):
    _check_feature(emulated, "cpu", case, torch.float32, 2, 2, 97, 70, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["causal_bottom_right", "everything"])
def test_emulated_half_precision_matches_reference(emulated, dtype, case):
    _check_feature(emulated, "cpu", case, dtype, 2, 1, 70, 97, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("head_dim", "head_dim_v"), [(1, 1), (40, 40), (160, 160), (256, 256), (8, 256), (128, 32)])
def test_emulated_head_dims_match_reference(emulated, dtype, head_dim, head_dim_v):
    q, k, v = _inputs(1, 2, 1, 45, 67, head_dim, head_dim_v, dtype=dtype, device="cpu")
    assert_backend_matches(emulated, q, k, v, causal=True)


@pytest.mark.parametrize("options", VARLEN_OPTIONS)
def test_emulated_varlen_matches_reference(emulated, options):
    _check_varlen(emulated, "cpu", torch.float32, True, options)


def test_emulated_varlen_half_precision_matches_reference(emulated):
    _check_varlen(emulated, "cpu", torch.bfloat16, False, {"dropout_p": 0.2, "window": (20, 20)})


def test_emulated_strided_inputs_match_reference(emulated):
    _check_strided(emulated, "cpu", torch.float32)


# ---- the compiled kernels on a GPU ----------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FEATURE_CASES))
@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("seqlens", [(70, 97), (97, 70)], ids=["sq<sk", "sq>sk"])
def test_features_match_reference(case, dtype, heads_kv, seqlens):
    _check_feature("cuda", "cuda", case, dtype, 4, heads_kv, *seqlens, 64)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("head_dim", "head_dim_v"), HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_match_reference(dtype, head_dim, head_dim_v, causal):
    q, k, v = _inputs(1, 2, 1, 45, 67, head_dim, head_dim_v, dtype=dtype, device="cuda")
    assert_backend_matches("cuda", q, k, v, causal=causal)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", VARLEN_OPTIONS)
def test_varlen_matches_reference(dtype, causal, options):
    _check_varlen("cuda", "cuda", dtype, causal, options)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_match_reference(dtype):
    _check_strided("cuda", "cuda", dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_larger_problem_matches_reference(dtype):
    q, k, v = _inputs(2, 8, 2, 1000, 1500, 128, dtype=dtype, device="cuda")
    assert_backend_matches("cuda", q, k, v, causal=True)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, {"window": (3000, 0), "sinks": True}], ids=["plain", "window-sinks"])
def test_split_kv_decode_matches_reference(dtype, options):
    # Sq 1 with 32 query heads: too few blocks for the GPU, so the launcher splits the keys
    # (attention_params.h, forward_split_count) and combines the parts by their lse.
    q, k, v = _inputs(2, 32, 8, 1, 5000, 128, dtype=dtype, device="cuda")
    key_lengths = torch.tensor([5000, 1234], dtype=torch.int32, device="cuda")
    kwargs = dict(options)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.rand(32, device="cuda")
    assert_backend_matches("cuda", q, k, v, key_lengths=key_lengths, **kwargs)


@needs_gpu
def test_this_gpu_is_not_refused():
    profile = CallProfile("cuda", torch.float16, 128, 128, frozenset({"backward"}))
    assert cuda_backend.refuse(profile) is None


def test_emulated_nan_query_row_stays_nan(emulated):
    # A NaN in one query row: that row's out and lse are NaN (not lse -inf, which the
    # backward reads as "fully masked" and would turn into zero gradients).
    q, k, v = _inputs(1, 2, 1, 20, 20, 32, dtype=torch.float32, device="cpu")
    q[0, 1, 3, 5] = float("nan")
    call = validate_attention(q, k, v, causal=True)
    backend = dispatch.registry()[emulated]
    out, lse = backend.forward(call)
    nan_row = torch.zeros(1, 2, 20, dtype=torch.bool)
    nan_row[0, 1, 3] = True
    assert torch.equal(out.isnan().any(-1), nan_row) and torch.equal(lse.isnan(), nan_row)
    grad_q, _grad_k, _grad_v = backend.backward(call, torch.randn_like(out), out, lse)
    assert torch.equal(grad_q.isnan().any(-1), nan_row)


@pytest.mark.parametrize("sinks", [None, 0.5])
def test_emulated_row_without_keys_is_zero_beside_a_nan_value(emulated, sinks):
    # Row 0 sees no key (bottom-right causal, Sq > Sk) while its block's tiles hold a NaN
    # value: its output is 0 and its lse the sink (or -inf); a NaN query row stays NaN.
    q, k, v = _inputs(1, 1, 1, 4, 3, 16, dtype=torch.float32, device="cpu")
    v[0, 0, 2, 0] = float("nan")
    sink = None if sinks is None else torch.tensor([sinks])
    out, lse = fusedattn.attention(q, k, v, causal=True, sinks=sink, return_lse=True, backend=emulated)
    assert torch.equal(out[0, 0, 0], torch.zeros(16))
    assert float(lse[0, 0, 0]) == (float("-inf") if sinks is None else sinks)


def test_emulated_dropout_near_one_stays_in_fp16_range(emulated):
    # p = 0.99999: a kept probability times 1 / (1 - p) = 1e5 passes fp16's range, while
    # out and dv (1e5 * 0.01) do not; scaling before the fp16 store used to give inf.
    dropout_p, seed = 0.99999, 11291
    zero = torch.zeros((), dtype=torch.int64)
    assert semantics.dropout_hash(seed, zero, zero, zero, zero) >= semantics.dropout_threshold(dropout_p)  # kept
    q, k = (torch.randn(1, 1, 1, 16, dtype=torch.float16, device="cpu") for _ in range(2))
    v = torch.full((1, 1, 1, 16), 0.01, dtype=torch.float16, device="cpu")
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    out = fusedattn.attention(*inputs, dropout_p=dropout_p, dropout_seed=seed, backend=emulated)
    out.backward(torch.full_like(out, 0.01))
    expected = torch.full((1, 1, 1, 16), 0.01 / (1 - dropout_p))
    torch.testing.assert_close(out.detach().float().cpu(), expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(inputs[2].grad.float().cpu(), expected, rtol=2e-3, atol=0)


# ---- invalid metadata and large grids, on the emulated native ops ---------------------------
# Under torch.compile or CUDA graph capture the host cannot read the values of cu_seqlens,
# key_lengths and max_seqlen: the native ops get them unchecked, and the kernels clamp every
# bound into the tensors (docs/semantics.md, "Invalid metadata"; the op layer then poisons
# the outputs). These tests call the emulated native ops directly, skipping validation, with
# every tensor in the middle of a larger buffer: inputs guarded by NaN (an out-of-bounds read
# turns up as a NaN in some output), outputs by a sentinel (an out-of-bounds write changes it).
_GUARD = 1 << 18  # elements on each side, more than the offsets of the cases below reach
_SENTINEL = 1024.0  # exact in every float format; no output of these cases comes near it


class _Guarded:
    """A contiguous tensor in the middle of a buffer whose two guard regions hold `fill`."""

    def __init__(self, shape, dtype, fill, values=None):
        numel = math.prod(shape)
        self.buffer = torch.full((numel + 2 * _GUARD,), fill, dtype=dtype)
        self.tensor = self.buffer[_GUARD : _GUARD + numel].view(shape)
        if values is not None:
            self.tensor.copy_(values)

    def assert_guards_untouched(self):
        guards = torch.cat([self.buffer[:_GUARD], self.buffer[-_GUARD:]])
        assert bool((guards == _SENTINEL).all()), "an output was written outside its tensor"

    def assert_no_nan(self):
        assert not bool(self.buffer.isnan().any()), "an input was read outside its tensor (NaN guard)"


def _native_call(
    name, *tensors, key_lengths=None, cu=(None, None), max_seqlens=(0, 0), options=None, scale=0.25, paged=(None, None)
):
    """A native op called directly (no validation), its options by name (ops.NATIVE_OPTIONS)."""
    options = options or {}
    dropout_p = options.get("dropout_p", 0.0)
    window_left, window_right = options.get("window", (-1, -1))
    values = dict(
        attn_mask=None, key_lengths=key_lengths, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1],
        alibi_slopes=options.get("alibi"), sinks=None, block_table=paged[0], cache_lengths=paged[1], max_seqlen_q=max_seqlens[0], max_seqlen_k=max_seqlens[1], scale=scale,
        causal=options.get("causal", False), bottom_right=True, window_left=window_left, window_right=window_right,
        query_start=0, key_start=0, k_descale=None, v_descale=None,
        softcap=0.0, dropout_threshold=semantics.dropout_threshold(dropout_p),
        dropout_keep_scale=semantics.dropout_keep_scale(dropout_p),
        dropout_seed_key=semantics.dropout_seed_key(5) if dropout_p else 0,
    )  # fmt: skip
    getattr(torch.ops.fusedattn_cuda_emulation, name)(*tensors, *(values[option] for option in NATIVE_OPTIONS))


def _guarded_inputs(shapes, dtype):
    """q, k, v (or any tensors) of random values inside NaN-guarded buffers."""
    return [_Guarded(shape, dtype, float("nan"), torch.randn(shape)) for shape in shapes]


def _run_forward_and_backward(q_shape, k_shape, v_shape, lse_shape, dtype, **call):
    """The native forward and backward on guarded buffers; returns the output buffers."""
    q, k, v = _guarded_inputs([q_shape, k_shape, v_shape], dtype)
    out_shape = (*q_shape[:-1], v_shape[-1])
    out = _Guarded(out_shape, dtype, _SENTINEL)
    lse = _Guarded(lse_shape, torch.float32, _SENTINEL)
    _native_call("cuda_attention_forward", q.tensor, k.tensor, v.tensor, out.tensor, lse.tensor, **call)
    # The backward reads out and lse: fresh guarded inputs, lse large enough that every
    # exp(logit - lse) stays finite (the gradients are then finite wherever they are written).
    grad_out, out_in = _guarded_inputs([out_shape, out_shape], dtype)
    lse_in = _Guarded(lse_shape, torch.float32, float("nan"), torch.full(lse_shape, 20.0))
    grads = [_Guarded(shape, dtype, _SENTINEL) for shape in (q_shape, k_shape, v_shape)]
    _native_call(
        "cuda_attention_backward", grad_out.tensor, q.tensor, k.tensor, v.tensor, out_in.tensor, lse_in.tensor,
        *(g.tensor for g in grads), **call,
    )  # fmt: skip
    for written in (out, lse, *grads):
        written.assert_guards_untouched()
        written.assert_no_nan()
    return out, lse, *grads


def _clamped_sequences(cu, total):
    """(start, end) of each packed sequence by the kernels' clamping rule."""
    bounds = []
    for i in range(len(cu) - 1):
        start = min(max(cu[i], 0), total)
        bounds.append((start, min(max(cu[i + 1], start), total)))
    return bounds


def _row_masks(cu, total, max_seqlen):
    """Rows inside some clamped sequence (the only ones a kernel may write), and the rows of
    clamped sequences no longer than max_seqlen (which must be written)."""
    inside = torch.zeros(total, dtype=torch.bool)
    required = torch.zeros(total, dtype=torch.bool)
    for start, end in _clamped_sequences(cu, total):
        inside[start:end] = True
        if end - start <= min(max(max_seqlen, 0), total):
            required[start:end] = True
    return inside, required


def _assert_rows_written(written_rows, inside, required, what):
    assert not bool((written_rows & ~inside).any()), f"{what}: a row outside every clamped sequence was written"
    assert bool(written_rows[required].all()), f"{what}: a row of a sequence within max_seqlen was not computed"


INVALID_OPTIONS = {
    "plain": {},
    "causal_window_alibi_dropout": {"causal": True, "window": (4, -1), "alibi": True, "dropout_p": 0.2},
}
# (total_q, total_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k). A max_seqlen
# above the packed length is taken as the packed length (else a grid sized for 2**31 - 1
# rows would take the emulation hours).
INVALID_VARLEN = {
    "offset_beyond_total": (10, 12, [0, 5, 4000], [0, 6, 12], 4000, 4000),
    "negative_offsets": (70, 80, [0, -7, 70], [-5, 3, 80], 70, 80),
    "non_monotone": (70, 80, [0, 68, 3, 70], [0, 79, 2, 80], 68, 79),
    "last_beyond_total": (70, 80, [0, 40, 90], [0, 6, 85], 50, 79),
    "last_below_total": (70, 80, [0, 40, 45], [0, 3, 50], 40, 47),
    "first_not_zero": (70, 80, [3, 6, 70], [9, 10, 80], 64, 70),
    "max_seqlen_below_longest": (70, 80, [0, 3, 70], [0, 2, 80], 2, 3),
    "max_seqlen_negative": (70, 80, [0, 3, 70], [0, 2, 80], -5, -(2**40)),
    "huge": (70, 80, [0, 2**31 - 1, 2**31 - 1], [0, -(2**31), 2**31 - 1], 2**31 - 1, 2**40),
    "huge_negative": (70, 80, [-(2**31), -(2**31), -1], [2**31 - 1, 0, -(2**31)], 2**31 - 1, 2**31 - 1),
}


# Every case in fp32 (FMA path) with and without options; a few in fp16 (tensor-core path,
# vector loads: the same clamped bounds).
INVALID_VARLEN_CALLS = [
    *(pytest.param(case, torch.float32, name, id=f"{case}-fp32-{name}") for case in INVALID_VARLEN
      for name in INVALID_OPTIONS),
    *(pytest.param(case, torch.float16, "plain", id=f"{case}-fp16-plain") for case in
      ("offset_beyond_total", "negative_offsets", "non_monotone", "huge")),
]  # fmt: skip


@pytest.mark.parametrize(("case", "dtype", "option_name"), INVALID_VARLEN_CALLS)
def test_emulated_invalid_varlen_metadata_stays_in_bounds(emulated, case, dtype, option_name):
    total_q, total_k, cu_q, cu_k, max_q, max_k = INVALID_VARLEN[case]
    heads_q, heads_kv, head_dim = 2, 1, 16
    options = dict(INVALID_OPTIONS[option_name])
    if options.get("alibi"):
        options["alibi"] = torch.rand(len(cu_q) - 1, heads_q)
    out, lse, dq, dk, dv = _run_forward_and_backward(
        (total_q, heads_q, head_dim), (total_k, heads_kv, head_dim), (total_k, heads_kv, head_dim),
        (heads_q, total_q), dtype, cu=(torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)),
        max_seqlens=(max_q, max_k), options=options,
    )  # fmt: skip
    inside_q, required_q = _row_masks(cu_q, total_q, max_q)
    inside_k, required_k = _row_masks(cu_k, total_k, max_k)
    _assert_rows_written((out.tensor != _SENTINEL).any(-1).any(-1), inside_q, required_q, "out")
    _assert_rows_written((lse.tensor != _SENTINEL).any(0), inside_q, required_q, "lse")
    # dq is zero-filled and accumulated into only inside the clamped sequences.
    assert bool(dq.tensor.isfinite().all()) and bool((dq.tensor[~inside_q] == 0).all())
    for grad, name in ((dk, "dk"), (dv, "dv")):
        _assert_rows_written((grad.tensor != _SENTINEL).any(-1).any(-1), inside_k, required_k, name)


@pytest.mark.parametrize("option_name", list(INVALID_OPTIONS))
@pytest.mark.parametrize("key_lengths", [[-3, 1000], [2**31 - 1, -(2**31)], [0, 81]], ids=str)
def test_emulated_invalid_key_lengths_stay_in_bounds(emulated, key_lengths, option_name):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = 2, 2, 1, 70, 80, 16
    options = dict(INVALID_OPTIONS[option_name])
    if options.get("alibi"):
        options["alibi"] = torch.rand(heads_q)
    outputs = _run_forward_and_backward(
        (batch, heads_q, seqlen_q, head_dim), (batch, heads_kv, seqlen_k, head_dim),
        (batch, heads_kv, seqlen_k, head_dim), (batch, heads_q, seqlen_q), torch.float32,
        key_lengths=torch.tensor(key_lengths, dtype=torch.int32), options=options,
    )  # fmt: skip
    # Dense calls have no sequence bounds to clamp: every row is computed, and finite
    # (lse is -inf for rows that see no key).
    for output in outputs:
        values = output.tensor
        assert bool((values != _SENTINEL).all()) and not bool((values == float("inf")).any())


def test_emulated_native_ops_refuse_paged_caches(emulated):
    # The cuda backend declares no paged_kv: a direct op call with a block table is refused
    # before anything reads the cache as dense rows.
    q = torch.randn(2, 2, 16)
    cache = torch.randn(4, 4, 2, 16)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    table = torch.zeros(2, 2, dtype=torch.int32)
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    out, lse = torch.empty(2, 2, 16), torch.empty(2, 2)
    with pytest.raises(ValueError, match="block_table, cache_lengths: the cuda backend does not read paged"):
        _native_call("cuda_attention_forward", q, cache, cache, out, lse, cu=(cu, None), max_seqlens=(1, 8),
                     paged=(table, lengths))  # fmt: skip


def test_emulated_native_ops_check_shapes(emulated):
    # Shapes cost the host nothing to check: a direct call with inconsistent ones raises.
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out, lse = torch.empty(8, 2, 16), torch.empty(2, 8)
    varlen = {"cu": (cu, cu), "max_seqlens": (8, 8)}
    _native_call("cuda_attention_forward", q, k, v, out, lse, **varlen)  # consistent: runs
    bad_calls = [
        ((q, k, v, torch.empty(8, 2, 15), lse), varlen),  # out
        ((q, k, v, out, torch.empty(2, 7)), varlen),  # lse
        ((q, k[:7], v[:7], out, lse), {**varlen, "cu": (cu, cu[:2])}),  # cu_seqlens_k's length
        ((q, k[:7], v, out, lse), varlen),  # k and v tokens
        ((q, torch.randn(8, 2, 8), v, out, lse), varlen),  # head dims
        ((q, k, v, out, lse), {**varlen, "key_lengths": torch.tensor([1, 2, 3], dtype=torch.int32)}),
        ((q, k, v, out, lse), {**varlen, "options": {"alibi": torch.rand(3, 2)}}),
    ]
    for tensors, call in bad_calls:
        with pytest.raises(RuntimeError, match="fusedattn cuda: .* (must|need)"):
            _native_call("cuda_attention_forward", *tensors, **call)
    grads = [torch.empty(8, 2, 16), torch.empty(8, 1, 16), torch.empty(8, 2, 16)]  # dk: one head short
    with pytest.raises(RuntimeError, match="fusedattn cuda: dk must have shape"):
        _native_call("cuda_attention_backward", torch.randn_like(out), q, k, v, out, lse, *grads, **varlen)


# Grids past the 65535 limit of grid.y / grid.z: the launchers flatten (tile, head, sequence)
# onto grid.x. Emulating 10^5 blocks takes minutes, so the emulation runs a sample of block
# indices (sample_blocks) on both sides of 65535, and the test checks that exactly the tiles
# those indices decode to were computed, and computed right. Tiles of ForwardConfig<float, 32>
# (64 query rows), BackwardConfig<float, 32> (32 keys) and the GQA group sum (kGroupSumKeys,
# 64 keys): the buckets of head dim 1.
_FORWARD_TILE_ROWS = 64
_BACKWARD_TILE_KEYS = 32
_GROUP_SUM_KEYS = 64


def _sampled_blocks(blocks):
    chosen = {0, 1, 2, 65534, 65535, 65536, 65537, blocks - 2, blocks - 1}
    chosen.update(random.Random(blocks).sample(range(blocks), 6))
    return sorted(b for b in chosen if 0 <= b < blocks)


def _decode(block, tiles, heads):
    """(tile, head, sequence) of a flat block index: index = (sequence * heads + head) * tiles + tile."""
    return block % tiles, (block // tiles) % heads, block // (tiles * heads)


def _run_sampled(samples, name, *arguments, **call):
    operators = torch.ops.fusedattn_cuda_emulation
    operators.sample_blocks(samples)
    try:
        _native_call(name, *arguments, **call)
    finally:
        operators.sample_blocks([])


@pytest.mark.parametrize(
    ("batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k"),
    [(66000, 2, 1, 65, 3), (2, 70000, 35000, 3, 70)],
    ids=["batch-66000", "heads-70000"],
)
def test_emulated_grids_past_65535_decode_every_block(emulated, batch, heads_q, heads_kv, seqlen_q, seqlen_k):
    group, scale = heads_q // heads_kv, 0.5
    q = torch.randn(batch, heads_q, seqlen_q, 1)
    k = torch.randn(batch, heads_kv, seqlen_k, 1)
    v = torch.randn(batch, heads_kv, seqlen_k, 1)

    def reference(b, h):  # float64 probabilities, out, lse of one (sequence, query head)
        scores = (q[b, h].double() @ k[b, h // group].double().T) * scale
        lse = scores.logsumexp(-1)
        probabilities = (scores - lse[:, None]).exp()
        return probabilities, probabilities @ v[b, h // group].double(), lse

    # Forward: reversed query tiles within each (sequence, head).
    tiles = -(-seqlen_q // _FORWARD_TILE_ROWS)
    samples = _sampled_blocks(tiles * heads_q * batch)
    assert samples[-1] > 65535
    out = torch.full((batch, heads_q, seqlen_q, 1), _SENTINEL)
    lse = torch.full((batch, heads_q, seqlen_q), _SENTINEL)
    _run_sampled(samples, "cuda_attention_forward", q, k, v, out, lse, scale=scale)
    computed = torch.zeros(batch, heads_q, seqlen_q, dtype=torch.bool)
    for block in samples:
        tile, h, b = _decode(block, tiles, heads_q)
        rows = slice((tiles - 1 - tile) * _FORWARD_TILE_ROWS, (tiles - tile) * _FORWARD_TILE_ROWS)
        computed[b, h, rows] = True
        _probabilities, expected_out, expected_lse = reference(b, h)
        torch.testing.assert_close(out[b, h, rows, 0].double(), expected_out[rows, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[b, h, rows].double(), expected_lse[rows], rtol=1e-5, atol=1e-5)
    assert bool((out[~computed] == _SENTINEL).all()) and bool((lse[~computed] == _SENTINEL).all())

    # Backward: one block per (key tile, query head, sequence) writing that head's dK, dV
    # partials, then one group-sum block per (key tile, kv head, sequence) adding them. The
    # same sampled indices run in both grids (of different tiles); partials the sampled
    # blocks did not write read as 0.
    tiles = -(-seqlen_k // _BACKWARD_TILE_KEYS)
    samples = _sampled_blocks(tiles * heads_q * batch)
    grad_out = torch.randn(batch, heads_q, seqlen_q, 1)
    out_in, lse_in = torch.zeros(batch, heads_q, seqlen_q, 1), torch.zeros(batch, heads_q, seqlen_q)
    computed_heads = {_decode(block, tiles, heads_q) for block in samples}  # (tile, query head, b)
    sum_tiles = -(-seqlen_k // _GROUP_SUM_KEYS)
    summed = [_decode(block, sum_tiles, heads_kv) for block in samples if block < sum_tiles * heads_kv * batch]
    expected = {}  # (b, h): probabilities, dS of the whole sequence
    for _tile, h, b in computed_heads | {(t, kv * group + m, b) for t, kv, b in summed for m in range(group)}:
        if (b, h) not in expected:
            probabilities, out_bh, lse_bh = reference(b, h)
            out_in[b, h], lse_in[b, h] = out_bh.float(), lse_bh.float()
            grad_probabilities = grad_out[b, h].double() @ v[b, h // group].double().T
            delta = (grad_out[b, h].double() * out_in[b, h].double()).sum(-1, keepdim=True)
            expected[b, h] = probabilities, probabilities * (grad_probabilities - delta) * scale
    dq, dk, dv = (torch.full_like(t, _SENTINEL) for t in (q, k, v))
    _run_sampled(samples, "cuda_attention_backward", grad_out, q, k, v, out_in, lse_in, dq, dk, dv, scale=scale)
    expected_dq = torch.zeros(batch, heads_q, seqlen_q, 1, dtype=torch.float64)
    for tile, h, b in computed_heads:
        keys = slice(tile * _BACKWARD_TILE_KEYS, (tile + 1) * _BACKWARD_TILE_KEYS)
        expected_dq[b, h] += expected[b, h][1][:, keys] @ k[b, h // group, keys].double()
    torch.testing.assert_close(dq.double(), expected_dq, rtol=1e-4, atol=1e-5)
    computed = torch.zeros(batch, heads_kv, seqlen_k, dtype=torch.bool)
    for tile, kv_head, b in summed:
        keys = slice(tile * _GROUP_SUM_KEYS, (tile + 1) * _GROUP_SUM_KEYS)
        computed[b, kv_head, keys] = True
        expected_dk = torch.zeros(seqlen_k, 1, dtype=torch.float64)
        expected_dv = torch.zeros(seqlen_k, 1, dtype=torch.float64)
        for h in range(kv_head * group, (kv_head + 1) * group):
            # The keys whose partial for head h a sampled backward block wrote.
            written = [(key // _BACKWARD_TILE_KEYS, h, b) in computed_heads for key in range(seqlen_k)]
            written = torch.tensor(written, dtype=torch.float64)[:, None]
            if (b, h) in expected:
                probabilities, grad_scores = expected[b, h]
                expected_dv += (probabilities.T @ grad_out[b, h].double()) * written
                expected_dk += (grad_scores.T @ q[b, h].double()) * written
        torch.testing.assert_close(dk[b, kv_head, keys].double(), expected_dk[keys], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dv[b, kv_head, keys].double(), expected_dv[keys], rtol=1e-4, atol=1e-5)
    assert bool((dk[~computed] == _SENTINEL).all()) and bool((dv[~computed] == _SENTINEL).all())
