"""The reference backend against independent float64 formulations.

Two independent oracles: torch SDPA's math path in float64 where its semantics apply,
and a plain loop over query rows that spells out docs/semantics.md term by term. The
dropout hash is checked against a scalar Python implementation of the same formula.
Gradients are checked with torch.autograd.gradcheck in float64.
"""

from __future__ import annotations

import math

import fusedattn
import pytest
import torch
import torch.nn.functional as F
from fusedattn import semantics
from fusedattn.backends import reference
from fusedattn.testing import FEATURE_CASES, SHAPE_FEATURES, feature_case, paged_case
from fusedattn.validation import validate_attention, validate_paged, validate_varlen

F64 = torch.float64


def _rand(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# ---- oracle 1: a loop over rows ---------------------------------------------------------
def _mix32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _kept(seed: int, p: float, b: int, h: int, i: int, j: int) -> bool:
    key = _mix32((seed & 0xFFFFFFFF) ^ _mix32(seed >> 32))
    value = _mix32(_mix32(_mix32(_mix32(key ^ b) ^ h) ^ i) ^ j)
    return value >= math.floor(p * 2**32)


def loop_attention(q, k, v, *, causal=False, alignment="bottom_right", scale=None, mask=None,
                   key_lengths=None, window=(None, None), alibi=None, softcap=None,
                   dropout_p=0.0, seed=0, batch_index=None, sinks=None, query_start=0, key_start=0):  # fmt: skip
    """Attention per docs/semantics.md, one query row at a time, in float64. query_start /
    key_start place the call in a longer sequence: global rows and keys throughout."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, Sq, Dv, dtype=F64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=F64)
    left, right = window
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            for i in range(Sq):
                # Global position of the row and global index of each key.
                position = i + (Sk - Sq if alignment == "bottom_right" else 0) + query_start
                scores = []
                for j_local in range(Sk):
                    j = j_local + key_start
                    s = float(q[b, h, i].double() @ k[b, kv, j_local].double()) * scale
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        slope = float(alibi[h] if alibi.dim() == 1 else alibi[b, h])
                        s += -slope * abs(position - j)
                    if mask is not None and mask.dtype != torch.bool:
                        s += float(mask[b, h, i, j_local])
                    visible = True
                    if mask is not None and mask.dtype == torch.bool:
                        visible &= bool(mask[b, h, i, j_local])
                    if key_lengths is not None:
                        visible &= j_local < int(key_lengths[b])
                    if causal:
                        visible &= j <= position
                    if left is not None:
                        visible &= j >= position - left
                    if right is not None:
                        visible &= j <= position + right
                    scores.append(s if visible else -math.inf)
                finite = [s for s in scores if s != -math.inf]
                sink = None if sinks is None else float(sinks[h])
                if not finite and sink is None:
                    continue
                top = max(finite + ([] if sink is None else [sink]))
                weights = [math.exp(s - top) if s != -math.inf else 0.0 for s in scores]
                # A sink is one more term of the denominator, with no value.
                total = sum(weights) + (0.0 if sink is None else math.exp(sink - top))
                lse[b, h, i] = top + math.log(total)
                row_batch = b if batch_index is None else batch_index
                for j in range(Sk):
                    p = weights[j] / total
                    if dropout_p > 0:
                        kept = _kept(seed, dropout_p, row_batch, h, i + query_start, j + key_start)
                        p = p / (1 - dropout_p) if kept else 0.0
                    out[b, h, i] += p * v[b, kv, j].double()
    return out, lse


# The shared feature cases, plus what only the row loop checks: an explicit scale, ALiBi
# with top-left alignment.
REFERENCE_CASES = {
    **FEATURE_CASES,
    "scale": {"scale": 0.3},
    "alibi_top_left": {"alibi_slopes": "per_batch", "causal_alignment": "top_left"},
}


def _materialize(name, q, k):
    """(kwargs for fusedattn.attention, kwargs for loop_attention) of REFERENCE_CASES[name]."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if name in FEATURE_CASES:
        api = feature_case(name, q, k)
    else:
        api = dict(REFERENCE_CASES[name])
        if api.get("alibi_slopes") == "per_batch":
            api["alibi_slopes"] = torch.rand(B, Hq, dtype=torch.float32)
    loop = {
        "causal": api.get("causal", False),
        "alignment": api.get("causal_alignment", "bottom_right"),
        "scale": api.get("scale"),
        "softcap": api.get("softcap"),
        "window": api.get("window", (None, None)),
    }
    if api.get("dropout_p"):
        loop["dropout_p"], loop["seed"] = api["dropout_p"], api["dropout_seed"]
    if api.get("alibi_slopes") is not None:
        loop["alibi"] = api["alibi_slopes"].expand(B, Hq)
    if api.get("attn_mask") is not None:
        mask = api["attn_mask"]
        loop["mask"] = (mask if mask.dtype == torch.bool else mask.to(F64)).expand(B, Hq, Sq, Sk)
    if api.get("key_lengths") is not None:
        loop["key_lengths"] = api["key_lengths"]
    if api.get("sinks") is not None:
        loop["sinks"] = api["sinks"]
    loop["query_start"], loop["key_start"] = api.get("query_start", 0), api.get("key_start", 0)
    return api, loop


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
@pytest.mark.parametrize("sizes", [(2, 4, 2, 5, 7, 6, 5), (3, 2, 2, 7, 4, 3, 8)], ids=["sq<sk", "sq>sk"])
def test_reference_matches_row_loop(name, sizes):
    B, Hq, Hkv, Sq, Sk, D, Dv = sizes
    q, k, v = _rand(B, Hq, Sq, D), _rand(B, Hkv, Sk, D), _rand(B, Hkv, Sk, Dv)
    api, loop = _materialize(name, q, k)
    out, lse = fusedattn.attention(q, k, v, return_lse=True, backend="reference", **api)
    expected_out, expected_lse = loop_attention(q, k, v, **loop)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float64(dtype):
    q, k, v = (_rand(2, 3, 9, 16).to(dtype) for _ in range(3))
    out = fusedattn.attention(q, k, v, causal=True, backend="reference")
    expected, _ = loop_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_varlen_matches_each_sequence_alone():
    lengths_q, lengths_k = [3, 0, 5, 1], [4, 2, 5, 6]
    Hq, Hkv, D = 4, 2, 8
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _rand(sum(lengths_q), Hq, D), _rand(sum(lengths_k), Hkv, D), _rand(sum(lengths_k), Hkv, D)
    slopes = torch.rand(Hq)
    out, lse = fusedattn.attention_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True, alibi_slopes=slopes,
        dropout_p=0.25, dropout_seed=7, return_lse=True, backend="reference",
    )  # fmt: skip
    assert out.shape == (sum(lengths_q), Hq, D) and lse.shape == (Hq, sum(lengths_q))
    for index in range(len(lengths_q)):
        rows = slice(int(cu_q[index]), int(cu_q[index + 1]))
        keys = slice(int(cu_k[index]), int(cu_k[index + 1]))
        expected, expected_lse = loop_attention(
            q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None], v[keys].transpose(0, 1)[None],
            causal=True, alibi=slopes, dropout_p=0.25, seed=7, batch_index=index,
        )  # fmt: skip
        torch.testing.assert_close(out[rows], expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, rows], expected_lse[0], rtol=1e-10, atol=1e-10)


