"""fusedattn.nn.MultiheadAttention and swap_modules against torch.nn.MultiheadAttention."""

from __future__ import annotations

import itertools
import pathlib
import re

import pytest
import torch
from fusedattn import nn as fused_nn
from fusedattn.nn import multihead_attention

EMBED, HEADS, BATCH, TARGET, SOURCE = 8, 2, 3, 4, 5


def _pair(dtype=torch.float64, **kwargs):
    """A torch MHA and a fusedattn MHA with the same weights (loaded through state_dict)."""
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    fused = fused_nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _inputs(batch_first, kdim=EMBED, vdim=EMBED, dtype=torch.float64, batched=True):
    def make(length, features):
        if not batched:
            return torch.randn(length, features, dtype=dtype)
        shape = (BATCH, length, features) if batch_first else (length, BATCH, features)
        return torch.randn(shape, dtype=dtype)

    return make(TARGET, EMBED), make(SOURCE, kdim), make(SOURCE, vdim)


def _masks(dtype=torch.float64):
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[0, 2:4] = True
    padding[2, :2] = True
    blocked = torch.rand(TARGET, SOURCE) > 0.6
    blocked[:, 4] = False  # every query keeps a key: torch gives NaN on fully masked rows
    causal = torch.nn.Transformer.generate_square_subsequent_mask(TARGET, dtype=dtype)
    return {
        "none": {},
        "padding_bool": dict(key_padding_mask=padding),
        "padding_float": dict(key_padding_mask=torch.randn(BATCH, SOURCE, dtype=dtype)),
        "mask_bool_2d": dict(attn_mask=blocked),
        "mask_float_2d": dict(attn_mask=torch.randn(TARGET, SOURCE, dtype=dtype)),
        "mask_bool_3d": dict(attn_mask=torch.rand(BATCH * HEADS, TARGET, SOURCE) > 0.9),
        "mask_float_3d": dict(attn_mask=torch.randn(BATCH * HEADS, TARGET, SOURCE, dtype=dtype)),
        "both_bool": dict(attn_mask=blocked, key_padding_mask=padding),
        "bool_and_float": dict(attn_mask=torch.randn(TARGET, SOURCE, dtype=dtype), key_padding_mask=padding),
        "causal_hint": dict(attn_mask=causal[:, :TARGET], is_causal=True, self_attention=True),
    }


MODULE_OPTIONS = {
    "plain": {},
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "kdim_vdim": dict(kdim=6, vdim=5),
    "no_bias": dict(bias=False),
    "all": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5),
}


# Every (module options, masks) pair, but self-attention (the causal hint) only where
# kdim == vdim == embed_dim allows it.
MODULE_AND_MASKS = [
    pytest.param(MODULE_OPTIONS[module_name], mask_name, id=f"{module_name}-{mask_name}")
    for module_name, mask_name in itertools.product(MODULE_OPTIONS, _masks())
    if not ("kdim" in MODULE_OPTIONS[module_name] and _masks()[mask_name].get("self_attention"))
]


