"""The op layer's one options table carries every field of the call, both ways."""

from __future__ import annotations

import dataclasses

import fusedattn
import torch
from fusedattn.ops import OPTIONS, _call_from_arguments, op_arguments
from fusedattn.semantics import AttentionCall
from fusedattn.validation import validate_attention


def test_every_call_field_has_one_op_option():
    carried = [option.field for option in OPTIONS]
    fields = {field.name for field in dataclasses.fields(AttentionCall)} - {"q", "k", "v", "needs_grad"}
    assert sorted(carried) == sorted(fields)


def test_op_arguments_round_trip():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    options = dict(causal=True, causal_alignment="top_left", window=(3, None), softcap=2.0, dropout_p=0.1,
                   dropout_seed=7, alibi_slopes=torch.rand(4), key_lengths=torch.tensor([5, 2]))  # fmt: skip
    call = validate_attention(q, k, v, **options)
    rebuilt = _call_from_arguments(op_arguments(call))
    for field in dataclasses.fields(AttentionCall):
        if field.name == "needs_grad":
            continue
        mine, theirs = getattr(call, field.name), getattr(rebuilt, field.name)
        if isinstance(mine, torch.Tensor):
            assert theirs is mine, field.name
        else:
            assert theirs == mine, field.name


def _option_names(operator) -> list[str]:
    """The argument names of a native op's schema after its tensor arguments."""
    names = [argument.name for argument in operator.default._schema.arguments]
    return names[names.index("attn_mask") :]


def test_native_schemas_take_the_options_in_one_order():
    # csrc/native_options.h writes the list once; ops.NATIVE_OPTIONS is its Python side.
    import pytest
    from fusedattn._native import native
    from fusedattn.ops import NATIVE_OPTIONS

    if native() is None or not hasattr(torch.ops.fusedattn_native, "cpu_forward"):
        pytest.skip("fusedattn._C is not built")
    for name in ("cpu_forward", "cpu_backward", "cuda_attention_forward", "cuda_attention_backward"):
        if hasattr(torch.ops.fusedattn_native, name):
            assert _option_names(getattr(torch.ops.fusedattn_native, name)) == list(NATIVE_OPTIONS), name


def test_native_option_values_follow_the_op_contract():
    import pytest
    from fusedattn import semantics
    from fusedattn.ops import NATIVE_OPTIONS, native_option_values

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    call = validate_attention(
        q, k, v, causal=True, causal_alignment="top_left", window=(3, None), softcap=30.0,
        dropout_p=0.25, dropout_seed=2**40 + 7,
    )  # fmt: skip
    values = dict(zip(NATIVE_OPTIONS, native_option_values(call), strict=True))
    assert (values["max_seqlen_q"], values["max_seqlen_k"], values["causal"], values["bottom_right"]) == (
        0,
        0,
        True,
        False,
    )
    assert values["scale"] == pytest.approx(16**-0.5)
    assert (values["window_left"], values["window_right"], values["softcap"]) == (3, -1, 30.0)
    # The kernels get the seed already mixed, the integer drop threshold and 1 / (1 - p).
    assert (
        values["dropout_seed_key"] == semantics.dropout_seed_key(2**40 + 7) and 0 <= values["dropout_seed_key"] < 2**32
    )
    assert values["dropout_threshold"] == semantics.dropout_threshold(0.25) == 2**30
    assert values["dropout_keep_scale"] == pytest.approx(4 / 3)
    plain = dict(zip(NATIVE_OPTIONS, native_option_values(validate_attention(q, k, v, window=(None, 2**70)))))
    assert plain["window_left"] == -1 and plain["window_right"] == 2**30  # validation caps an over-wide side
    assert (plain["dropout_threshold"], plain["dropout_keep_scale"], plain["dropout_seed_key"]) == (0, 1.0, 0)


def test_plain_eager_calls_run_the_op_body_and_modes_still_see_the_op():
    # Eager calls with nothing to differentiate skip the dispatcher's round trip (about
    # 20 us); the result is the op's, and a dispatch mode (a FlopCounterMode, a tracer)
    # still sees fusedattn's op.
    from fusedattn.dispatch import select_backend
    from fusedattn.ops import op_arguments, ops_for
    from fusedattn.testing import DispatchRecorder
    from fusedattn.validation import validate_attention

    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    call = validate_attention(q, k, v, causal=True)
    backend = select_backend(call)
    forward_op, _ = ops_for(backend)
    expected, expected_lse = forward_op(*op_arguments(call))
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    with DispatchRecorder() as recorder:
        fusedattn.attention(q, k, v, causal=True)
    assert f"fusedattn.{backend.name}_forward.default" in recorder.names
    q.requires_grad_(True)  # autograd needs the op: its backward is registered there
    fusedattn.attention(q, k, v, causal=True).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_vmap_goes_through_the_op():
    # Found in review: under torch.func.vmap the inputs are batched tensors of type
    # torch.Tensor; skipping the op sent them to the native kernel, which has no batching
    # rule. The op's fallback loops over the batch.
    q, k, v = torch.randn(3, 2, 4, 16), torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16)
    batched = torch.func.vmap(lambda q, k, v: fusedattn.attention(q[None], k[None], v[None], causal=True)[0])
    expected = fusedattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(batched(q, k, v), expected)


def test_softcap_keeps_its_precision_at_any_cap():
    # Found in review: tanh through (1 - e) / (1 + e) alone has an absolute error, which the
    # cap scales; the CPU kernel's scores must stay as exact at cap 1e5 as without softcap.
    from fusedattn.backends.reference import reference_attention

    q, k, v = torch.randn(1, 2, 32, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    call = validate_attention(q.double(), k.double(), v.double(), softcap=1e5)
    expected, _, _ = reference_attention(call, torch.float64)
    out = fusedattn.attention(q, k, v, softcap=1e5, backend="cpu")
    assert float((out.double() - expected).abs().max()) < 1e-5
