"""torch.compile(fullgraph=True) of a tiny Llama running attn_implementation="fusedattn".

fullgraph=True turns any graph break into an error, so passing means the whole model,
mask builder and fusedattn's custom ops included, is one graph.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedattn.integrations import transformers as fused_hf  # noqa: E402


def _model():
    fused_hf.register()
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fusedattn")


def _batch():
    ids = torch.randint(3, 61, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the traced mask builder passes a (B, Sk) key mask
    return ids, mask


def test_compiled_llama_forward_and_backward_match_eager():
    # aot_eager traces the forward and the backward graph through the custom ops' fake
    # implementations and autograd, without inductor's (slow on CPU) code generation.
    torch._dynamo.reset()
    model = _model().train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_of(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, mask, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = loss_of(ids, mask, labels)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_no_graph_breaks_reported_by_dynamo_explain():
    torch._dynamo.reset()
    model = _model().eval()
    ids, mask = _batch()

    def logits_of(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    explanation = torch._dynamo.explain(logits_of)(ids, mask)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_inductor_compiled_llama_matches_eager():
    torch._dynamo.reset()
    model = _model().eval()
    ids, mask = _batch()

    def logits_of(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    with torch.no_grad():
        compiled = torch.compile(logits_of, fullgraph=True)(ids, mask)
        torch.testing.assert_close(compiled, logits_of(ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["mistral", "gemma2"])
def test_sliding_window_and_softcap_models_compile_without_breaks(architecture):
    # Compiled, sliding-window layers take transformers' dense mask (the mask builder cannot
    # read the mask function's closure while tracing); the result must not change.
    fused_hf.register()
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, sliding_window=4)  # fmt: skip
    if architecture == "mistral":
        config = transformers.MistralConfig(**common)
    else:
        config = transformers.Gemma2Config(**common, head_dim=8, attn_logit_softcapping=2.0, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fusedattn").eval()
    ids, mask = _batch()

    def logits_of(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(logits_of)(ids, mask)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(logits_of, fullgraph=True, backend="aot_eager")(ids, mask)
        expected = logits_of(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(compiled[real], expected[real], atol=1e-5, rtol=1e-5)