@pytest.mark.parametrize("module_options, mask_name", MODULE_AND_MASKS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_torch_outputs_and_weights(module_options, mask_name, batch_first):
    reference, fused = _pair(batch_first=batch_first, **module_options)
    query, key, value = _inputs(batch_first, module_options.get("kdim", EMBED), module_options.get("vdim", EMBED))
    masks = dict(_masks()[mask_name])
    if masks.pop("self_attention", False):
        query, _, _ = _inputs(batch_first)
        key = value = query
    for need_weights, average in itertools.product([True, False], [True, False]):
        expected = reference(query, key, value, need_weights=need_weights, average_attn_weights=average, **masks)
        got = fused(query, key, value, need_weights=need_weights, average_attn_weights=average, **masks)
        torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
        if need_weights:
            torch.testing.assert_close(got[1], expected[1], atol=1e-10, rtol=1e-10)
        else:
            assert got[1] is None


def test_unbatched_inputs():
    reference, fused = _pair()
    query, key, value = _inputs(False, batched=False)
    padding = torch.tensor([False, False, True, False, True])
    for masks in ({}, dict(key_padding_mask=padding), dict(attn_mask=torch.randn(TARGET, SOURCE, dtype=torch.float64))):
        expected = reference(query, key, value, **masks)
        got = fused(query, key, value, **masks)
        torch.testing.assert_close(got[0], expected[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], expected[1], atol=1e-10, rtol=1e-10)


def test_float32_and_gradients_match_torch():
    reference, fused = _pair(dtype=torch.float32, batch_first=True, add_bias_kv=True)
    query, key, value = _inputs(True, dtype=torch.float32)
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[1, 2:] = True
    expected = reference(query, key, value, key_padding_mask=padding, need_weights=False)[0]
    got = fused(query, key, value, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(fused_parameters[name].grad, parameter.grad, atol=1e-5, rtol=1e-4)


def test_same_constructor_state_dict_and_attributes():
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, 0.1, True, True, True, 6, 5, True)
    fused = fused_nn.MultiheadAttention(EMBED, HEADS, 0.1, True, True, True, 6, 5, True)
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert isinstance(fused, torch.nn.MultiheadAttention)
    for attribute in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
                      "_qkv_same_embed_dim", "add_zero_attn"):  # fmt: skip
        assert getattr(fused, attribute) == getattr(reference, attribute), attribute
    fused.load_state_dict(reference.state_dict())  # strict: same keys and shapes


def test_fully_masked_query_gives_zero_not_nan():
    _, fused = _pair(batch_first=True, bias=False)
    query, key, value = _inputs(True)
    blocked = torch.zeros(TARGET, SOURCE, dtype=torch.bool)
    blocked[1] = True
    out, weights = fused(query, key, value, attn_mask=blocked)
    assert not out.isnan().any() and not weights.isnan().any()
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))  # no bias: the out-projection of 0 is 0


def test_is_causal_needs_attn_mask_as_in_torch():
    _, fused = _pair()
    query, key, value = _inputs(False)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        fused(query, key, value, is_causal=True)


