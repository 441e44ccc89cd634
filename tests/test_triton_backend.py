"""The Triton backend against the float64 reference, feature by feature, forward and backward.

Without a CUDA GPU the kernels run on CPU tensors through Triton's interpreter, set up for
this module's tests only by the `triton_interpreter` fixture (tests/triton_interpreter.py).
With a GPU the same tests run the compiled kernels on CUDA tensors, and bfloat16 joins the
dtypes (the interpreter cannot run tl.dot on bfloat16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import types

import pytest
import torch

triton = pytest.importorskip("triton")

import fusedattn  # noqa: E402
from fusedattn import semantics  # noqa: E402
from fusedattn.backends import triton as triton_backend  # noqa: E402
from fusedattn.backends.base import CallProfile  # noqa: E402
from fusedattn.testing import (  # noqa: E402
    FEATURE_CASES,
    assert_backend_matches,
    check_backend,
    feature_case,
    quantize_test_cache,
    undeclared_features,
)
from fusedattn.validation import validate_attention, validate_varlen  # noqa: E402
from triton_interpreter import DEVICE, triton_interpreter  # noqa: E402, F401 (an autouse module fixture)

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v=None, dtype=torch.float32):
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v, dtype=dtype, device=DEVICE)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_feature_forward_backward(case, dtype):
    # GQA (4 query heads over 2 KV heads) and Dv != D in every case; Sq != Sk.
    q, k, v = _inputs(2, 4, 2, 24, 37, 40, 24, dtype=dtype)
    options = feature_case(case, q, k)
    if missing := undeclared_features("triton", q, k, options):
        pytest.skip(f"the triton backend does not declare {sorted(missing)}")
    assert_backend_matches("triton", q, k, v, **options)


@pytest.mark.parametrize(
    "options",
    [{"window": (30, 20)}, {"window": (20, None), "causal": True}, {"key_lengths": [64, 50]}],
    ids=["window", "window_causal", "key_lengths"],
)
def test_tile_skipping_and_unchecked_tiles(options):
    # 64 keys = 4 tiles under the interpreter: skipped, checked and unchecked tiles all occur.
    q, k, v = _inputs(2, 2, 1, 64, 64, 16)
    if "key_lengths" in options:
        options = {"key_lengths": torch.tensor(options["key_lengths"], device=DEVICE), "causal": True}
    assert_backend_matches("triton", q, k, v, **options)


@pytest.mark.parametrize(
    "head_dim, head_dim_v, dtype",
    [(16, 16, torch.float32), (64, 64, torch.float16), (40, 72, torch.float32), (256, 256, torch.float16)],
)
def test_head_dims(head_dim, head_dim_v, dtype):
    q, k, v = _inputs(1, 2, 1, 19, 21, head_dim, head_dim_v, dtype=dtype)
    assert_backend_matches("triton", q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal_gqa_alibi", "window_softcap_dropout"])
def test_varlen(case, dtype):
    lengths_q, lengths_k = [5, 0, 17, 9], [12, 3, 17, 20]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths_q), 4, 16, dtype=dtype, device=DEVICE)
    k = torch.randn(sum(lengths_k), 2, 16, dtype=dtype, device=DEVICE)
    v = torch.randn(sum(lengths_k), 2, 24, dtype=dtype, device=DEVICE)
    options = {
        "causal_gqa_alibi": {"causal": True, "alibi_slopes": torch.rand(4, 4, device=DEVICE)},
        "window_softcap_dropout": {"window": (4, 2), "softcap": 2.0, "dropout_p": 0.3, "dropout_seed": 9},
    }[case]
    assert_backend_matches(
        "triton", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=20, **options
    )


@pytest.fixture
def decode_kernel(monkeypatch):
    """Force the split-KV decode kernel and record that it ran."""
    from fusedattn.kernels import attention_decode

    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", "always")
    calls = []
    original = attention_decode.run_decode
    monkeypatch.setattr(attention_decode, "run_decode", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True, "key_lengths": "lengths"},
        {"window": (20, 0), "alibi_slopes": "slopes", "softcap": 2.0},
        {"attn_mask": "mask", "dropout_p": 0.2, "dropout_seed": 3},
    ],
    ids=["causal_key_lengths", "window_alibi_softcap", "mask_dropout"],
)
def test_decode_split_kv(decode_kernel, options, dtype):
    q, k, v = _inputs(2, 8, 2, 3, 45, 40, 24, dtype=dtype)  # 4 query heads per KV head
    values = {
        "lengths": torch.tensor([29, 0], device=DEVICE),  # storage past 29 holds NaN (check_backend)
        "slopes": torch.rand(8, device=DEVICE),
        "mask": torch.rand(2, 1, 3, 45, device=DEVICE) > 0.3,
    }
    options = {name: values.get(value, value) if isinstance(value, str) else value for name, value in options.items()}
    assert_backend_matches("triton", q, k, v, **options)
    assert decode_kernel, "the decode kernel did not run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [{"causal": True}, {"window": (20, 0), "alibi_slopes": "slopes", "softcap": 2.0}, {"dropout_p": 0.2}],
    ids=["causal", "window_alibi_softcap", "dropout"],
)
def test_decode_split_kv_varlen(decode_kernel, options, dtype):
    # Serving: a batch of decode steps packed as varlen, sequences of 0 to 3 query rows.
    lengths_q, lengths_k = [2, 0, 3, 1], [40, 7, 45, 0]
    offsets_q, offsets_k = (
        torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
        for lengths in (lengths_q, lengths_k)
    )
    q = torch.randn(sum(lengths_q), 8, 40, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(sum(lengths_k), 2, dim, dtype=dtype, device=DEVICE) for dim in (40, 24))
    values = {"slopes": torch.rand(4, 8, device=DEVICE)}
    options = {name: values.get(value, value) if isinstance(value, str) else value for name, value in options.items()}
    if options.get("dropout_p"):
        options["dropout_seed"] = 5
    assert_backend_matches("triton", q, k, v, cu_seqlens_q=offsets_q, cu_seqlens_k=offsets_k, max_seqlen_q=3,
                           max_seqlen_k=45, **options)  # fmt: skip
    assert decode_kernel, "the decode kernel did not run"


def test_decode_chosen_automatically():
    from fusedattn.kernels.attention_forward import use_decode
    from fusedattn.kernels.utils import Problem

    q, k, v = _inputs(2, 8, 2, 1, 4096, 64)
    assert use_decode(Problem.of(validate_attention(q, k, v)))
    q_long = torch.randn(2, 8, 256, 64, device=DEVICE)
    assert not use_decode(Problem.of(validate_attention(q_long, k, v)))
    assert not use_decode(Problem.of(validate_attention(q, k[:, :, :100], v[:, :, :100])))
    offsets_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    offsets_k = torch.tensor([0, 4096, 4096 + 600], dtype=torch.int32, device=DEVICE)
    packed = [torch.randn(n, h, 64, device=DEVICE) for n, h in ((2, 8), (4696, 2), (4696, 2))]
    assert use_decode(Problem.of(validate_varlen(*packed, offsets_q, offsets_k, 1, 4096)))


@pytest.mark.parametrize("case", ["dense", "varlen"])
def test_tensor_descriptor_path(monkeypatch, case):
    # The Hopper TMA path (K/V through tensor descriptors), emulated by the interpreter on CPU.
    from fusedattn.kernels.attention_forward import tma_eligible

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90 or newer")
    monkeypatch.setenv("FUSEDATTN_TRITON_TMA", "1")
    if case == "dense":
        q, k, v = _inputs(2, 4, 2, 24, 37, 40, 24, dtype=torch.float16)
        assert tma_eligible(k, v)
        # Key lengths: the descriptors end at each sequence's key_lengths, so the copy engine
        # zero-fills the NaN that check_backend leaves in the storage past them.
        lengths = torch.tensor([23, 37], dtype=torch.int32, device=DEVICE)
        assert_backend_matches(
            "triton", q, k, v, causal=True, window=(20, None), dropout_p=0.2, dropout_seed=4, key_lengths=lengths
        )
        narrow = torch.randn(2, 2, 37, 20, dtype=torch.float16, device=DEVICE)
        assert not tma_eligible(narrow, narrow)  # 40-byte rows break TMA's 16-byte stride rule
        return
    cu_q = torch.tensor([0, 7, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 19, 40], dtype=torch.int32, device=DEVICE)
    # float16: exact fp32 dots (FMAs) never take the TMA path.
    q = torch.randn(30, 4, 32, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(40, 2, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
    assert tma_eligible(k, v)
    assert_backend_matches(
        "triton", q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=23, max_seqlen_k=21, causal=True
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_gradient_into_storage_past_key_lengths(dtype):
    # The tile that straddles key_lengths computes its storage rows too (0 * a NaN in q or
    # dO is NaN): the kernel stores 0 there (docs/semantics.md).
    q, k, v = _inputs(2, 4, 2, 20, 45, 32, dtype=dtype)
    q[0, 1, 3] = float("nan")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    lengths = torch.tensor([29, 45], dtype=torch.int32, device=DEVICE)
    out = fusedattn.attention(*leaves, key_lengths=lengths, backend="triton")
    grad_out = torch.randn_like(out)
    grad_out[0, 2, 5] = float("nan")
    _, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    assert (dk[0, :, 29:] == 0).all() and (dv[0, :, 29:] == 0).all()


def test_dropout_mask_is_bit_identical():
    # v = identity: out[i, j] = P[i, j] * keep[i, j] / (1 - p), so the zero pattern of out
    # is exactly the dropout mask the kernel drew; it must equal semantics.dropout_keep_mask.
    seqlen, heads, dropout_p, seed = 32, 3, 0.4, 2**40 + 17
    q = torch.randn(2, heads, seqlen, 16, device=DEVICE) * 0.1
    k = torch.randn(2, heads, seqlen, 16, device=DEVICE) * 0.1
    v = torch.eye(seqlen, device=DEVICE).expand(2, heads, seqlen, seqlen)
    out = fusedattn.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed, backend="triton")
    keep = semantics.dropout_keep_mask(seed, dropout_p, torch.arange(2), heads, seqlen, seqlen)
    assert torch.equal(out.cpu() != 0, keep)
    assert 0.3 < 1 - keep.float().mean() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fully_masked_rows(dtype):
    q, k, v = _inputs(2, 2, 2, 12, 20, 16, dtype=dtype)
    mask = torch.rand(2, 1, 12, 20, device=DEVICE) > 0.5
    mask[:, :, 3] = False  # row 3 sees nothing
    assert_backend_matches("triton", q, k, v, attn_mask=mask, key_lengths=torch.tensor([20, 0], device=DEVICE))
    out, lse = fusedattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend="triton")
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))


@pytest.mark.parametrize("window", [(None, 2**31 - 1), (2**31 - 1, 2**31 - 1)], ids=["right", "both"])
def test_widest_windows_hide_nothing(window):
    # position + window_right + 1 is int32 arithmetic in the kernels: 2**31 - 1 used to wrap
    # and mask every key. (Windows near 2**63 overflow the int64 reference itself.)
    q, k, v = _inputs(1, 1, 1, 5, 7, 16)
    assert_backend_matches("triton", q, k, v, window=window)


def test_dropout_near_one_stays_in_fp16_range():
    # p = 0.99999: a kept probability times 1 / (1 - p) = 1e5 passes fp16's range, while
    # out and dv (1e5 * 0.01) do not; scaling before the fp16 store used to give inf.
    dropout_p, seed = 0.99999, 11291
    zero = torch.zeros((), dtype=torch.int64)
    assert semantics.dropout_hash(seed, zero, zero, zero, zero) >= semantics.dropout_threshold(dropout_p)  # kept
    q, k = (torch.randn(1, 1, 1, 16, dtype=torch.float16, device=DEVICE) for _ in range(2))
    v = torch.full((1, 1, 1, 16), 0.01, dtype=torch.float16, device=DEVICE)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    out = fusedattn.attention(*inputs, dropout_p=dropout_p, dropout_seed=seed, backend="triton")
    out.backward(torch.full_like(out, 0.01))
    expected = torch.full((1, 1, 1, 16), 0.01 / (1 - dropout_p))
    torch.testing.assert_close(out.detach().float().cpu(), expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(inputs[2].grad.float().cpu(), expected, rtol=2e-3, atol=0)


def test_deterministic_backward(monkeypatch):
    monkeypatch.setenv("FUSEDATTN_DETERMINISTIC", "1")
    q, k, v = _inputs(1, 4, 1, 20, 33, 16)
    options = {"causal": True, "dropout_p": 0.1, "dropout_seed": 1}
    assert_backend_matches("triton", q, k, v, **options)
    grads = []
    for _ in range(2):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fusedattn.attention(*inputs, backend="triton", **options).sum().backward()
        grads.append([t.grad for t in inputs])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_tf32_follows_torchs_matmul_policy():
    # torch's own switches decide: set_float32_matmul_precision ("highest" = IEEE, its
    # default) and the newer torch.backends.cuda.matmul.fp32_precision, which wins.
    from fusedattn.kernels.utils import float32_matmul_allows_tf32, input_precision

    matmul = torch.backends.cuda.matmul
    previous = torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None)
    try:
        torch.set_float32_matmul_precision("highest")
        assert not float32_matmul_allows_tf32() and input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert float32_matmul_allows_tf32()
        # The interpreter always computes exactly.
        assert input_precision(torch.float32) == ("tf32" if DEVICE == "cuda" else "ieee")
        assert input_precision(torch.float16) == "ieee"
        if previous[1] is not None:
            matmul.fp32_precision = "ieee"
            assert not float32_matmul_allows_tf32()
            matmul.fp32_precision = "tf32"
            assert float32_matmul_allows_tf32()
    finally:
        torch.set_float32_matmul_precision(previous[0])
        if previous[1] is not None:
            matmul.fp32_precision = previous[1]


def test_refuses_cpu_without_interpreter(monkeypatch):
    profile = CallProfile("cpu", torch.float32, 64, 64, frozenset())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in triton_backend.refuse(profile)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.refuse(profile) is None
    assert "bfloat16" in triton_backend.refuse(CallProfile("cpu", torch.bfloat16, 64, 64, frozenset()))


def test_unavailable_without_triton(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name))
        triton_backend._triton_status.cache_clear()
        assert triton_backend.availability() == (False, "triton is not installed")
    triton_backend._triton_status.cache_clear()
    assert triton_backend.availability() == (True, "")


def test_outputs_are_fully_written():
    # check_backend poisons outputs with NaN; a larger odd shape catches unwritten tails.
    q, k, v = _inputs(1, 3, 3, 33, 47, 24)
    checks = check_backend("triton", q, k, v, causal=True, window=(None, 5))
    assert all(c.passed for c in checks), [c.reason for c in checks if not c.passed]


# Inductor generates code for user Triton kernels only with a GPU driver; under the
# interpreter the traced graph (with the kernel calls) runs through aot_eager instead.
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


@pytest.mark.parametrize("options", [{}, {"dropout_p": 0.3, "dropout_seed": 2**40 + 3}], ids=["plain", "dropout"])
def test_torch_compile_fullgraph(options):
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 1, 20, 20, 16))

    def attend(q, k, v):
        return fusedattn.attention(q, k, v, causal=True, softcap=4.0, backend="triton", **options) * 2.0

    compiled = torch.compile(attend, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(q, k, v)
    out.sum().backward()
    compiled_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = attend(q, k, v)
    expected.sum().backward()
    assert torch.equal(out, expected)
    for got, want in zip(compiled_grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_torch_compile_fullgraph_learns_sinks():
    # The sinks' gradient comes through the backward op's extra output, compiled too.
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 1, 20, 20, 16))
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)

    def attend(q, k, v, sinks):
        return fusedattn.attention(q, k, v, causal=True, sinks=sinks, backend="triton") * 2.0

    compiled = torch.compile(attend, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    expected = attend(q, k, v, sinks)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, sinks))
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_triton_ops_pass_opcheck():
    # Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes:
    # the body runs on fake tensors there) of the triton_op ops, seed included.
    from fusedattn.ops import op_arguments, ops_for

    forward_op, _ = ops_for(fusedattn.dispatch.registry()["triton"])
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 4, 2, 5, 6, 8, 4))
    calls = [
        validate_attention(q, k, v, causal=True, dropout_p=0.2, dropout_seed=5),
        validate_attention(q, k, v, attn_mask=torch.rand(5, 6, device=DEVICE) > 0.5, softcap=3.0, window=(2, None),
                           key_lengths=torch.tensor([6, 2], device=DEVICE), alibi_slopes=torch.rand(4, device=DEVICE)),
    ]  # fmt: skip
    for call in calls:
        torch.library.opcheck(forward_op, op_arguments(call))


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):  # autotuner -> triton.jit function -> Python function
        kernel = kernel.fn
    return kernel.__name__


def test_torch_compile_traces_into_the_kernels():
    # The ops are torch.library.triton_op ops: AOTAutograd decomposes them into their
    # bodies, so the graphs handed to the compiler hold the Triton kernel calls
    # (triton_kernel_wrapper_functional), not the opaque fusedattn ops.
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return boxed_nop(graph_module, example_inputs)

    q, k, v = (t.requires_grad_(True) for t in _inputs(1, 2, 1, 20, 20, 16))
    options = {"causal": True, "dropout_p": 0.2, "dropout_seed": 11}
    compiled = torch.compile(
        lambda q, k, v: fusedattn.attention(q, k, v, backend="triton", **options),
        fullgraph=True,
        backend=functools.partial(aot_eager, fw_compiler=capture, bw_compiler=capture),
    )
    out = compiled(q, k, v)
    out.sum().backward()
    assert len(graphs) == 2, "expected one forward and one backward graph"
    for graph_module, kernels in zip(graphs, [{"attention_forward_kernel"}, {"attention_backward_dkdv_kernel"}]):
        calls = [node for node in graph_module.graph.nodes if node.op == "call_function"]
        assert not [node for node in calls if "fusedattn" in str(node.target)], graph_module.code
        launched = {
            _kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
            for node in calls
            if "triton_kernel_wrapper_functional" in str(node.target)
        }
        assert kernels <= launched, (launched, graph_module.code)
    # The graphs run the kernels: same result as eager.
    assert torch.equal(out, fusedattn.attention(q, k, v, backend="triton", **options))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_larger_shapes(dtype, causal):
    q, k, v = _inputs(2, 8, 2, 700, 1100, 128, dtype=dtype)
    assert_backend_matches("triton", q, k, v, causal=causal)
    q, k, v = _inputs(1, 4, 4, 513, 513, 64, dtype=dtype)
    assert_backend_matches("triton", q, k, v, causal=causal, dropout_p=0.1, dropout_seed=1)


# ---- invalid metadata: clamped reads, poisoned results (docs/semantics.md) ------------------
BAD_OFFSETS = [[0, 5, 4000], [0, -7, 10], [3, 2, 10], [0, 5, 9], [0, 2**31 - 1, 10], [-(2**31), 0, 10], [0, 10, 10]]


def _guarded(shape, dtype=torch.float32, guard=64):
    """A tensor in the middle of a NaN-filled buffer: any read outside it turns a result NaN."""
    buffer = torch.full((shape[0] + 2 * guard, *shape[1:]), float("nan"), dtype=dtype, device=DEVICE)
    tensor = buffer[guard : guard + shape[0]]
    tensor.copy_(torch.randn(shape, dtype=dtype, device=DEVICE))
    return tensor


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
@pytest.mark.parametrize("side", ["q", "k"])
def test_kernels_never_read_outside_the_tensors_whatever_the_offsets(offsets, side):
    from dataclasses import replace

    from fusedattn.kernels.attention_backward import backward as run_backward
    from fusedattn.kernels.attention_forward import forward as run_forward
    from fusedattn.validation import validate_varlen

    q, k, v = _guarded((10, 2, 16)), _guarded((10, 1, 16)), _guarded((10, 1, 16))
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    call = validate_varlen(q, k, v, good, good, 6, 6, causal=True)
    bad = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    call = replace(call, **{f"cu_seqlens_{side}": bad}, max_seqlen_q=5, max_seqlen_k=5, metadata_checked=False)
    with fusedattn.backends.base.poisoned_outputs(0.0):  # unwritten rows stay 0, never NaN
        out, lse = run_forward(call)
        grads = run_backward(call, torch.randn_like(out), out, lse.nan_to_num(neginf=0.0))
    assert not out.isnan().any(), "a kernel read outside q, k or v"
    assert not any(g.isnan().any() for g in grads), "a backward kernel read outside its inputs"


@pytest.mark.parametrize("lengths", [[-5, 3], [3, 4000], [2**31 - 1, -(2**31)]], ids=str)
def test_kernels_clamp_key_lengths(lengths):
    from dataclasses import replace

    from fusedattn.kernels.attention_backward import backward as run_backward
    from fusedattn.kernels.attention_forward import forward as run_forward

    q, k, v = (_guarded((6, 2, 9, 16)).transpose(0, 1) for _ in range(3))  # NaN beyond every sequence
    call = validate_attention(q, k, v, key_lengths=torch.tensor([9, 9], device=DEVICE))
    call = replace(call, key_lengths=torch.tensor(lengths, dtype=torch.int32, device=DEVICE), metadata_checked=False)
    out, lse = run_forward(call)
    grads = run_backward(call, torch.randn_like(out), out, lse.nan_to_num(neginf=0.0))
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)


def test_compiled_invalid_offsets_give_nan_and_valid_ones_the_result():
    torch._dynamo.reset()
    q, k, v = (torch.randn(10, 2, 16, device=DEVICE) for _ in range(3))
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)

    def packed(q, k, v, cu_q, cu_k):
        return fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True, backend="triton")

    compiled = torch.compile(packed, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, good, good), packed(q, k, v, good, good), atol=2e-6, rtol=1e-5)
    for offsets in BAD_OFFSETS[:4]:
        bad = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
        assert compiled(q, k, v, bad, good).isnan().all()
        assert compiled(q, k, v, good, bad).isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(dtype):
    from special_values import assert_hidden_nan_row_has_zero_gradient, assert_minus_infinite_scores_mask_the_row

    assert_hidden_nan_row_has_zero_gradient("triton", DEVICE, dtype)
    assert_minus_infinite_scores_mask_the_row("triton", DEVICE, dtype)


def test_grid_position_reaches_past_axis_limits():
    # Every kernel runs on a flat grid axis 0 (axes 1 and 2 stop at 65535). Decode program
    # numbers past 65535 the way grid_position does, 1024 at a time in one program (the
    # interpreter would take a minute for 70,000 programs).
    import triton.language as tl
    from fusedattn.kernels import utils

    # An interpreted kernel resolves names in its module's globals.
    globals()["flat_position"] = utils.flat_position

    @triton.jit
    def positions_kernel(Out, first, blocks, heads):
        program = first + tl.arange(0, 1024)
        block, head, batch = flat_position(program, blocks, heads)  # noqa: F821 (set above)
        index = tl.arange(0, 1024) * 3
        tl.store(Out + index, block)
        tl.store(Out + index + 1, head)
        tl.store(Out + index + 2, batch)

    blocks, heads, first = 3, 5, 69_000
    out = torch.full((1024, 3), -1, dtype=torch.int32, device=DEVICE)
    positions_kernel[(1,)](out, first, blocks, heads)
    program = torch.arange(first, first + 1024)
    expected = torch.stack([program % blocks, (program // blocks) % heads, program // (blocks * heads)], 1)
    assert torch.equal(out.cpu().long(), expected)
    assert utils.flat_grid(blocks, heads, 70_000) == (blocks * heads * 70_000,)


def test_launchers_use_a_flat_grid(monkeypatch):
    # B * H far past 65535 on axis 0 only; recorded, not run (the interpreter would take
    # minutes for 70,000 programs of the attention kernels).
    from fusedattn.kernels import attention_backward, attention_decode, attention_forward

    grids = []

    def record(kernel, grid, **arguments):
        meta = {"BLOCK_M": arguments.get("BLOCK_M", 16), "BLOCK_N": arguments.get("BLOCK_N", 16)}
        grids.append((getattr(kernel, "__name__", str(kernel)), grid(meta) if callable(grid) else grid))

    for module in (attention_forward, attention_backward, attention_decode):
        monkeypatch.setattr(module, "launch", record)
    batch = 70_000
    q, k, v = _inputs(batch, 1, 1, 1, 3, 16)
    call = validate_attention(q, k, v)
    out, lse = attention_forward.forward(call)
    attention_backward.backward(call, torch.zeros_like(out), out, lse)
    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", "always")
    attention_forward.forward(call)
    assert len(grids) >= 4
    for name, grid in grids:
        assert len(grid) == 1 and grid[0] >= batch, (name, grid)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (70,000 sequences take minutes interpreted)")
def test_more_sequences_than_a_grid_axis_holds():
    lengths = torch.zeros(70_000, dtype=torch.int32)
    lengths[[0, 40_000, -1]] = torch.tensor([2, 1, 3], dtype=torch.int32)
    offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)).to(DEVICE)
    q, k, v = (torch.randn(6, 2, 16, device=DEVICE, dtype=torch.float16) for _ in range(3))
    assert_backend_matches("triton", q, k, v, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=3,
                           max_seqlen_k=3, causal=True)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_device_that_is_not_current():
    q, k, v = (torch.randn(1, 2, 40, 16, device="cuda:1", dtype=torch.float16) for _ in range(3))
    with torch.cuda.device(0):
        assert_backend_matches("triton", q, k, v, causal=True)


def test_device_guard_follows_the_tensor(monkeypatch):
    from fusedattn.kernels import utils

    entered = []
    monkeypatch.setattr(utils.torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    utils.device_guard(torch.empty(0, device="meta"))
    assert entered == []
    utils.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))  # a tensor on cuda:1
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("layout", ["dense", "varlen", "deterministic"])
def test_gqa_backward_split_over_query_heads(layout, monkeypatch):
    # B * Hkv * key blocks too small to fill the GPU: several programs share one KV head,
    # each over part of its query heads, into a float32 buffer summed afterwards.
    from fusedattn.kernels import attention_backward
    from fusedattn.kernels.utils import Problem

    if layout == "deterministic":
        monkeypatch.setenv("FUSEDATTN_DETERMINISTIC", "1")
    if layout == "varlen":
        q, k, v = (torch.randn(30, heads, 16, device=DEVICE) for heads in (8, 1, 1))
        offsets = torch.tensor([0, 11, 30], dtype=torch.int32, device=DEVICE)
        options = dict(cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=19, max_seqlen_k=19, causal=True)
        call = validate_varlen(q, k, v, offsets, offsets, 19, 19)
    else:
        q, k, v = _inputs(1, 8, 2, 20, 24, 16)
        options = dict(window=(6, 2), softcap=2.0)
        call = validate_attention(q, k, v)
    problem = Problem.of(call)
    assert attention_backward.group_splits(problem, 16, q.device) > 1  # the test exercises the split
    assert_backend_matches("triton", q, k, v, **options)


@pytest.mark.parametrize("dims", [(512, 512), (576, 512)], ids=["d512", "mla576-512"])
def test_large_head_dims(dims):
    dim, dim_v = dims
    q, k, v = _inputs(1, 4, 1, 9, 21, dim, dim_v)
    assert_backend_matches("triton", q, k, v, causal=True, sinks=torch.randn(4, device=DEVICE))
    assert_backend_matches("triton", q[:, :, :1].contiguous(), k, v, window=(8, None))  # the decode kernel


# ---- paged KV caches (fusedattn.attention_paged) ----------------------------------------------
PAGED_OPTIONS = {
    "causal": {"causal": True},
    "window_softcap_sinks": {"causal": True, "window": (6, None), "softcap": 2.0, "sinks": "per_head"},
    "alibi_top_left": {"alibi_slopes": "per_head", "causal_alignment": "top_left", "window": (None, 4)},
}


@pytest.mark.parametrize("decode", ["never", "always"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(PAGED_OPTIONS))
def test_paged_cache_read_in_place(case, dtype, block_size, decode, monkeypatch):
    from fusedattn.testing import paged_case

    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", decode)
    (q, key_cache, value_cache), paged = paged_case(
        (1, 3, 0), (21, 40, 5), block_size=block_size, dtype=dtype, device=DEVICE, shared_prefix_blocks=1,
        generator=torch.Generator().manual_seed(block_size),
    )  # fmt: skip
    options = dict(PAGED_OPTIONS[case])
    for name in ("sinks", "alibi_slopes"):
        if options.get(name) == "per_head":
            options[name] = torch.rand(q.shape[1], device=DEVICE)
    assert_backend_matches("triton", q, key_cache, value_cache, **options, **paged)


def test_paged_kernels_clamp_unchecked_block_numbers():
    # A table the host never checked (a compiled graph on the GPU): the kernels clamp every
    # block number into the cache, so they read what the clamped table names, never outside.
    from fusedattn.kernels.attention_forward import forward
    from fusedattn.testing import paged_case
    from fusedattn.validation import validate_paged

    (q, key_cache, value_cache), paged = paged_case((2, 1), (20, 9), block_size=4, device=DEVICE)
    table = paged["block_table"].clone()
    table[0, 1], table[1, 0] = 10_000, -7
    call = validate_paged(q, key_cache, value_cache, **{**paged, "block_table": table.clamp(0, 0)})
    clamped = table.clamp(0, key_cache.shape[0] - 1)
    unchecked = dataclasses.replace(call, block_table=table, metadata_checked=False)
    expected = dataclasses.replace(call, block_table=clamped)
    out, lse = forward(unchecked)
    expected_out, expected_lse = forward(expected)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(4, 3), (2, 300)])
def test_row_without_keys_is_zero_with_sinks_and_a_nan_value(seqlen_q, seqlen_k):
    # Row 0 sees no key while its block's tiles hold a NaN value: output 0, lse the sink
    # (the forward kernel and the decode kernels).
    q, k, v = _inputs(1, 1, 1, seqlen_q, seqlen_k, 16)
    v[0, 0, seqlen_k - 1, 0] = float("nan")
    options = {"causal": True} if seqlen_q > seqlen_k else {"key_lengths": torch.tensor([0], dtype=torch.int32)}
    options = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    for sinks in (None, torch.tensor([0.5], device=DEVICE)):
        out, lse = fusedattn.attention(q, k, v, sinks=sinks, return_lse=True, backend="triton", **options)
        assert torch.equal(out[0, 0, 0].cpu(), torch.zeros(16))
        assert float(lse[0, 0, 0]) == (float("-inf") if sinks is None else 0.5)


# ---- 8-bit K/V (float8_e4m3fn, int8): converted in registers, scales applied per key -----------
@pytest.mark.parametrize("decode", ["never", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "float8_e4m3fn"])
def test_quantized_kv_dense_and_varlen(kv_dtype, dtype, decode, monkeypatch):
    # Scales per token and head (quantize_kv), per KV head and per tensor: expanded views
    # whose zero strides the kernels follow. check_backend: the float64 oracle of the same
    # 8-bit inputs, plus the rounding of q's dtype.
    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", decode)
    q, k, v = _inputs(2, 4, 2, 3, 45, 32, dtype=torch.float32)
    q = q.to(dtype)
    key_cache, k_descale = fusedattn.quantize_kv(k * 3, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v, kv_dtype)
    # key_lengths: check_backend puts NaN in the 8-bit storage and its scales past 31.
    lengths = torch.tensor([31, 45], dtype=torch.int32, device=DEVICE)
    options = {"causal": True, "softcap": 4.0, "sinks": torch.rand(4, device=DEVICE), "key_lengths": lengths}
    assert_backend_matches("triton", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, **options)
    head_scales = torch.tensor([[0.05], [0.02]], device=DEVICE)  # (Hkv, 1): one per KV head
    assert_backend_matches("triton", q, key_cache, value_cache, k_descale=head_scales,
                           v_descale=torch.tensor(0.03, device=DEVICE), window=(20, None))  # fmt: skip
    # Packed sequences: scales (Tk, Hkv); a sequence without query rows.
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 30, 41, 90], dtype=torch.int32, device=DEVICE)
    packed_k, packed_v = (t.transpose(1, 2).reshape(90, 2, 32) for t in (k, v))
    key_cache, k_descale = fusedattn.quantize_kv(packed_k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(packed_v, kv_dtype)
    packed_q = q.transpose(1, 2).reshape(6, 4, 32)[:5]
    assert_backend_matches("triton", packed_q, key_cache, value_cache, cu_seqlens_q=cu_q,
                           cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=49, causal=True, k_descale=k_descale,
                           v_descale=v_descale)  # fmt: skip


@pytest.mark.parametrize("decode", ["never", "always"])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "float8_e4m3fn"])
def test_quantized_kv_paged(kv_dtype, decode, monkeypatch):
    from fusedattn.testing import paged_case

    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", decode)
    (q, key_cache, value_cache), paged = paged_case(
        (1, 3, 0), (21, 40, 5), block_size=16, dtype=torch.float16, device=DEVICE, shared_prefix_blocks=1,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    key_cache, k_descale = quantize_test_cache(key_cache, kv_dtype)
    value_cache, v_descale = quantize_test_cache(value_cache, kv_dtype)
    assert_backend_matches("triton", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale,
                           causal=True, window=(25, None), **paged)  # fmt: skip


def test_quantized_kv_tensor_descriptors_and_refused_backward(monkeypatch):
    monkeypatch.setenv("FUSEDATTN_TRITON_TMA", "1")
    q, k, v = _inputs(1, 4, 2, 20, 37, 32, dtype=torch.float16)
    key_cache, k_descale = fusedattn.quantize_kv(k, torch.int8)
    value_cache, v_descale = fusedattn.quantize_kv(v, torch.int8)
    assert_backend_matches("triton", q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale, causal=True)
    q.requires_grad_(True)
    explanation = fusedattn.explain(q, key_cache, value_cache, k_descale=k_descale, v_descale=v_descale)
    assert "no backward with 8-bit K/V" in explanation.refusals["triton"]


def test_quantized_kv_under_torch_compile():
    # The scales reach the traced kernel launch as the expanded views validation makes.
    q, k, v = _inputs(1, 2, 1, 20, 20, 16)
    key_cache, k_descale = fusedattn.quantize_kv(k, torch.float8_e4m3fn)
    value_cache, v_descale = fusedattn.quantize_kv(v, torch.float8_e4m3fn)

    def attend(q, key_cache, value_cache, k_descale, v_descale):
        return fusedattn.attention(q, key_cache, value_cache, k_descale=k_descale[0], v_descale=v_descale,
                                   causal=True, backend="triton")  # fmt: skip

    compiled = torch.compile(attend, fullgraph=True, backend=COMPILE_BACKEND)
    assert torch.equal(compiled(q, key_cache, value_cache, k_descale, v_descale),
                       attend(q, key_cache, value_cache, k_descale, v_descale))  # fmt: skip


@pytest.mark.parametrize("decode", ["never", "always"])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "float8_e4m3fn"])
def test_quantized_kv_small_value_scales_in_float16(kv_dtype, decode, monkeypatch):
    # Values near 1e-4 (fine in fp16) quantize with scales near 2e-7: with fp16 queries,
    # p * scale would be an fp16 subnormal of a bit or two; the output must keep fp16's
    # relative accuracy.
    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", decode)
    q, k, v = _inputs(1, 2, 2, 3, 45, 32)
    key_cache, k_descale = fusedattn.quantize_kv(k, kv_dtype)
    value_cache, v_descale = fusedattn.quantize_kv(v * 1e-4, kv_dtype)
    assert_backend_matches("triton", q.half(), key_cache, value_cache, k_descale=k_descale, v_descale=v_descale)
