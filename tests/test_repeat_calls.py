"""Repeated plain eager calls (fusedattn.repeat_calls): the remembered plan gives what the
full path gives, is taken only when nothing but the tensors' values differs, and never
lets a call the full path refuses through."""

from __future__ import annotations

import gc
import threading
import weakref

import fusedattn
import pytest
import torch
from fusedattn import dispatch, repeat_calls
from fusedattn._native import native
from fusedattn.backends import cpu as cpu_backend
from fusedattn.ops import native_option_values
from fusedattn.outputs import poisoned_outputs
from fusedattn.validation import validate_attention

pytestmark = pytest.mark.skipif(native() is None, reason="fusedattn._C is not built")


@pytest.fixture(autouse=True)
def empty_table():
    repeat_calls.forget()
    yield
    repeat_calls.forget()


def _inputs(shape_q=(2, 4, 3, 16), heads_kv=2, seqlen_k=7, dtype=torch.float32):
    batch, heads_q, seqlen_q, dim = shape_q
    q = torch.randn(batch, heads_q, seqlen_q, dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, dim, dtype=dtype)
    return q, k, v


def _oracle(q, k, v, **options):
    out = fusedattn.attention(q.double(), k.double(), v.double(), backend="reference", **options)
    return out.to(q.dtype)


