"""torch.compile(fullgraph=True) of tiny models running attn_implementation="fusedattn".

fullgraph=True turns any graph break into an error, so passing means the whole model,
mask builder and fusedattn's custom ops included, is one graph. The models run on CUDA
when it is present (the device check runs this file there) and on the CPU otherwise.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedattn.integrations import transformers as fused_hf  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)  # fmt: skip


def _model(architecture: str = "llama") -> torch.nn.Module:
    """A tiny float32 model with random weights on DEVICE, running "fusedattn"."""
    fused_hf.register()
    if architecture == "llama":
        config = transformers.LlamaConfig(**COMMON)
    elif architecture == "mistral":
        config = transformers.MistralConfig(**COMMON, sliding_window=4)
    else:
        config = transformers.Gemma2Config(**COMMON, sliding_window=4, head_dim=8, attn_logit_softcapping=2.0,
                                           query_pre_attn_scalar=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fusedattn")
    return model.to(DEVICE)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, 8) and a left-padded attention mask (2, 8): the traced mask builder passes
    fusedattn a (B, Sk) key mask."""
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


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


def test_inductor_compiled_llama_matches_eager():
    # torch.compile's default backend, what users run.
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
    # read the mask function's closure while tracing), where eager runs take the window:
    # the two paths must agree.
    model = _model(architecture).eval()
    ids, mask = _batch()

    def logits_of(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(logits_of, fullgraph=True, backend="aot_eager")(ids, mask)
        expected = logits_of(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(compiled[real], expected[real], atol=1e-5, rtol=1e-5)