# ---- oracle 2: torch SDPA's math path in float64 ---------------------------------------
@pytest.mark.parametrize(
    "kwargs, sdpa_kwargs",
    [
        ({}, {}),
        ({"causal": True, "causal_alignment": "top_left"}, {"is_causal": True}),
        ({"scale": 0.17}, {"scale": 0.17}),
    ],
)
@pytest.mark.parametrize("gqa", [False, True])
def test_reference_matches_torch_sdpa_math(kwargs, sdpa_kwargs, gqa):
    Hkv = 2 if gqa else 4
    q, k, v = _rand(2, 4, 6, 8), _rand(2, Hkv, 9, 8), _rand(2, Hkv, 9, 5)
    out = fusedattn.attention(q, k, v, backend="reference", **kwargs)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **sdpa_kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_match_torch_sdpa_math(kind):
    q, k, v = _rand(2, 3, 5, 8), _rand(2, 3, 7, 8), _rand(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.2 if kind == "bool" else _rand(1, 3, 1, 7)
    if kind == "bool":
        mask[..., 0] = True  # torch SDPA gives NaN on fully masked rows; keep every row alive here
    out = fusedattn.attention(q, k, v, attn_mask=mask, backend="reference")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---- dropout definition -----------------------------------------------------------------
def test_dropout_keep_mask_matches_scalar_formula():
    seed, p = 2**40 + 12345, 0.37
    keep = semantics.dropout_keep_mask(seed, p, torch.tensor([0, 5]), 3, 4, 6)
    for b_index, b in enumerate((0, 5)):
        for h in range(3):
            for i in range(4):
                for j in range(6):
                    assert bool(keep[b_index, h, i, j]) == _kept(seed, p, b, h, i, j)


def test_dropout_rate_and_seed_behaviour():
    keep = semantics.dropout_keep_mask(11, 0.25, torch.arange(4), 8, 64, 64)
    assert abs(1 - keep.double().mean().item() - 0.25) < 0.01
    other = semantics.dropout_keep_mask(12, 0.25, torch.arange(4), 8, 64, 64)
    assert (keep != other).double().mean() > 0.3  # another seed gives another mask
    q, k, v = _rand(1, 2, 4, 8), _rand(1, 2, 4, 8), _rand(1, 2, 4, 8)
    first = fusedattn.attention(q, k, v, dropout_p=0.5, dropout_seed=3)
    again = fusedattn.attention(q, k, v, dropout_p=0.5, dropout_seed=3)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.manual_seed(5)
    drawn = fusedattn.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    redrawn = fusedattn.attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(drawn, redrawn, rtol=0, atol=0)
    everything_dropped = fusedattn.attention(q, k, v, dropout_p=1.0, dropout_seed=1)
    assert torch.equal(everything_dropped, torch.zeros_like(everything_dropped))


# ---- gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_gradcheck(name):
    B, Hq, Hkv, Sq, Sk, D, Dv = 2, 4, 2, 4, 5, 3, 2
    inputs = [_rand(B, Hq, Sq, D), _rand(B, Hkv, Sk, D), _rand(B, Hkv, Sk, Dv)]
    api = feature_case(name, inputs[0], inputs[1])
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda q, k, v: fusedattn.attention(q, k, v, **api), inputs)


