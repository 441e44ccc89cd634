"""Greedy generation of a tiny Llama (random weights, seeded; nothing downloaded) with an
8-bit KV cache (fusedattn.integrations.transformers_cache.QuantizedKVCache, float8_e4m3fn and
int8) against the same model with transformers' bf16 DynamicCache; both run
attn_implementation="fusedattn" in bfloat16 on the CPU, so only the cache differs.

Reported per 8-bit dtype:
  * free_running: tokens equal position by position after the prompt, and the first
    position where the two greedy sequences part (after that the contexts differ);
  * teacher_forced: the 8-bit cache decodes the bf16 run's own tokens one step at a time,
    and its argmax is compared with the bf16 run's next token at every step (agreement
    without the cascade that one flip starts in free running), also at the steps where
    the bf16 run's top-2 logit margin is a clear one; and the logits' error.
And, as the noise floor, the same two numbers for a float32 model with a float32 cache
against the bf16 run.

    .venv/bin/python benchmarks/results/cpu-2026-12-06-issue18/transformers_8bit_generation.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers
from fusedattn.integrations import transformers as fused_hf
from fusedattn.integrations.transformers_cache import QuantizedKVCache
from transformers import DynamicCache

CONFIG = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
    eos_token_id=None,
)  # fmt: skip


def model(dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    built = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**CONFIG), attn_implementation="fusedattn", dtype=torch.float32
    )
    return built.to(dtype).eval()


def greedy(network, prompts: torch.Tensor, new_tokens: int, cache) -> torch.Tensor:
    out = network.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=cache,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, prompts.shape[1] :]


@torch.no_grad()
def teacher_forced(network, prompts: torch.Tensor, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Float32 logits (B, steps, vocab) after the prompt, then after each of tokens[:, :-1],
    decoding one token a step."""
    logits = [network(input_ids=prompts, past_key_values=cache, use_cache=True).logits[:, -1]]
    for step in range(tokens.shape[1] - 1):
        logits.append(
            network(input_ids=tokens[:, step : step + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        )
    return torch.stack(logits, 1).float()


def first_differences(equal: torch.Tensor) -> list[int]:
    return [int(row.logical_not().nonzero()[0]) if not bool(row.all()) else int(row.numel()) for row in equal]


def free_running(expected: torch.Tensor, got: torch.Tensor) -> dict:
    equal = expected == got
    return {"agreement": float(equal.float().mean()), "first_difference_per_prompt": first_differences(equal)}


def forced(expected_tokens: torch.Tensor, expected_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Each step's argmax against the bf16 run's token; the logits' error in units of the
    bf16 logits' standard deviation; and the agreement at steps where the bf16 run's top-2
    margin is at least 0.1 of that deviation (clear choices)."""
    equal = logits.argmax(-1) == expected_tokens
    spread = float(expected_logits.std())
    top2 = expected_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) >= 0.1 * spread
    return {
        "agreement": float(equal.float().mean()),
        "agreement_at_clear_steps": float(equal[clear].float().mean()),
        "clear_steps": int(clear.sum()),
        "mean_abs_logit_error_over_std": float((logits - expected_logits).abs().mean()) / spread,
        "max_abs_logit_error_over_std": float((logits - expected_logits).abs().max()) / spread,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    fused_hf.register()
    prompts = torch.randint(3, CONFIG["vocab_size"], (args.prompts, args.prompt_length),
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    bf16 = model(torch.bfloat16)
    baseline = greedy(bf16, prompts, args.new_tokens, DynamicCache(config=bf16.config))
    report = {"config": CONFIG, "prompts": args.prompts, "prompt_length": args.prompt_length,
              "new_tokens": args.new_tokens, "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    reference_logits = teacher_forced(bf16, prompts, baseline, DynamicCache(config=bf16.config))
    # The bf16 run decoding its own tokens again: its argmax must be its tokens (a check of the method).
    report["bf16_teacher_forced_reproduces_generate"] = bool(torch.equal(reference_logits.argmax(-1), baseline))
    runs = [(name, bf16, lambda kv_dtype=kv_dtype: QuantizedKVCache(bf16.config, kv_dtype))
            for name, kv_dtype in (("float8_e4m3fn", torch.float8_e4m3fn), ("int8", torch.int8))]  # fmt: skip
    fp32 = model(torch.float32)
    runs.append(("float32_model_and_cache", fp32, lambda: DynamicCache(config=fp32.config)))
    for name, network, make_cache in runs:
        report[name] = {
            "free_running": free_running(baseline, greedy(network, prompts, args.new_tokens, make_cache())),
            "teacher_forced": forced(baseline, reference_logits, teacher_forced(network, prompts, baseline, make_cache())),
        }  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
