"""`fusedattn bench models`: whole transformers models, built from their configs (no weights
to download), with attn_implementation set to fusedattn, sdpa and eager in one run.

Per (model, context, implementation) it measures a prefill of `context` tokens (tokens/s,
and the peak memory that call adds) and then `decode_steps` greedy decode steps over the
filled cache (tokens/s). The models are small but shaped like the real ones (grouped-query
heads, head dims, Gemma 2's sliding windows and logit softcap); a model's layers share one
attention shape, so a few layers show what a deep one does per layer.

Every implementation runs the same weights (one seed per model) on the same input ids;
fusedattn's last-token logits after the prefill are compared with sdpa's, or eager's where
transformers has no sdpa path for the model (a wrong fast run is flagged, not counted).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .measure import is_out_of_memory, measure_peak_memory, release_memory

IMPLEMENTATIONS = ("fusedattn", "sdpa", "eager")


@dataclass(frozen=True)
class ModelShape:
    """A transformers config, sized down in depth only."""

    name: str
    config_class: str
    options: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # Llama 3.2 1B's attention (hidden 2048, 32 query heads over 8, d64), 4 layers.
        ModelShape("llama", "LlamaConfig", dict(hidden_size=2048, intermediate_size=4096, num_attention_heads=32,
                                                 num_key_value_heads=8, num_hidden_layers=4)),
        # Qwen2.5 0.5B's attention (hidden 896, 14 query heads over 2, d64), 4 layers.
        ModelShape("qwen", "Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                                num_key_value_heads=2, num_hidden_layers=4)),
        # Gemma 2 2B's attention (8 query heads over 4, d256, a sliding window on every other
        # layer, logit softcap 50), hidden 1024, 4 layers; the window is 1024 (Gemma 2's is
        # 4096) so that contexts of 2k show it.
        ModelShape("gemma", "Gemma2Config", dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                                                  num_key_value_heads=4, head_dim=256, num_hidden_layers=4,
                                                  sliding_window=1024, attn_logit_softcapping=50.0)),
    )
}  # fmt: skip

# A vocabulary large enough for random ids, small enough that the embedding and the LM
# head (not attention) do not dominate the time.
_VOCABULARY = 8192


def build_model(shape: ModelShape, implementation: str, dtype: torch.dtype, context: int) -> Any:
    import transformers

    config_class = getattr(transformers, shape.config_class)
    config = config_class(
        vocab_size=_VOCABULARY, max_position_embeddings=max(context * 2, 4096), **shape.options
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights for every implementation
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.to(dtype).eval()


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_model(
    shape: ModelShape,
    implementation: str,
    context: int,
    dtype: torch.dtype,
    decode_steps: int,
    repeats: int,
    reference_logits: torch.Tensor | None,
) -> dict[str, Any]:
    """One result: prefill and decode tokens/s, the prefill's peak memory, and the check."""
    result: dict[str, Any] = {
        "model": shape.name, "implementation": implementation, "context": context,
        "dtype": str(dtype).removeprefix("torch."), "status": "ok", "reason": "", "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None, "prefill_peak_memory_bytes": None, "max_logit_difference": None,
    }  # fmt: skip
    try:
        if implementation == "fusedattn":
            from ..integrations import transformers as fusedattn_transformers

            fusedattn_transformers.register()
        model = build_model(shape, implementation, dtype, context)
        ids = torch.randint(0, _VOCABULARY, (1, context), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():

            def prefill():
                return model(ids, use_cache=True)

            output = prefill()  # warm-up
            result["prefill_tokens_per_s"] = context / _median_seconds(prefill, repeats)
            peak, _ = measure_peak_memory(prefill, torch.device("cpu"))
            result["prefill_peak_memory_bytes"] = peak
            logits = output.logits[0, -1].float()
            result["last_logits"] = logits
            if reference_logits is not None:
                difference = float((logits - reference_logits).abs().max())
                result["max_logit_difference"] = difference
                scale = float(reference_logits.abs().max())
                if not difference <= 2e-2 * max(1.0, scale):  # NaN fails too
                    result["status"] = "wrong"
                    result["reason"] = f"last-token logits differ from the reference's by {difference:.3g}"

            first_token = output.logits[:, -1:].argmax(-1)

            def decode(cache):
                token = first_token
                for _ in range(decode_steps):
                    step = model(token, past_key_values=cache, use_cache=True)
                    cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

            # Each run decodes from its own copy of the prefilled cache (a cache grows in
            # place); the copy is made outside the timed region.
            times = []
            for _ in range(repeats):
                cache = copy.deepcopy(output.past_key_values)
                start = time.perf_counter()
                decode(cache)
                times.append(time.perf_counter() - start)
            result["decode_tokens_per_s"] = decode_steps / statistics.median(times)
    except Exception as error:  # noqa: BLE001  (a run that fails is reported, never fatal)
        result["status"] = "oom" if is_out_of_memory(error) else "error"
        result["reason"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
    finally:
        release_memory(torch.device("cpu"))
    return result


def run_models(
    models: list[str | ModelShape], contexts: list[int], dtype: torch.dtype, decode_steps: int = 16, repeats: int = 3
) -> list[dict[str, Any]]:
    """Every (model, context, implementation), sdpa first (the reference of the check).
    models: names of MODELS, or shapes of one's own."""
    results = []
    for model in models:
        shape = MODELS[model] if isinstance(model, str) else model
        for context in contexts:
            # The check's reference: sdpa's logits, or eager's where transformers offers no
            # sdpa path for the model (Gemma 2: its logit softcap).
            reference = None
            for implementation in ("sdpa", "eager", "fusedattn"):
                check_against = reference if implementation == "fusedattn" else None
                result = measure_model(shape, implementation, context, dtype, decode_steps, repeats, check_against)
                logits = result.pop("last_logits", None)
                if reference is None and result["status"] == "ok" and implementation != "fusedattn":
                    reference = logits
                    result["reference_of_the_check"] = True
                results.append(result)
    for result in results:
        for baseline_name in ("sdpa", "eager"):
            baseline = next(
                (r for r in results if (r["model"], r["context"], r["implementation"]) ==
                 (result["model"], result["context"], baseline_name)), None,
            )  # fmt: skip
            for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                ratio = None
                if result["status"] == "ok" and baseline and baseline[metric] and result[metric]:
                    ratio = result[metric] / baseline[metric]
                result[metric.replace("tokens_per_s", f"vs_{baseline_name}")] = ratio
    return results


def format_models_table(results: list[dict[str, Any]]) -> str:
    header = ("model", "context", "implementation", "status", "prefill tok/s", "vs sdpa", "vs eager", "decode tok/s",
              "vs sdpa", "vs eager", "peak MiB")  # fmt: skip
    rows = [header]
    for r in results:

        def number(value, digits=0):
            return "-" if value is None else f"{value:,.{digits}f}"

        rows.append((
            r["model"], str(r["context"]), r["implementation"], r["status"], number(r["prefill_tokens_per_s"]),
            number(r["prefill_vs_sdpa"], 2), number(r["prefill_vs_eager"], 2), number(r["decode_tokens_per_s"], 1),
            number(r["decode_vs_sdpa"], 2), number(r["decode_vs_eager"], 2),
            number(None if r["prefill_peak_memory_bytes"] is None else r["prefill_peak_memory_bytes"] / 2**20, 1),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