def test_gradcheck_varlen():
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    inputs = [_rand(5, 2, 3).requires_grad_(), _rand(8, 1, 3).requires_grad_(), _rand(8, 1, 4).requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda q, k, v: fusedattn.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, causal=True, window=(1, 0)), inputs
    )


# ---- the backend's backward: FlashAttention's, from the out and lse it is handed ---------
def _differentiated_options(call) -> tuple[str, ...]:
    """The differentiable options this call carries (a floating mask, ALiBi slopes, sinks)."""
    present = [name for name in semantics.DIFFERENTIABLE_OPTIONS if getattr(call, name) is not None]
    return tuple(name for name in present if name != "attn_mask" or call.attn_mask.dtype != torch.bool)


def _assert_backward_matches_autograd(call, grad_out) -> None:
    """reference.backward given the call's own out and lse == autograd through its forward."""
    names = _differentiated_options(call)
    out, lse, expected = reference.reference_attention(call, F64, grad_out, names)
    poison = float("nan")
    actual = reference.backward(call, grad_out, out, lse, names)
    assert len(actual) == 3 + len(names)
    for name, got, want in zip(("q", "k", "v", *names), actual, expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    # It reads the out it is handed: D from a NaN out makes the gradients NaN.
    if out.numel():
        poisoned = reference.backward(call, grad_out, torch.full_like(out, poison), lse, names)
        assert torch.isnan(poisoned[0]).any() or not call.q.numel()


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_backward_given_out_and_lse_matches_autograd(name):
    torch.manual_seed(3)
    B, Hq, Hkv, Sq, Sk, D, Dv = 2, 4, 2, 6, 7, 5, 3
    q, k, v = _rand(B, Hq, Sq, D), _rand(B, Hkv, Sk, D), _rand(B, Hkv, Sk, Dv)
    api, _ = _materialize(name, q, k)
    call = validate_attention(q, k, v, **api)
    _assert_backward_matches_autograd(call, _rand(B, Hq, Sq, Dv))


@pytest.mark.parametrize("options", [
    {"causal": True, "window": (2, None), "dropout_p": 0.3, "dropout_seed": 9, "softcap": 2.0},
    {"alibi_slopes": "per_sequence", "sinks": True, "causal": True, "causal_alignment": "top_left"},
], ids=["causal_window_dropout_softcap", "alibi_sinks"])  # fmt: skip
def test_backward_given_out_and_lse_matches_autograd_varlen(options):
    torch.manual_seed(4)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    options = dict(options)
    if options.get("alibi_slopes") == "per_sequence":
        options["alibi_slopes"] = torch.rand(3, 4, dtype=F64)
    if options.pop("sinks", False):
        options["sinks"] = _rand(4)
    q, k, v = _rand(7, 4, 5), _rand(11, 2, 5), _rand(11, 2, 3)
    call = validate_varlen(q, k, v, cu_q, cu_k, 4, 5, **options)
    _assert_backward_matches_autograd(call, _rand(7, 4, 3))


def test_backward_given_out_and_lse_matches_autograd_paged():
    torch.manual_seed(5)
    (q, key_cache, value_cache), paged = paged_case((2, 3), (5, 9), block_size=4, head_dim=5, dtype=F64)
    call = validate_paged(q, key_cache, value_cache, **paged, causal=True, sinks=_rand(4), alibi_slopes=torch.rand(4))
    _assert_backward_matches_autograd(call, _rand(5, 4, 5))


def test_backward_given_out_and_lse_matches_autograd_quantized_kv():
    # 8-bit K/V: dq (the gradient a quantized cache lets through) from the dequantized keys.
    torch.manual_seed(7)
    q = _rand(2, 4, 5, 8)
    (k, k_descale), (v, v_descale) = (fusedattn.quantize_kv(_rand(2, 2, 6, 8), torch.int8) for _ in range(2))
    call = validate_attention(q, k, v, k_descale=k_descale, v_descale=v_descale, causal=True, softcap=2.0)
    grad_out = _rand(2, 4, 5, 8)
    out, lse, (dq, _, _) = reference.reference_attention(call, F64, grad_out)
    got_dq = reference.backward(call, grad_out, out, lse)[0]
    torch.testing.assert_close(got_dq, dq, rtol=1e-9, atol=1e-11)


def test_backward_of_blocks_given_the_merged_out_and_lse_sums_to_the_whole():
    """Key blocks of one sequence, each handed the whole call's out and lse, give the whole
    call's dq (summed) and dk, dv (their columns): what ring attention's backward relies on."""
    torch.manual_seed(6)
    B, Hq, Hkv, S, D, Dv = 2, 4, 2, 12, 5, 3
    q, k, v = _rand(B, Hq, S, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, Dv)
    rules = {"causal": True, "window": (7, None), "softcap": 2.5, "alibi_slopes": torch.rand(Hq, dtype=F64),
             "dropout_p": 0.25, "dropout_seed": 11}  # fmt: skip
    sinks = _rand(Hq)
    whole = validate_attention(q, k, v, sinks=sinks, causal_alignment="top_left", **rules)
    grad_out = _rand(B, Hq, S, Dv)
    out, lse, (dq, dk, dv, dsinks) = reference.reference_attention(whole, F64, grad_out, ("sinks",))
    block_dq = torch.zeros_like(dq)
    for rows in ((0, 5), (5, 12)):
        for keys in ((0, 4), (4, 9), (9, 12)):
            block = validate_attention(
                q[:, :, rows[0] : rows[1]], k[:, :, keys[0] : keys[1]], v[:, :, keys[0] : keys[1]],
                causal_alignment="top_left", query_start=rows[0], key_start=keys[0], **rules,
            )  # fmt: skip
            rows_out, rows_lse, rows_grad = (t[:, :, rows[0] : rows[1]] for t in (out, lse, grad_out))
            got_dq, got_dk, got_dv = reference.backward(block, rows_grad, rows_out, rows_lse)
            block_dq[:, :, rows[0] : rows[1]] += got_dq
            dk[:, :, keys[0] : keys[1]] -= got_dk
            dv[:, :, keys[0] : keys[1]] -= got_dv
    torch.testing.assert_close(block_dq, dq, rtol=1e-9, atol=1e-11)
    # Each key column received every row block's part: nothing is left.
    torch.testing.assert_close(dk, torch.zeros_like(dk), rtol=0, atol=1e-11)
    torch.testing.assert_close(dv, torch.zeros_like(dv), rtol=0, atol=1e-11)
    assert dsinks.abs().sum() > 0


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = (_rand(1, 2, 3, 4).requires_grad_() for _ in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = fusedattn.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isinf(lse[:, :, 1]).all() and (lse[:, :, 1] < 0).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_special_values(dtype):
    from special_values import assert_hidden_nan_row_has_zero_gradient, assert_minus_infinite_scores_mask_the_row

    assert_hidden_nan_row_has_zero_gradient("reference", "cpu", dtype)
    assert_minus_infinite_scores_mask_the_row("reference", "cpu", dtype)


def test_feature_cases_cover_every_feature():
    # Every option feature has a case in the shared table; the rest come from the inputs.
    q, k = torch.randn(2, 4, 9, 8, dtype=F64), torch.randn(2, 2, 11, 8, dtype=F64)
    covered = set()
    for name in FEATURE_CASES:
        covered |= validate_attention(q, k, k, **feature_case(name, q, k)).features()
    assert covered | SHAPE_FEATURES == set(semantics.FEATURES)
    assert not SHAPE_FEATURES & {f for name in FEATURE_CASES for f in FEATURE_CASES[name]}
