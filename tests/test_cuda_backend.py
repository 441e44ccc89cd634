"""The CUDA backend (csrc/cuda): dispatch, and its kernels against the float64 reference.

Three groups:
  * dispatch and declarations, on any machine: what the backend claims, and how the
    dispatcher treats it where it cannot run (CPU tensors, no GPU, no CUDA build);
  * the kernels on the CPU, everywhere: csrc/cuda/emulation builds the real kernels and
    operator bodies against a host emulation of CUDA (fibers for CUDA threads, scheduled
    in random order between barriers; wmma emulated with its alignment rules checked) and
    registers them as a test backend "cuda_emulated": fp16/bf16 run the tensor-core path,
    fp32 the FMA path. The launchers and the real hardware are all it leaves out;
  * marked gpu: the compiled kernels on a GPU for every claimed feature, forward and
    backward, skipped unless the backend is available (fusedattn._C built with CUDA).
Both kernel groups go through fusedattn.testing.assert_backend_matches.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import fusedattn
import pytest
import torch
from fusedattn import dispatch, semantics
from fusedattn.backends import cuda as cuda_backend
from fusedattn.backends.base import Backend, CallProfile
from fusedattn.testing import assert_backend_matches
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
    assert capabilities.max_head_dim == semantics.MAX_HEAD_DIM
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


def test_native_options_follow_the_op_contract():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    call = validate_attention(
        q, k, v, causal=True, causal_alignment="top_left", window=(3, None), softcap=30.0,
        dropout_p=0.25, dropout_seed=2**40 + 7,
    )  # fmt: skip
    options = cuda_backend._native_options(call)
    assert len(options) == 16
    (_mask, _lengths, _cu_q, _cu_k, _alibi, max_q, max_k, scale, causal, bottom_right,
     window_left, window_right, softcap, dropout_p, seed_key, threshold) = options  # fmt: skip
    assert (max_q, max_k, causal, bottom_right) == (0, 0, True, False)
    assert scale == pytest.approx(16**-0.5)
    assert (window_left, window_right, softcap, dropout_p) == (3, -1, 30.0, 0.25)
    # The kernels get the seed already mixed, and the integer drop threshold.
    assert seed_key == semantics.dropout_seed_key(2**40 + 7) and 0 <= seed_key < 2**32
    assert threshold == semantics.dropout_threshold(0.25) == 2**30
    plain = cuda_backend._native_options(validate_attention(q, k, v, window=(None, 2**70)))
    assert plain[10] == -1 and plain[11] == 2**30  # unbounded left; validation caps an over-wide side
    assert plain[-2:] == (0, 0)


# ---- feature cases shared by the emulation and the GPU -----------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v=None, *, dtype, device):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v, dtype=dtype, device=device)
    return q, k, v


def _feature_arguments(name: str, dtype: torch.dtype, device: str, heads_q: int, seqlen_q: int, seqlen_k: int) -> dict:
    """Keyword arguments of one feature case for inputs of batch 2."""
    on = {"device": device}
    rows = torch.arange(seqlen_q, **on)[:, None].expand(seqlen_q, seqlen_k)
    cases = {
        "plain": {},
        "causal_bottom_right": {"causal": True},
        "causal_top_left": {"causal": True, "causal_alignment": "top_left"},
        "window": {"window": (17, 5)},
        "window_left_causal": {"window": (40, None), "causal": True},
        "window_top_left": {"window": (None, 9), "causal_alignment": "top_left"},
        "key_lengths": {"key_lengths": torch.tensor([seqlen_k, 33], dtype=torch.int32, **on)},
        "key_lengths_zero": {"key_lengths": torch.tensor([0, 50], dtype=torch.int32, **on)},  # fully masked rows
        "softcap": {"softcap": 2.0},
        "alibi": {"alibi_slopes": torch.rand(heads_q, **on), "causal": True},
        "alibi_per_batch": {"alibi_slopes": torch.rand(2, heads_q, **on)},
        "bool_mask": {"attn_mask": torch.rand(2, 1, seqlen_q, seqlen_k, **on) > 0.3},
        "bool_mask_empty_rows": {"attn_mask": rows % 3 != 0},  # every third row fully masked
        "additive_mask": {"attn_mask": torch.randn(seqlen_q, seqlen_k, dtype=dtype, **on)},
        "dropout": {"dropout_p": 0.2, "dropout_seed": 99},
        "dropout_causal": {"dropout_p": 0.3, "dropout_seed": 5, "causal": True},
        "everything": {
            "causal": True,
            "window": (30, None),
            "softcap": 5.0,
            "alibi_slopes": torch.rand(heads_q, **on),
            "key_lengths": torch.tensor([seqlen_k - 10, seqlen_k], dtype=torch.int32, **on),
            "dropout_p": 0.1,
        },  # fmt: skip
    }
    return cases[name]


FEATURE_CASES = [
    "plain", "causal_bottom_right", "causal_top_left", "window", "window_left_causal", "window_top_left",
    "key_lengths", "key_lengths_zero", "softcap", "alibi", "alibi_per_batch", "bool_mask", "bool_mask_empty_rows",
    "additive_mask", "dropout", "dropout_causal", "everything",
]  # fmt: skip


def _check_feature(backend, device, case, dtype, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim):
    q, k, v = _inputs(2, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=dtype, device=device)
    arguments = _feature_arguments(case, dtype, device, heads_q, seqlen_q, seqlen_k)
    assert_backend_matches(backend, q, k, v, **arguments)


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
EMULATION_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulation" / "emulated_ops.cpp"


@pytest.fixture(scope="module")
def emulated():
    """Build csrc/cuda/emulation (once; cached under build/) and register "cuda_emulated"."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    from torch.utils import cpp_extension

    build_dir = EMULATION_SOURCE.parents[3] / "build" / "cuda-emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="fusedattn_cuda_emulation",
        sources=[str(EMULATION_SOURCE)],
        extra_cflags=["-std=c++17", "-O1", "-Wno-unknown-pragmas"],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    operators = torch.ops.fusedattn_cuda_emulation
    backend = Backend(
        name="cuda_emulated",
        description="csrc/cuda kernels run by the CPU emulation (tests only)",
        capabilities=dataclasses.replace(cuda_backend.BACKEND.capabilities, devices=frozenset({"cpu"})),
        forward=functools.partial(cuda_backend.forward, operators=operators),
        backward=functools.partial(cuda_backend.backward, operators=operators),
    )
    registry = dispatch.registry()
    registry[backend.name] = backend
    yield backend.name
    registry.pop(backend.name, None)


def test_refusal_threshold_is_the_largest_tile_configuration(emulated):
    assert torch.ops.fusedattn_cuda_emulation.largest_shared_bytes() == cuda_backend._SHARED_BYTES_NEEDED


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_emulated_features_match_reference(emulated, case):
    _check_feature(emulated, "cpu", case, torch.float32, 2, 1, 70, 97, 32)


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
@pytest.mark.parametrize("case", FEATURE_CASES)
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
