"""Every wrong call fails before any kernel runs, naming the argument, the expected and the given."""

from __future__ import annotations

import fusedattn
import pytest
import torch
from fusedattn.backends import base


def _qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=6, D=8, Dv=8, dtype=torch.float32):
    return (
        torch.randn(B, Hq, Sq, D, dtype=dtype),
        torch.randn(B, Hkv, Sk, D, dtype=dtype),
        torch.randn(B, Hkv, Sk, Dv, dtype=dtype),
    )


@pytest.fixture(autouse=True)
def _no_kernel_runs(monkeypatch):
    """Any kernel launched during a bad call would hit this and fail the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran for an invalid call")

    monkeypatch.setattr(base, "allocate_output", forbidden)
    yield


def _bad(error, *fragments, **kwargs):
    """Assert attention(**kwargs) raises error with every fragment in its message."""
    q, k, v = kwargs.pop("qkv", None) or _qkv()
    with pytest.raises(error) as raised:
        fusedattn.attention(q, k, v, **kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value), str(raised.value)


def test_wrong_rank():
    q, k, v = _qkv()
    _bad(ValueError, "q:", "4-D", "(2, 4, 5)", qkv=(q[..., 0], k, v))
    _bad(ValueError, "v:", "4-D", qkv=(q, k, v[None]))


def test_not_a_tensor():
    q, k, v = _qkv()
    _bad(TypeError, "k:", "torch.Tensor", "list", qkv=(q, k.tolist(), v))


def test_integer_dtype():
    q, k, v = _qkv()
    _bad(TypeError, "q:", "torch.int64", qkv=(q.long(), k, v))


def test_dtype_mismatch():
    q, k, v = _qkv()
    _bad(TypeError, "k, v:", "torch.float32", "torch.float16", qkv=(q, k.half(), v))


def test_device_mismatch():
    q, k, v = _qkv()
    _bad(ValueError, "k, v:", "meta", qkv=(q, k.to("meta"), v))


def test_batch_mismatch():
    q, k, v = _qkv()
    _bad(ValueError, "batch 2", "got k 1", qkv=(q, k[:1], v[:1]))


def test_head_mismatches():
    q, k, v = _qkv()
    _bad(ValueError, "v:", "expected 2 heads", qkv=(q, k, v[:, :1]))
    q3 = torch.randn(2, 3, 5, 8)
    _bad(ValueError, "k:", "divides the 3 query heads", "got 2", qkv=(q3, k, v))


def test_head_dim_checks():
    q, k, v = _qkv()
    _bad(ValueError, "k:", "head dim 8", "got 4", qkv=(q, k[..., :4], v))
    big = _qkv(D=600, Dv=8)
    _bad(ValueError, "head dim from 1 to 576", "got 600", qkv=big)
    big_v = _qkv(Dv=577)
    _bad(ValueError, "v:", "got 577", qkv=big_v)


def test_sequence_mismatch_between_k_and_v():
    q, k, v = _qkv()
    _bad(ValueError, "v:", "sequence length 6", "got 5", qkv=(q, k, v[:, :, :5]))


def test_mask_errors():
    _bad(
        ValueError,
        "attn_mask:",
        "broadcastable to (2, 4, 5, 6)",
        "(3, 6)",
        attn_mask=torch.ones(3, 6, dtype=torch.bool),
    )
    _bad(
        TypeError,
        "attn_mask:",
        "torch.bool or torch.float32",
        "torch.int64",
        attn_mask=torch.ones(5, 6, dtype=torch.long),
    )
    _bad(TypeError, "attn_mask:", "torch.float16", attn_mask=torch.zeros(5, 6, dtype=torch.float16))
    _bad(ValueError, "attn_mask:", "meta", attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta"))
    _bad(ValueError, "attn_mask:", "at most 4 dims", attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool))


def test_window_errors():
    _bad(ValueError, "window:", "left side to be >= 0", "-1", window=(-1, 0))
    _bad(ValueError, "window:", "right side", "-3", window=(None, -3))
    _bad(TypeError, "window:", "pair", window=(1, 2, 3))
    _bad(TypeError, "window:", "left side to be an int", window=(1.5, 2))


def test_key_lengths_errors():
    _bad(ValueError, "key_lengths:", "[0, 6]", "[0, 7]", key_lengths=torch.tensor([0, 7]))
    _bad(ValueError, "key_lengths:", "[-1, 2]", key_lengths=torch.tensor([-1, 2]))
    _bad(ValueError, "key_lengths:", "shape (2,)", "(3,)", key_lengths=torch.tensor([1, 2, 3]))
    _bad(TypeError, "key_lengths:", "torch.float32", key_lengths=torch.tensor([1.0, 2.0]))


def test_option_errors():
    _bad(ValueError, "causal_alignment:", "'middle'", causal_alignment="middle")
    _bad(TypeError, "causal:", "True or False", causal="yes")
    _bad(ValueError, "dropout_p:", "[0, 1]", "1.5", dropout_p=1.5)
    _bad(ValueError, "dropout_seed:", "-4", dropout_p=0.1, dropout_seed=-4)
    _bad(ValueError, "softcap:", ">= 0", softcap=-1.0)
    _bad(TypeError, "scale:", "float", scale="0.1")
    _bad(ValueError, "alibi_slopes:", "(4,) or (2, 4)", "(3,)", alibi_slopes=torch.ones(3))
    _bad(TypeError, "return_lse:", return_lse="no")
    _bad(ValueError, "backend:", "'nonexistent'", backend="nonexistent")


def _varlen(**overrides):
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    arguments = {
        "cu_seqlens_q": torch.tensor([0, 3, 7], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 4, 9], dtype=torch.int32),
        "max_seqlen_q": 4,
        "max_seqlen_k": 5,
    }
    arguments.update(overrides)
    return fusedattn.attention_varlen(q, k, v, **arguments)


def test_varlen_errors():
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing offsets"):
        _varlen(
            cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 3, 4, 9], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="cu_seqlens_k: expected the last offset to equal the packed length 9, got 8"):
        _varlen(cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q: expected the first offset to be 0"):
        _varlen(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 offsets"):
        _varlen(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest sequence \\(4\\), got 3"):
        _varlen(max_seqlen_q=3)
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype torch.int32 or torch.int64"):
        _varlen(cu_seqlens_q=torch.tensor([0.0, 3.0, 7.0]))
    with pytest.raises(ValueError, match="q: expected a 3-D tensor"):
        fusedattn.attention_varlen(torch.randn(1, 7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8),
                                   torch.tensor([0, 7]), torch.tensor([0, 9]), 7, 9)  # fmt: skip


def test_forced_backend_that_cannot_serve_names_the_feature():
    fake = base.Backend(
        name="only_plain",
        capabilities=base.Capabilities(
            devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), features=frozenset(), max_head_dim=64
        ),
        forward=lambda call: None,
        backward=None,
    )
    from fusedattn import dispatch

    registry = dict(dispatch.registry())
    registry["only_plain"] = fake
    original = dispatch._REGISTRY
    dispatch._REGISTRY = registry
    try:
        _bad(fusedattn.UnsupportedCallError, "'only_plain'", "features 'causal_bottom_right', 'gqa' are not supported",
             causal=True, backend="only_plain")  # fmt: skip
        _bad(ValueError, "head_dim 128", "limit of 64", qkv=_qkv(D=128, Dv=128), backend="only_plain")
        _bad(ValueError, "dtype float16", qkv=_qkv(dtype=torch.float16), backend="only_plain")
        explanation = fusedattn.explain(*_qkv(Hkv=4), causal=True)
        assert "only_plain: feature 'causal_bottom_right' is not supported" in str(explanation)
    finally:
        dispatch._REGISTRY = original


def test_sdpa_specific_errors():
    # The drop-in refuses what torch's SDPA refuses, with torch's class (RuntimeError here),
    # still a ValueError for fusedattn callers; what torch accepts, it accepts.
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key: expected batch dims broadcastable to \(2, 4\)") as raised:
        fusedattn.scaled_dot_product_attention(q, k, v)  # 2 key heads for 4 query heads, no enable_gqa
    assert isinstance(raised.value, RuntimeError)
    with pytest.raises(ValueError, match="query: expected at least 2 dims") as raised:
        fusedattn.scaled_dot_product_attention(q[0, 0, 0], k[0, 0], v[0, 0])
    assert isinstance(raised.value, RuntimeError)
    # torch 2.13 takes attn_mask with is_causal for 4-D inputs of one head dim (its fused
    # CPU kernel), and 2-D inputs: so does the drop-in.
    mask = torch.ones(5, 6, dtype=torch.bool)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True
    )
    got = fusedattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        fusedattn.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
        torch.nn.functional.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]),
    )


def test_huge_window_sides_hide_nothing():
    q, k, v = _qkv()
    call = fusedattn.validation.validate_attention(q, k, v, window=(2**70, 2**63 - 1))
    assert (call.window_left, call.window_right) == (2**30, 2**30)


@pytest.mark.parametrize(
    ("sinks", "error", "message"),
    [
        (torch.zeros(3), ValueError, r"sinks: expected shape \(4,\), got \(3,\)"),
        (torch.zeros(2, 4), ValueError, r"sinks: expected shape \(4,\), got \(2, 4\)"),
        (torch.zeros(4, dtype=torch.int32), TypeError, "sinks: expected a floating dtype"),
        (torch.zeros(4, device="meta"), ValueError, "sinks: expected device cpu"),
        ([0.0] * 4, TypeError, "sinks"),
    ],
)
def test_sinks_are_checked(sinks, error, message):
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(error, match=message):
        fusedattn.validation.validate_attention(q, q, q, sinks=sinks)


def test_head_dims_up_to_576_and_the_cuda_limit():
    q = torch.randn(1, 2, 3, 577)
    with pytest.raises(ValueError, match="expected a head dim from 1 to 576, got 577"):
        fusedattn.validation.validate_attention(q, q, q)
    # The CUDA kernels stop at 256: refused with the reason, never run.
    profile = base.CallProfile("cuda", torch.float16, 512, 512, frozenset())
    reason = fusedattn.dispatch.refusal(fusedattn.registry()["cuda"], profile)
    assert reason is not None and ("256" in reason or "not available" in reason)