def test_dropout_weights_describe_the_output_and_are_reproducible():
    _, fused = _pair(dropout=0.5, batch_first=True, bias=False)
    fused.train()
    query, key, value = _inputs(True)
    torch.manual_seed(1)
    out, weights = fused(query, key, value, average_attn_weights=False)
    zeros = (weights == 0).float().mean()
    assert 0.2 < zeros < 0.8
    # The returned weights are the ones the kernel used: out = out_proj(weights @ V).
    v = torch.nn.functional.linear(value, fused.in_proj_weight[2 * EMBED :])
    v = v.view(BATCH, SOURCE, HEADS, EMBED // HEADS).transpose(1, 2)
    mixed = (weights @ v).transpose(1, 2).reshape(BATCH, TARGET, EMBED)
    torch.testing.assert_close(out, fused.out_proj(mixed), atol=1e-10, rtol=1e-10)
    torch.manual_seed(1)
    torch.testing.assert_close(fused(query, key, value, average_attn_weights=False)[0], out, atol=0, rtol=0)
    fused.eval()
    evaluated = fused(query, key, value, need_weights=False)[0]
    reference = torch.nn.MultiheadAttention(
        EMBED, HEADS, dropout=0.5, batch_first=True, bias=False, dtype=torch.float64
    )
    reference.load_state_dict(fused.state_dict())
    torch.testing.assert_close(evaluated, reference.eval()(query, key, value, need_weights=False)[0])


def _spy_calls(monkeypatch):
    calls = []
    original = multihead_attention.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(multihead_attention, "attention", spy)
    return calls


def _layers(layer_type, **kwargs):
    torch.manual_seed(0)
    reference = layer_type(d_model=EMBED, nhead=HEADS, dim_feedforward=16, dropout=0.0, dtype=torch.float64, **kwargs)
    torch.manual_seed(0)
    fused = layer_type(d_model=EMBED, nhead=HEADS, dim_feedforward=16, dropout=0.0, dtype=torch.float64, **kwargs)
    fused_nn.swap_modules(fused)
    return reference, fused


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_inside_transformer_encoder_layer(monkeypatch, training, batch_first):
    reference, fused = _layers(torch.nn.TransformerEncoderLayer, batch_first=batch_first)
    reference.train(training)
    fused.train(training)
    calls = _spy_calls(monkeypatch)
    source, _, _ = _inputs(batch_first)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[0, 2:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(TARGET, dtype=torch.float64)
    for masks in ({}, dict(src_key_padding_mask=padding), dict(src_mask=causal, is_causal=True)):
        with torch.set_grad_enabled(training):
            expected = reference(source, **masks)
            got = fused(source, **masks)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    # torch's inference fast path (which never calls self_attn) must not have taken over.
    assert len(calls) == 3


def test_inside_transformer_encoder_with_nested_fast_path(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(EMBED, HEADS, 16, dropout=0.0, batch_first=True, dtype=torch.float64)
    reference = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    fused = fused_nn.swap_modules(torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval())
    fused.load_state_dict(reference.state_dict())
    calls = _spy_calls(monkeypatch)
    source, _, _ = _inputs(True)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[0, 2:] = True
    padding[1, 3:] = True
    with torch.no_grad():
        expected = reference(source, src_key_padding_mask=padding)
        got = fused(source, src_key_padding_mask=padding)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert len(calls) == 2 and calls[0]["key_lengths"].tolist() == [2, 3, 4]


@pytest.mark.parametrize("training", [False, True])
def test_inside_transformer_decoder_layer(monkeypatch, training):
    reference, fused = _layers(torch.nn.TransformerDecoderLayer, batch_first=True)
    reference.train(training)
    fused.train(training)
    calls = _spy_calls(monkeypatch)
    target, memory, _ = _inputs(True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(TARGET, dtype=torch.float64)
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[2, 1:] = True
    with torch.set_grad_enabled(training):
        expected = reference(target, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
        got = fused(target, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert len(calls) == 2  # self-attention and cross-attention
    assert calls[0]["causal"] is True and calls[0]["attn_mask"] is None  # the is_causal hint was used


def test_swap_modules_replaces_every_mha_and_keeps_parameters():
    model = torch.nn.Transformer(d_model=EMBED, nhead=HEADS, num_encoder_layers=2, num_decoder_layers=1,
                                 dim_feedforward=16, dropout=0.0, batch_first=True, dtype=torch.float64)  # fmt: skip
    parameters_before = {name: p for name, p in model.named_parameters()}
    source, target, _ = _inputs(True)
    with torch.no_grad():
        expected = model(source, target)
    returned = fused_nn.swap_modules(model)
    assert returned is model
    attention_modules = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attention_modules) == 4
    assert all(type(m) is fused_nn.MultiheadAttention for m in attention_modules)
    assert all(parameters_before[name] is p for name, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(source, target), expected, atol=1e-10, rtol=1e-10)
    fused_nn.swap_modules(model)  # idempotent
    assert all(len(m._forward_pre_hooks) == 1 for m in attention_modules)


def test_swapped_encoder_layer_compiles_without_graph_breaks():
    _, fused = _layers(torch.nn.TransformerEncoderLayer, batch_first=True)
    source, _, _ = _inputs(True)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[1, 2:] = True
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, mask: fused(x, src_key_padding_mask=mask), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(source, padding), fused(source, src_key_padding_mask=padding))


# ---- README ------------------------------------------------------------------------
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
SWAP_IN = re.compile(r"<!-- section:swap-in:start -->(.*?)<!-- section:swap-in:end -->", re.S)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _swap_in_snippets() -> tuple[str, list[str]]:
    """The python blocks of README.md's swap-in section (docs/swap-in.md until it is pasted)."""
    section = SWAP_IN.search((REPOSITORY / "README.md").read_text())
    blocks = PYTHON_BLOCK.findall(section.group(1)) if section else []
    if blocks:
        return "README.md", blocks
    return "docs/swap-in.md", PYTHON_BLOCK.findall((REPOSITORY / "docs" / "swap-in.md").read_text())


def test_swap_in_snippets_run():
    pytest.importorskip("transformers")
    source, blocks = _swap_in_snippets()
    assert len(blocks) == 4, f"{source}: expected one snippet per route, found {len(blocks)}"
    torch._dynamo.reset()
    for index, block in enumerate(blocks):
        exec(compile(block, f"{source} swap-in snippet {index + 1}", "exec"), {"__name__": "__snippet__"})
