"""attn_implementation="fusedattn" in Hugging Face transformers, against "eager".

Tiny models built from configs with random weights (nothing is downloaded), float32.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedattn.integrations import transformers as fused_hf  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

VOCAB = 61
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "llama": transformers.LlamaConfig(**COMMON),
        "mistral_sliding_window": transformers.MistralConfig(**COMMON, sliding_window=4),
        "gemma2_softcap": transformers.Gemma2Config(
            **COMMON, head_dim=8, sliding_window=4, attn_logit_softcapping=2.0, query_pre_attn_scalar=8
        ),
        "qwen2": transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),  # fmt: skip
        "phi3": transformers.Phi3Config(**COMMON),
        "qwen3": transformers.Qwen3Config(**COMMON, head_dim=8),
        "starcoder2_sliding_window": transformers.Starcoder2Config(**COMMON, sliding_window=4),
        "gemma3_text": transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
        "olmo2": transformers.Olmo2Config(**COMMON),
        # Gemma 4: head dim 8 in its sliding layers, 512 in its global one.
        "gemma4_global_512": transformers.Gemma4TextConfig(
            **COMMON,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            per_layer_config={"01": {"head_dim": 512}},
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
        ),  # fmt: skip
        # DeepSeek-V3's multi-head latent attention: D 192 (128 + 64 rotary) for q/k, Dv 128.
        "deepseek_v3_mla": transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=16,
        ),  # fmt: skip
        # Attention sinks (s_aux), alternating sliding and full layers, a mixture of experts.
        "gpt_oss_sinks": transformers.GptOssConfig(
            **COMMON,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
        ),  # fmt: skip
    }


ARCHITECTURES = list(_configs())


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fused_hf.register()


def _config(name: str, **overrides) -> transformers.PretrainedConfig:
    config = _configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _models(name: str, **overrides):
    """(eager, fused): the same weights, each model with a config of its own (from_config
    keeps the config object, and attn_implementation is stored in it: a shared config would
    make the "eager" model run fusedattn too)."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_config(name, **overrides), attn_implementation="eager",
                                             dtype=torch.float32)  # fmt: skip
    fused = AutoModelForCausalLM.from_config(_config(name, **overrides), attn_implementation="fusedattn",
                                             dtype=torch.float32)  # fmt: skip
    fused.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and fused.config._attn_implementation == "fusedattn"
    return eager.eval(), fused.eval()