def test_a_repeated_call_runs_the_plan_and_matches_the_full_path():
    q, k, v = _inputs()
    first, first_lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    assert len(repeat_calls._PLANS) == 1
    q2, k2, v2 = _inputs()  # new values, same shapes
    calls = []
    (plan,) = repeat_calls._PLANS.values()
    repeat_calls._PLANS[next(iter(repeat_calls._PLANS))] = lambda *t: calls.append(1) or plan(*t)
    out, lse = fusedattn.attention(q2, k2, v2, causal=True, return_lse=True)
    assert calls == [1]
    full, full_lse = fusedattn.attention(q2, k2, v2, causal=True, return_lse=True, backend="cpu")
    assert torch.equal(out, full) and torch.equal(lse, full_lse)
    torch.testing.assert_close(out, _oracle(q2, k2, v2, causal=True), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(first, _oracle(q, k, v, causal=True), atol=2e-6, rtol=2e-6)
    assert first_lse.dtype == torch.float32 and lse.shape == (2, 4, 3)


@pytest.mark.parametrize(
    "options",
    [
        dict(causal=False),
        dict(causal=True, causal_alignment="top_left"),
        dict(window=(2, 0)),
        dict(window=(None, 1)),
        dict(softcap=3.0, scale=0.3),
        dict(causal=True, query_start=5, key_start=2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_plain_option_is_part_of_the_plan(options, dtype):
    q, k, v = _inputs(dtype=dtype)
    fusedattn.attention(q, k, v, **options)
    fusedattn.attention(q, k, v)  # another plan for the same tensors
    q, k, v = _inputs(dtype=dtype)
    with poisoned_outputs():
        expected = fusedattn.attention(q, k, v, **options)  # poisoning: through forward()
    out = fusedattn.attention(q, k, v, **options)
    assert torch.equal(out, expected)
    tolerance = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, _oracle(q, k, v, **options), atol=tolerance, rtol=tolerance)


def test_strides_and_dtypes_make_their_own_plans():
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, other strides
    out = fusedattn.attention(transposed, k, v)
    torch.testing.assert_close(out, _oracle(q, k, v), atol=2e-6, rtol=2e-6)
    assert len(repeat_calls._PLANS) == 2
    fusedattn.attention(q.half(), k.half(), v.half())
    assert len(repeat_calls._PLANS) == 3


@pytest.mark.parametrize(
    "good, bad, error",
    [
        (dict(causal=True), dict(causal=1), TypeError),
        (dict(window=(1, 2)), dict(window=(1.0, 2)), TypeError),
        (dict(window=(1, 2)), dict(window=[1, 2]), None),  # a list is valid, and goes the full path
        (dict(scale=1.0), dict(scale=True), TypeError),
        (dict(softcap=1.0), dict(softcap=True), TypeError),
        (dict(query_start=0, causal=True), dict(query_start=False, causal=True), TypeError),
        (dict(causal_alignment="top_left"), dict(causal_alignment="middle"), ValueError),
        (dict(return_lse=True), dict(return_lse=1), TypeError),
        (dict(backend="auto"), dict(backend="nonexistent"), ValueError),
    ],
)
def test_a_refused_call_is_refused_every_time(good, bad, error):
    # The key tells True from 1 (equal values, equal hashes) only by type: the plan of the
    # valid twin must not serve the invalid call, and a refused call leaves no plan.
    q, k, v = _inputs()
    fusedattn.attention(q, k, v, **good)
    fusedattn.attention(q, k, v, **good)
    plans = len(repeat_calls._PLANS)
    assert plans == 1
    for _ in range(2):
        if error is None:
            torch.testing.assert_close(fusedattn.attention(q, k, v, **bad), fusedattn.attention(q, k, v, **good))
        else:
            with pytest.raises(error):
                fusedattn.attention(q, k, v, **bad)
    assert len(repeat_calls._PLANS) == plans


def test_bad_shapes_are_refused_after_good_ones():
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        fusedattn.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="heads"):
        fusedattn.attention(q, k[:, :1], v)


def test_calls_needing_the_full_path_do_not_use_plans():
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    q.requires_grad_(True)
    out = fusedattn.attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None and out.grad_fn is not None
    q = q.detach()
    mask = torch.ones(2, 4, 3, 7, dtype=torch.bool)
    mask[..., 0] = False
    torch.testing.assert_close(
        fusedattn.attention(q, k, v, attn_mask=mask), _oracle(q, k, v, attn_mask=mask), atol=2e-6, rtol=2e-6
    )
    fusedattn.attention(q, k, v, dropout_p=0.5, dropout_seed=3)
    fusedattn.attention(torch.nn.Parameter(q), k, v)  # a subclass
    assert len(repeat_calls._PLANS) == 1


class _TensorSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("position", [0, 1, 2])
def test_the_native_tensor_key_tells_every_difference_and_refuses_what_is_not_plain(position):
    # fusedattn._C.plain_tensors_key: equal keys exactly for equal sizes, strides, dtypes
    # and devices; None for anything but a plain strided torch.Tensor that needs no grad.
    key_of = native().plain_tensors_key
    tensors = list(_inputs())
    base = key_of(*tensors)
    assert base == key_of(*_inputs()) and hash(base) == hash(key_of(*_inputs()))
    original = tensors[position]
    variants = {
        "other size": original[..., :8],
        "other stride": original.transpose(1, 2).contiguous().transpose(1, 2),
        "other dtype": original.double(),
        "other rank": original[0],
    }
    for name, variant in variants.items():
        changed = list(tensors)
        changed[position] = variant
        assert key_of(*changed) not in (None, base), name
    refused = {
        "requires grad": original.clone().requires_grad_(True),
        "Parameter": torch.nn.Parameter(original.clone(), requires_grad=False),
        "subclass": original.as_subclass(_TensorSubclass),
        "sparse": original.to_sparse(),
        "not a tensor": original.tolist(),
        "None": None,
    }
    for name, variant in refused.items():
        changed = list(tensors)
        changed[position] = variant
        assert key_of(*changed) is None, name


def test_a_dispatch_mode_still_sees_the_op():
    from fusedattn.testing import DispatchRecorder

    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    fusedattn.attention(q, k, v)
    with DispatchRecorder() as recorder:
        fusedattn.attention(q, k, v)
    assert "fusedattn.cpu_forward.default" in recorder.names


def test_the_plan_keeps_no_tensor_alive():
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    watched = [weakref.ref(t) for t in (q, k, v)]
    del q, k, v
    gc.collect()
    assert all(ref() is None for ref in watched)
    assert len(repeat_calls._PLANS) == 1


def test_the_table_is_bounded():
    for length in range(1, repeat_calls.LARGEST_TABLE + 10):
        q, k, v = _inputs(seqlen_k=length, shape_q=(1, 2, 1, 8), heads_kv=1)
        fusedattn.attention(q, k, v)
        assert len(repeat_calls._PLANS) <= repeat_calls.LARGEST_TABLE


def test_the_backend_choice_is_asked_again_when_the_settings_change(monkeypatch):
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    seen = []
    reference = dispatch.registry()["reference"]

    def counting_forward(call):
        seen.append(call)
        return reference.forward(call)

    import dataclasses

    counting = dataclasses.replace(
        reference,
        name="counting",
        forward=counting_forward,
        capabilities=dataclasses.replace(reference.capabilities, priority={"cpu": 1000}),
        prepare_forward=None,
    )
    monkeypatch.setitem(dispatch.registry(), "counting", counting)
    fusedattn.attention(q, k, v)
    assert len(seen) == 1  # a new registry: chosen again, and it is the new backend
    monkeypatch.setenv("FUSEDATTN_BACKEND", "cpu")
    fusedattn.attention(q, k, v)
    assert len(seen) == 1


def test_the_sdpa_drop_in_remembers_only_what_torch_accepts():
    q, k, v = _inputs()  # 4 query heads over 2 KV heads: attention() takes it, SDPA needs enable_gqa
    fusedattn.attention(q, k, v, causal=True, causal_alignment="top_left")
    for _ in range(2):
        with pytest.raises(RuntimeError):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        with pytest.raises(RuntimeError):
            fusedattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = _inputs(heads_kv=4)
    for _ in range(3):
        out = fusedattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        torch.testing.assert_close(out, expected.float(), atol=2e-6, rtol=2e-6)
    assert any("sdpa" in key for key in repeat_calls._PLANS)


def test_direct_binding_and_operator_agree_and_refuse_alike():
    q, k, v = _inputs()
    options = native_option_values(validate_attention(q, k, v, causal=True))
    outputs = [(torch.full((2, 4, 3, 16), float("nan")), torch.full((2, 4, 3), float("nan"))) for _ in range(2)]
    native().cpu_forward(q, k, v, *outputs[0], *options)
    torch.ops.fusedattn_native.cpu_forward(q, k, v, *outputs[1], *options)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    out, lse = native().CpuForwardPlan([2, 4, 3, 16], [2, 4, 3], *options)(q, k, v)
    assert torch.equal(out, outputs[0][0]) and torch.equal(lse, outputs[0][1])
    wrong = torch.empty(2, 4, 3, 8)
    for entry in (native().cpu_forward, torch.ops.fusedattn_native.cpu_forward):
        with pytest.raises(ValueError, match="out: expected shape"):
            entry(q, k, v, wrong, outputs[0][1], *options)
    with pytest.raises(ValueError, match="out: expected shape"):
        native().CpuForwardPlan([2, 4, 3, 8], [2, 4, 3], *options)(q, k, v)
    with pytest.raises(ValueError, match="lse: expected shape"):
        native().CpuForwardPlan([2, 4, 3, 16], [2, 4, 2], *options)(q, k, v)
    with pytest.raises(ValueError, match="k: expected shape"):
        native().CpuForwardPlan([2, 4, 3, 16], [2, 4, 3], *options)(q, k[:1], v)
    with_mask = native_option_values(validate_attention(q, k, v, attn_mask=torch.ones(3, 7, dtype=torch.bool)))
    with pytest.raises(ValueError, match="options without tensors"):
        native().CpuForwardPlan([2, 4, 3, 16], [2, 4, 3], *with_mask)


def test_kept_scratch_serves_changing_head_dims_and_threads():
    # Each thread keeps its work areas between calls: a call after a smaller or larger
    # one, and calls from several Python threads at once (the GIL is released), all match.
    cases = [((1, 2, 70, dim), 1, 90) for dim in (16, 256, 8, 128, 33)]
    for shape, heads_kv, seqlen_k in cases:
        q, k, v = _inputs(shape, heads_kv, seqlen_k)
        torch.testing.assert_close(fusedattn.attention(q, k, v), _oracle(q, k, v), atol=3e-6, rtol=3e-6)
    failures = []

    def worker(dim):
        for _ in range(5):
            q, k, v = _inputs((1, 2, 3, dim), 1, 50)
            if not torch.allclose(fusedattn.attention(q, k, v), _oracle(q, k, v), atol=3e-6, rtol=3e-6):
                failures.append(dim)

    threads = [threading.Thread(target=worker, args=(dim,)) for dim in (16, 64, 256)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_poisoned_outputs_reach_the_plan(monkeypatch):
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    seen = []
    original = cpu_backend.forward
    monkeypatch.setattr(cpu_backend, "forward", lambda call: seen.append(call) or original(call))
    with poisoned_outputs():
        out = fusedattn.attention(q, k, v)
    assert len(seen) == 1 and seen[0].q is q and not out.isnan().any()


def test_tensors_with_the_negative_bit_are_read_as_their_values():
    # x.conj().imag is a view whose memory holds -values (the negative bit): the dispatcher
    # resolves it before an operator's kernel runs; the direct bindings must too.
    def negative_view(*shape):
        return torch.randn(*shape, dtype=torch.complex64).conj().imag

    q, k, v = negative_view(2, 4, 3, 16), negative_view(2, 2, 7, 16), negative_view(2, 2, 7, 16)
    mask = negative_view(2, 4, 3, 7)
    assert q.is_neg() and mask.is_neg()
    plain = (q.resolve_neg(), k.resolve_neg(), v.resolve_neg())
    expected = _oracle(*plain)
    for _ in range(2):  # the full path, then the plan
        torch.testing.assert_close(fusedattn.attention(q, k, v), expected, atol=2e-6, rtol=2e-6)
    with_mask = fusedattn.attention(q, k, v, attn_mask=mask, backend="cpu")
    torch.testing.assert_close(with_mask, _oracle(*plain, attn_mask=mask.resolve_neg().double()), atol=2e-6, rtol=2e-6)
    options = native_option_values(validate_attention(q, k, v))
    out, _ = native().CpuForwardPlan([2, 4, 3, 16], [2, 4, 3], *options)(q, k, v)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


def _openmp_runtime():
    """ctypes handle of the OpenMP runtime (libgomp) this process loaded, or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    return ctypes.CDLL(sorted(paths)[0]) if paths else None


def test_a_call_from_inside_another_parallel_region_computes_all_of_its_rows():
    # A small call runs on the calling thread; inside a caller's OpenMP parallel region its
    # `omp for` loops must still be its own (not shared out among the caller's team, which
    # would leave part of each caller thread's output unwritten).
    import ctypes

    runtime = _openmp_runtime()
    if runtime is None:
        pytest.skip("no libgomp in this process")
    q, k, v = _inputs((1, 2, 40, 16), 1, 9)
    options = native_option_values(validate_attention(q, k, v))
    team = 2
    outputs = [(torch.full((1, 2, 40, 16), float("nan")), torch.full((1, 2, 40), float("nan"))) for _ in range(team)]
    runtime.omp_get_thread_num.restype = ctypes.c_int
    errors = []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def each_thread(_data):
        try:
            native().cpu_forward(q, k, v, *outputs[runtime.omp_get_thread_num()], *options)
        except Exception as error:  # noqa: BLE001  (reported below, not lost in the C callback)
            errors.append(error)

    runtime.GOMP_parallel(each_thread, None, ctypes.c_uint(team), ctypes.c_uint(0))
    assert errors == []
    expected = _oracle(q, k, v)
    for out, lse in outputs:
        assert int(out.isnan().sum()) == 0 and int(lse.isnan().sum()) == 0  # every row written
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


def test_make_fx_still_records_the_op():
    # make_fx's proxy mode is an infra mode (not returned by every mode query): with a plan
    # remembered for these shapes, tracing must still see fusedattn's op, in real and fake
    # tracing modes, or the traced graph would hold the output as a constant.
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = _inputs()
    fusedattn.attention(q, k, v)
    fusedattn.attention(q, k, v)
    for mode in ("real", "fake"):
        graph = make_fx(lambda q, k, v: fusedattn.attention(q, k, v), tracing_mode=mode)(q, k, v)
        targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert "fusedattn.cpu_forward.default" in targets, (mode, targets)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_jit_trace_records_the_operator():
    # torch.jit.trace sees operators only: a direct call (or a plan) would leave the traced
    # graph returning the example's uninitialized output buffer.
    q, k, v = _inputs()
    fusedattn.attention(q, k, v)  # a plan for these shapes exists before the trace
    traced = torch.jit.trace(lambda q, k, v: fusedattn.attention(q, k, v), (q, k, v), check_trace=False)
    q, k, v = _inputs()
    torch.testing.assert_close(traced(q, k, v), _oracle(q, k, v), atol=2e-6, rtol=2e-6)


def _quantized_inputs(dtype, scales="token", query_dtype=torch.bfloat16, seqlen_k=40):
    """bf16 queries over an 8-bit cache (B2 H4:2 Sq1 D32) and its scales, per token, per
    KV head or one per tensor."""
    q, k, v = _inputs(shape_q=(2, 4, 1, 32), heads_kv=2, seqlen_k=seqlen_k)
    k8, k_descale = fusedattn.quantize_kv(k, dtype)
    v8, v_descale = fusedattn.quantize_kv(v, dtype)
    if scales == "head":
        k_descale, v_descale = k_descale.amax(-1, keepdim=True), v_descale.amax(-1, keepdim=True)
    elif scales == "tensor":
        k_descale, v_descale = k_descale.amax(), v_descale.amax()
    return q.to(query_dtype), k8, v8, k_descale, v_descale


def _quantized_oracle(q, k, v, k_descale, v_descale, **options):
    key = k.double() * k_descale.double().broadcast_to(k.shape[:-1])[..., None]
    value = v.double() * v_descale.double().broadcast_to(v.shape[:-1])[..., None]
    return fusedattn.attention(q.double(), key, value, backend="reference", **options)


@pytest.mark.parametrize("scales", ["token", "head", "tensor"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_calls_with_8bit_scales_run_a_plan_that_takes_the_scales_with_each_call(dtype, scales):
    first = _quantized_inputs(dtype, scales)
    fusedattn.attention(*first[:3], k_descale=first[3], v_descale=first[4])
    assert len(repeat_calls._PLANS) == 1
    (key,) = repeat_calls._PLANS
    plan = repeat_calls._PLANS[key]
    calls = []
    repeat_calls._PLANS[key] = lambda *t: calls.append(1) or plan(*t)
    q, k, v, k_descale, v_descale = _quantized_inputs(dtype, scales)  # new values and scales
    out, lse = fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale, return_lse=True)
    assert calls == [1]
    full, full_lse = fusedattn.attention(
        q, k, v, k_descale=k_descale, v_descale=v_descale, return_lse=True, backend="cpu"
    )
    assert torch.equal(out, full) and torch.equal(lse, full_lse)
    expected = _quantized_oracle(q, k, v, k_descale, v_descale)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    # The scales' values matter: doubling k's scale changes the scores.
    doubled = fusedattn.attention(q, k, v, k_descale=k_descale * 2, v_descale=v_descale)
    assert calls == [1, 1] and not torch.equal(doubled, out)
    torch.testing.assert_close(
        doubled.double(), _quantized_oracle(q, k, v, k_descale * 2, v_descale), atol=2e-2, rtol=2e-2
    )


def test_8bit_scales_of_other_shapes_dtypes_or_presence_make_their_own_plans():
    q, k, v, k_descale, v_descale = _quantized_inputs(torch.int8)
    variants = {
        "per token": (k_descale, v_descale),
        "per head": (k_descale.amax(-1, keepdim=True), v_descale.amax(-1, keepdim=True)),
        "float64 scales": (k_descale.double(), v_descale.double()),
        "strided scales": (k_descale.transpose(0, 1).contiguous().transpose(0, 1), v_descale),
        "only k's": (k_descale, None),
        "only v's": (None, v_descale),
        "none": (None, None),
    }
    for _ in range(2):  # the full path, then each variant's own plan
        for name, (k_scale, v_scale) in variants.items():
            out = fusedattn.attention(q, k, v, k_descale=k_scale, v_descale=v_scale)
            ones = torch.ones(())
            expected = _quantized_oracle(
                q, k, v, ones if k_scale is None else k_scale, ones if v_scale is None else v_scale
            )
            torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2, msg=name)
    assert len(repeat_calls._PLANS) == len(variants)


def test_bad_8bit_scales_are_refused_after_a_plan_of_good_ones():
    q, k, v, k_descale, v_descale = _quantized_inputs(torch.float8_e4m3fn)
    for _ in range(2):
        fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale)
    with pytest.raises(ValueError, match="k_descale: expected a shape broadcastable"):
        fusedattn.attention(q, k, v, k_descale=k_descale[..., :3], v_descale=v_descale)
    with pytest.raises(TypeError, match="v_descale: expected a floating dtype"):
        fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale.to(torch.int32))
    with pytest.raises(TypeError, match="k_descale"):
        fusedattn.attention(q, k, v, k_descale=0.5, v_descale=v_descale)
    # Scales with a bfloat16 cache are refused, plan or not.
    dense = _inputs(shape_q=(2, 4, 1, 32), heads_kv=2, seqlen_k=40)
    with pytest.raises(ValueError, match="k_descale: expected None"):
        fusedattn.attention(*dense, k_descale=k_descale, v_descale=v_descale)
    # A scale that requires grad takes the full path (and is served).
    out = fusedattn.attention(q, k, v, k_descale=k_descale.clone().requires_grad_(True), v_descale=v_descale)
    torch.testing.assert_close(out, fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale))
    assert len(repeat_calls._PLANS) == 1


def test_the_plan_keeps_no_8bit_scale_alive_and_poisoned_outputs_reach_it(monkeypatch):
    q, k, v, k_descale, v_descale = _quantized_inputs(torch.int8)
    fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale)
    watched = [weakref.ref(t) for t in (k, v, k_descale, v_descale)]
    del k, v, k_descale, v_descale
    gc.collect()
    assert all(ref() is None for ref in watched)
    q, k, v, k_descale, v_descale = _quantized_inputs(torch.int8)
    seen = []
    original = cpu_backend.forward
    monkeypatch.setattr(cpu_backend, "forward", lambda call: seen.append(call) or original(call))
    with poisoned_outputs():
        out = fusedattn.attention(q, k, v, k_descale=k_descale, v_descale=v_descale)
    assert len(seen) == 1 and seen[0].k is k and seen[0].k_descale.shape == k.shape[:-1]
    assert seen[0].k_descale.dtype == torch.float32
    torch.testing.assert_close(out.double(), _quantized_oracle(q, k, v, k_descale, v_descale), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("position", [3, 4])
def test_the_native_tensor_key_tells_the_8bit_scales_apart(position):
    key_of = native().plain_tensors_key
    q, k, v, k_descale, v_descale = _quantized_inputs(torch.int8)
    tensors = [q, k, v, k_descale, v_descale]
    base = key_of(*tensors)
    assert base is not None and base == key_of(*_quantized_inputs(torch.int8))
    original = tensors[position]
    for name, variant in {
        "None": None,
        "other size": original[..., :1],
        "other stride": original.transpose(0, 1).contiguous().transpose(0, 1),
        "other dtype": original.double(),
    }.items():
        changed = list(tensors)
        changed[position] = variant
        assert key_of(*changed) not in (None, base), name
    for name, variant in {
        "requires grad": original.clone().requires_grad_(True),
        "not a tensor": 0.5,
    }.items():
        changed = list(tensors)
        changed[position] = variant
        assert key_of(*changed) is None, name
    assert key_of(q, k, v) == key_of(q, k, v, None, None)
