"""The public API: SDPA compatibility, layouts, edge cases, dispatch and its extensibility."""

from __future__ import annotations

import inspect
import math
import sys
import textwrap

import fusedattn
import fusedattn.backends
import pytest
import torch
import torch.nn.functional as F
from fusedattn import dispatch
from fusedattn.ops import op_arguments, ops_for
from fusedattn.validation import validate_attention


def _math_sdpa(*args, **kwargs):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


# ---- torch SDPA drop-in ------------------------------------------------------------------
def test_sdpa_signature_is_torchs():
    # torch's function is a builtin without a signature; its docstring opens with one.
    theirs = F.scaled_dot_product_attention.__doc__.split("->")[0].replace("\n", "").replace(" ", "")
    ours = inspect.signature(fusedattn.scaled_dot_product_attention)
    rendered = ",".join(
        name if p.default is inspect.Parameter.empty else f"{name}={p.default}" for name, p in ours.parameters.items()
    )
    assert theirs == f"scaled_dot_product_attention({rendered})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "bool_mask", "additive_mask", "gqa", "scale", "three_d", "three_d_mask", "value_dim"],
)
def test_sdpa_matches_torch(case, dtype):
    B, H, Hkv, L, S, E, Ev = 2, 4, 4, 6, 9, 8, 8
    kwargs = {}
    if case == "gqa":
        Hkv, kwargs["enable_gqa"] = 2, True
    if case == "value_dim":
        Ev = 5
    q, k, v = (
        torch.randn(B, H, L, E, dtype=dtype),
        torch.randn(B, Hkv, S, E, dtype=dtype),
        torch.randn(B, Hkv, S, Ev, dtype=dtype),
    )
    if case.startswith("three_d"):
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(L, S) > 0.3
        kwargs["attn_mask"][:, 0] = True
    if case in ("additive_mask", "three_d_mask"):
        kwargs["attn_mask"] = torch.randn(1, L, S, dtype=dtype)
    if case == "scale":
        kwargs["scale"] = 0.05
    out = fusedattn.scaled_dot_product_attention(q, k, v, **kwargs)
    expected = _math_sdpa(q, k, v, **kwargs)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


def test_sdpa_replaces_torch_by_assignment(monkeypatch):
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    expected = _math_sdpa(q, k, v, is_causal=True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", fusedattn.scaled_dot_product_attention)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


def test_sdpa_fully_masked_row_gives_zero_as_torch_does():
    # docs/semantics.md: 0, never NaN; torch 2.13's SDPA (either CPU kernel) agrees.
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(4))
    torch.testing.assert_close(out, _math_sdpa(q, k, v, attn_mask=mask))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


# ---- layouts and edge cases ---------------------------------------------------------------
def test_non_contiguous_inputs_equal_contiguous_copies():
    base_q = torch.randn(2, 7, 3, 8)  # (B, S, H, D) memory, viewed as (B, H, S, D)
    q = base_q.transpose(1, 2)
    k = torch.randn(2, 8, 5, 3)[..., :8].permute(0, 2, 3, 1)[:, :, :5]  # odd strides
    k = torch.randn(2, 3, 16, 8)[:, :, ::2]  # every other key: a strided view
    v = torch.randn(1, 3, 8, 8).expand(2, 3, 8, 8)  # expanded (zero) batch stride
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    mask = (torch.rand(7, 8) > 0.2).t().contiguous().t()  # transposed bool mask
    out = fusedattn.attention(q, k, v, attn_mask=mask, causal=True)
    expected = fusedattn.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask.contiguous(), causal=True
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_nan_and_inf_inputs_do_not_crash():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    q[0, 0, 0, 0] = float("nan")
    k[0, 1, 2, 3] = float("inf")
    out, lse = fusedattn.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 4, 8) and lse.shape == (1, 2, 4)
    assert torch.isnan(out[0, 0, 0]).all()  # NaN propagates to its own row only
    assert torch.isfinite(out[0, 0, 1:]).all()


@pytest.mark.parametrize(
    "shape_q, shape_k",
    [((2, 3, 0, 8), (2, 3, 5, 8)), ((2, 3, 4, 8), (2, 3, 0, 8)), ((0, 3, 4, 8), (0, 3, 5, 8))],
    ids=["Sq=0", "Sk=0", "B=0"],
)
def test_empty_sequences(shape_q, shape_k):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_k, requires_grad=True)
    v = torch.randn(shape_k, requires_grad=True)
    out, lse = fusedattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:-1]
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == -math.inf).all())
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_varlen_with_empty_sequences_and_no_tokens():
    cu_q = torch.tensor([0, 0, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 3], dtype=torch.int32)
    out, lse = fusedattn.attention_varlen(torch.randn(2, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4), cu_q, cu_k, 2, 3,
                                          return_lse=True)  # fmt: skip
    assert torch.equal(out, torch.zeros(2, 2, 4)) and bool((lse == -math.inf).all())