def _batch(padding_side: str = "left"):
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    if padding_side == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    else:
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every fusedattn.attention call the integration makes."""
    recorded = []
    original = fused_hf.attention

    def spy(q, k, v, **kwargs):
        recorded.append(dict(kwargs, heads=(q.shape[1], k.shape[1])))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fused_hf, "attention", spy)
    return recorded


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_generation_and_gradients_match_eager(name, calls):
    eager, fused = _models(name)
    # Left padding (what generation uses): logits at real tokens.
    ids, mask = _batch("left")
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        got = fused(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert calls  # the model really ran on fusedattn
    # GQA: K/V never repeated (DeepSeek's MLA has one key per query head).
    assert all(call["heads"] == (4, 2) for call in calls if name not in ("gpt2", "deepseek_v3_mla"))
    if name == "gpt_oss_sinks":
        assert all(call.get("sinks") is not None for call in calls)  # s_aux reached the kernel
    # Greedy generation with a KV cache gives the same tokens.
    generated = fused.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = eager.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, reference)
    # One training step (right padding, as in training): loss and every gradient match.
    ids, mask = _batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    eager.train()
    fused.train()
    eager(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    fused(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    fused_parameters = dict(fused.named_parameters())
    for parameter_name, parameter in eager.named_parameters():
        if parameter.grad is None:
            continue
        if parameter_name.endswith("sinks"):  # learned sinks get a real gradient
            assert parameter.grad.abs().sum() > 0 and fused_parameters[parameter_name].grad is not None
        torch.testing.assert_close(fused_parameters[parameter_name].grad, parameter.grad, atol=1e-4, rtol=1e-3)


def test_padding_becomes_key_lengths_or_a_key_mask(calls):
    _, fused = _models("llama")
    with torch.no_grad():
        fused(*_batch("right"))
        right_padded = calls[-1]
        fused(*_batch("left"))
        left_padded = calls[-1]
        fused(input_ids=torch.randint(3, VOCAB, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
        unpadded = calls[-1]
    assert right_padded["key_lengths"].tolist() == [10, 7, 4] and "attn_mask" not in right_padded
    assert right_padded["causal"] is True
    # Left padding: a (B, 1, 1, Sk) bool view, True = attend; never a dense (Sq, Sk) mask.
    mask = left_padded["attn_mask"]
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 1, 10)
    assert mask[2, 0, 0].tolist() == [False] * 6 + [True] * 4
    assert "attn_mask" not in unpadded and "key_lengths" not in unpadded


@pytest.mark.parametrize("name", ["mistral_sliding_window", "gemma2_softcap"])
def test_sliding_window_and_softcap_reach_the_kernel(name, calls):
    _, fused = _models(name)
    ids, mask = _batch("right")
    with torch.no_grad():
        windowed = fused(input_ids=ids, attention_mask=mask).logits
    windows = {call["window"] for call in calls}
    assert (3, None) in windows  # sliding_window 4: the query and 3 keys before it
    if name == "gemma2_softcap":
        assert {call["softcap"] for call in calls} == {2.0}
        assert None in windows  # Gemma 2 alternates sliding and global layers
    else:
        # Without the window the logits differ: the window matters at this length (10 > 4).
        _, unwindowed = _models(name, sliding_window=None, layer_types=None)
        with torch.no_grad():
            assert not torch.allclose(unwindowed(input_ids=ids, attention_mask=mask).logits, windowed)


def test_packed_sequences_fall_back_to_the_dense_mask(calls):
    eager, fused = _models("llama")
    ids = torch.randint(3, VOCAB, (1, 9))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three documents in one row
    # transformers detects packed documents from position_ids only without a KV cache.
    packed = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    with torch.no_grad():
        expected = eager(**packed).logits
        got = fused(**packed).logits
        one_document = eager(input_ids=ids, position_ids=position_ids, use_cache=True).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, one_document, atol=1e-3)  # the documents' mask matters
    assert calls and all(call["attn_mask"].shape == (1, 1, 9, 9) for call in calls)


def test_attention_dropout_in_training():
    eager, fused = _models("llama", attention_dropout=1.0)
    ids, mask = _batch("right")
    eager.train()
    fused.train()
    # p = 1 drops every probability in both implementations: identical, deterministic outputs.
    torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask).logits,
                               eager(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)  # fmt: skip
    _, fused = _models("llama", attention_dropout=0.3)
    fused.train()
    torch.manual_seed(5)
    first = fused(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    again = fused(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(6)
    other = fused(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        evaluation = fused.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, evaluation)


def test_set_attn_implementation_and_from_pretrained(tmp_path, calls):
    eager, _ = _models("qwen3")
    ids, mask = _batch("left")
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
    eager.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fusedattn").eval()
    assert loaded.config._attn_implementation == "fusedattn"
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
    count = len(calls)
    eager.set_attn_implementation("fusedattn")
    with torch.no_grad():
        switched = eager(input_ids=ids, attention_mask=mask).logits
    assert len(calls) > count
    torch.testing.assert_close(switched[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


def test_mask_builder_keeps_unrecognized_patterns_dense():
    from transformers import masking_utils

    padding = torch.tensor([[True, True, False], [True, True, True]])
    chunked = masking_utils.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long))
    dense = fused_hf.fusedattn_mask(2, 3, 3, mask_function=chunked, attention_mask=padding, local_size=2)
    expected = masking_utils.sdpa_mask(
        2, 3, 3, mask_function=chunked, attention_mask=padding, allow_is_causal_skip=False
    )
    assert torch.equal(dense, expected)
    # A static cache: queries are not the last keys, so positions need the dense mask.
    static = fused_hf.fusedattn_mask(2, 2, 8, q_offset=0, kv_offset=0, attention_mask=padding)
    assert static.shape == (2, 1, 2, 8)
    sliding = masking_utils.sliding_window_causal_mask_function(4)
    assert fused_hf.fusedattn_mask(2, 3, 3, mask_function=sliding, attention_mask=padding, local_size=4).tolist() == [
        2,
        3,
    ]
    assert fused_hf.fusedattn_mask(2, 3, 3, mask_function=sliding, attention_mask=padding, local_size=5).dim() == 4


def test_padding_free_packed_batches_use_one_varlen_call():
    # DataCollatorWithFlattening passes cu_seq_lens_* / max_length_* for a batch of one row.
    module = torch.nn.Module()
    module.is_causal = True
    query, key, value = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed, _ = fused_hf.fusedattn_attention_forward(
        module, query, key, value, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5
    )
    assert packed.shape == (1, 9, 4, 8)
    for start, end in ((0, 4), (4, 9)):
        piece, _ = fused_hf.fusedattn_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None
        )
        torch.testing.assert_close(packed[:, start:end], piece)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bidirectional_encoder_matches_eager(padding_side, calls):
    def config():  # one per model: the attention implementation is stored in the config
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=64)  # fmt: skip

    torch.manual_seed(0)
    eager = transformers.BertModel(config(), add_pooling_layer=False).eval()
    fused = transformers.BertModel(config(), add_pooling_layer=False).eval()
    fused.load_state_dict(eager.state_dict())
    eager.set_attn_implementation("eager")
    fused.set_attn_implementation("fusedattn")
    assert eager.config._attn_implementation == "eager"
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
    assert len(calls) == 2 and all(call["causal"] is False for call in calls)  # the module's is_causal


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8], ids=["float8_e4m3fn", "int8"])
def test_8bit_kv_cache_generates_like_the_bf16_cache(kv_dtype, calls):
    # A tiny bf16 Llama (random weights, seeded) decodes with QuantizedKVCache: the kernels
    # get the 8-bit cache and its scales, never a dequantized copy. Teacher forcing (both
    # caches decode the bf16 run's own tokens) compares each step's argmax without the
    # cascade one flip starts in free running; the threshold is explained in
    # benchmarks/results/cpu-2026-12-06-issue18/transformers_8bit_generation.md.
    from fusedattn import quantize_kv
    from fusedattn.integrations.transformers_cache import QuantizedKVCache
    from transformers import DynamicCache

    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 128, "hidden_size": 64, "initializer_range": 0.1,
                                         "max_position_embeddings": 128})  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fusedattn", dtype=torch.float32)
    model = model.to(torch.bfloat16).eval()
    prompts = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    steps = 24
    bf16_cache = DynamicCache(config=config)
    baseline = model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=bf16_cache,
                              max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)  # fmt: skip
    tokens = baseline[:, prompts.shape[1] :]
    cache = QuantizedKVCache(config, kv_dtype)
    calls.clear()
    choices = []
    with torch.no_grad():
        logits = model(input_ids=prompts, past_key_values=cache, use_cache=True).logits[:, -1]
        choices.append(logits.argmax(-1))
        for step in range(steps - 1):
            logits = model(input_ids=tokens[:, step : step + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            choices.append(logits.argmax(-1))
    agreement = float((torch.stack(choices, 1) == tokens).float().mean())
    assert agreement >= 0.9, agreement
    assert all(call["k_descale"].shape == call["v_descale"].shape for call in calls) and len(calls) == 2 * steps
    # The cache holds 8 bits; layer 0's keys (which depend on the tokens only) are exactly
    # quantize_kv of the bf16 cache's keys for the same tokens.
    layer = cache.layers[0]
    length = prompts.shape[1] + steps - 1
    assert layer.keys.dtype == kv_dtype and cache.get_seq_length() == length
    expected_values, expected_scales = quantize_kv(bf16_cache.layers[0].keys[:, :, :length], kv_dtype)
    assert torch.equal(layer.keys[:, :, :length].float(), expected_values.float())
    assert torch.equal(layer.key_scales[:, :, :length], expected_scales)
    with pytest.raises(ValueError, match="k: an 8-bit key .* without its scales"):
        fused_hf.fusedattn_attention_forward(model.model.layers[0].self_attn, torch.randn(1, 4, 1, 16),
                                             torch.zeros(1, 2, 3, 16, dtype=kv_dtype),
                                             torch.zeros(1, 2, 3, 16, dtype=kv_dtype), None)  # fmt: skip


def test_8bit_kv_cache_batch_operations_move_the_scales_with_the_rows():
    # Beam search reorders the cache, generate repeats or selects batch rows, assisted
    # decoding crops it: each row's scales must follow it (a scale left behind dequantizes
    # another sequence's row).
    from fusedattn import quantize_kv
    from fusedattn.integrations.transformers_cache import QuantizedKVLayer

    def dequantized(cached):
        return cached.float() * getattr(cached, fused_hf.DESCALE_ATTRIBUTE)[..., None]

    states = torch.randn(3, 2, 5, 16) * torch.tensor([1.0, 10.0, 100.0])[:, None, None, None]
    new_token = torch.randn(6, 2, 1, 16)
    layer = QuantizedKVLayer(torch.int8)
    layer.update(states, -states)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.batch_repeat_interleave(3)
    layer.crop(-2)
    keys, values = layer.update(new_token, -new_token)
    kept = torch.cat([states[[2, 1]].repeat_interleave(3, dim=0)[:, :, :3], new_token], dim=2)
    expected, scales = quantize_kv(kept, torch.int8)
    expected = expected.float() * scales[..., None]
    assert layer.get_seq_length() == 4 and keys.shape == (6, 2, 4, 16)
    torch.testing.assert_close(dequantized(keys), expected, atol=0, rtol=0)
    torch.testing.assert_close(dequantized(values), -expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(3)