def test_value_head_dim_and_head_dim_limits():
    for D, Dv in ((1, 1), (256, 256), (40, 200)):
        q, k, v = torch.randn(1, 1, 3, D), torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, Dv)
        assert fusedattn.attention(q, k, v).shape == (1, 1, 3, Dv)


def test_float64_and_half_outputs_keep_input_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q = torch.randn(1, 2, 3, 8, dtype=dtype)
        out, lse = fusedattn.attention(q, q, q, return_lse=True)
        assert out.dtype == dtype
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


# ---- dispatch ------------------------------------------------------------------------------
def test_explain_lists_every_backend():
    q = torch.randn(1, 2, 3, 8)
    explanation = fusedattn.explain(q, q, q, causal=True)
    assert explanation.chosen in dispatch.registry()
    assert set(explanation.refusals) >= set(dispatch.registry())
    assert str(explanation).startswith(f"chosen: {explanation.chosen}")


def test_environment_variable_selects_backend(monkeypatch):
    q = torch.randn(1, 2, 3, 8)
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, "reference")
    assert fusedattn.explain(q, q, q).chosen == "reference"
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, "no_such_backend")
    with pytest.raises(ValueError, match="backend: expected one of"):
        fusedattn.attention(q, q, q)


def test_a_new_backend_is_one_new_module(tmp_path, monkeypatch):
    """Dropping a module into the backends package is all it takes: auto picks it by priority."""
    (tmp_path / "doubled_reference.py").write_text(
        textwrap.dedent(
            """
            import dataclasses
            from fusedattn.backends import reference

            def forward(call):
                out, lse = reference.forward(call)
                return out, lse

            BACKEND = dataclasses.replace(
                reference.BACKEND, name="plugin", forward=forward,
                capabilities=dataclasses.replace(reference.BACKEND.capabilities, priority={"cpu": 1000}),
            )
            """
        )
    )
    monkeypatch.setattr(fusedattn.backends, "__path__", [*fusedattn.backends.__path__, str(tmp_path)])
    monkeypatch.setattr(dispatch, "_REGISTRY", None)
    try:
        q = torch.randn(1, 2, 3, 8, requires_grad=True)
        assert "plugin" in dispatch.registry()
        assert fusedattn.explain(q, q, q).chosen == "plugin"
        out = fusedattn.attention(q, q, q)
        out.sum().backward()  # the generated custom op has autograd
        assert torch.ops.fusedattn.plugin_forward.default is not None
        assert q.grad is not None
    finally:
        sys.modules.pop("fusedattn.backends.doubled_reference", None)
        dispatch._REGISTRY = None


def test_custom_ops_pass_opcheck():
    backend = dispatch.registry()["reference"]
    forward_op, _ = ops_for(backend)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, requires_grad=True)
    v = torch.randn(2, 2, 6, 4, requires_grad=True)
    calls = [
        validate_attention(q, k, v, causal=True),
        validate_attention(
            q,
            k,
            v,
            attn_mask=torch.rand(5, 6) > 0.5,
            key_lengths=torch.tensor([6, 2]),
            alibi_slopes=torch.rand(4),
            softcap=3.0,
            window=(2, None),
        ),  # fmt: skip
        validate_attention(q, k, v, dropout_p=0.2, dropout_seed=5),
    ]
    for call in calls:
        torch.library.opcheck(forward_op, op_arguments(call))


def test_sdpa_three_dim_mask_shape_refused_under_compile():
    # The 3-D path used to expand the mask inside try/except RuntimeError, which tracing
    # cannot catch: torch.compile reported a fake-tensor RuntimeError instead of attn_mask.
    q = torch.randn(2, 5, 8)
    k = v = torch.randn(2, 6, 8)
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    for function in (fusedattn.scaled_dot_product_attention,
                     torch.compile(fusedattn.scaled_dot_product_attention, backend="eager")):  # fmt: skip
        # A ValueError, and the RuntimeError torch raises (fusedattn.errors.RuntimeValueError).
        with pytest.raises(ValueError, match=r"attn_mask: expected a shape broadcastable to \(2, 5, 6\)") as raised:
            function(q, k, v, attn_mask=mask)
        assert isinstance(raised.value, RuntimeError)
    compiled = torch.compile(fusedattn.scaled_dot_product_attention, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as raised:
        compiled(q, k, v, attn_mask=mask)
    causes = [raised.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any(isinstance(c, ValueError) and "attn_mask" in str(c) for c in causes), causes
