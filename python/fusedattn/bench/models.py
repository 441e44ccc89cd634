"""`fusedattn bench models`: whole transformers models, built from their configs (no weights
to download), with attn_implementation set to fusedattn, sdpa and eager in one run.

Per (model, context, implementation) it measures a prefill of `context` tokens (tokens/s,
and the peak memory that call adds) and then `decode_steps` greedy decode steps over the
filled cache (tokens/s), the three implementations' calls interleaved round by round (every
other round in reverse order; each round's seconds are kept in the results), and
the share of a prefill and of the decode steps spent inside the attention function (what attention alone can gain;
eager's is not measured). Eager is skipped where its materialized weights would exceed
EAGER_WEIGHTS_LIMIT. The models are small but shaped like the real ones (grouped-query
heads, head dims, Gemma 2's sliding windows and logit softcap, Gemma 3's five window layers
to one global); a few layers show what a deep model does per layer.

Every implementation runs the same weights (one seed per model) on the same input ids;
fusedattn's last-token logits after the prefill are compared with sdpa's, or eager's where
transformers has no sdpa path for the model (a wrong fast run is flagged, not counted).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
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
        # Gemma 3 1B's attention and MLP (4 query heads over 1, d256; five sliding-window layers
        # of 512 keys to one global layer), 6 layers: one round of its layer pattern. Unlike
        # Gemma 2 it has an sdpa path in transformers, so the comparison with sdpa exists.
        ModelShape("gemma3", "Gemma3TextConfig", dict(hidden_size=1152, intermediate_size=6912,
                                                      num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                                      num_hidden_layers=6, sliding_window=512,
                                                      query_pre_attn_scalar=256)),
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


def _failure(error: BaseException) -> tuple[str, str]:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return ("oom" if is_out_of_memory(error) else "error"), f"{type(error).__name__}: {first}"


class _Run:
    """One implementation's model for one (model, context): its prefill and decode calls."""

    def __init__(self, shape: ModelShape, implementation: str, context: int, dtype: torch.dtype, ids: torch.Tensor):
        if implementation == "fusedattn":
            from ..integrations import transformers as fusedattn_transformers

            fusedattn_transformers.register()
        self.implementation = implementation
        self.model = build_model(shape, implementation, dtype, context)
        self.ids = ids
        self.output = self.prefill()  # warm-up; its cache is the one every decode run copies

    def prefill(self) -> Any:
        return self.model(self.ids, use_cache=True)

    def decode(self, steps: int) -> float:
        """Seconds of `steps` greedy decode steps from a copy of the prefilled cache."""
        cache, token = copy.deepcopy(self.output.past_key_values), self.output.logits[:, -1:].argmax(-1)
        start = time.perf_counter()  # the copy of the cache (a cache grows in place) is not timed
        for _ in range(steps):
            step = self.model(token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


# Eager attention materializes (Hq, S, S) weights per layer (in float32 for the softmax):
# above this it is skipped, not run into the machine's memory limit.
EAGER_WEIGHTS_LIMIT = 2 * 2**30


def _eager_weights_bytes(shape: ModelShape, context: int) -> int:
    return shape.options.get("num_attention_heads", 1) * context * context * 4


def attention_share(implementation: str, work: Callable[[], Any]) -> float:
    """The share of work()'s time (a prefill, or decode steps) spent inside the attention
    function (the rest: projections, MLPs, norms, the LM head). It bounds what attention
    alone can gain: the work is at most 1 / (1 - share) times faster with attention that
    takes no time."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[implementation]
    spent = 0.0

    def timed(*args: Any, **kwargs: Any) -> Any:
        nonlocal spent
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent += time.perf_counter() - start

    ALL_ATTENTION_FUNCTIONS[implementation] = timed  # a local override of this interface
    try:
        start = time.perf_counter()
        work()
        total = time.perf_counter() - start
    finally:
        ALL_ATTENTION_FUNCTIONS[implementation] = original
    return spent / total


def measure_context(
    shape: ModelShape, context: int, dtype: torch.dtype, decode_steps: int, repeats: int
) -> list[dict[str, Any]]:
    """The three implementations on one (model, context), their calls interleaved round by
    round (a noisy neighbour then slows all of them alike), and fusedattn's check."""
    ids = torch.randint(0, _VOCABULARY, (1, context), generator=torch.Generator().manual_seed(1))
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, _Run] = {}
    with torch.no_grad():
        for implementation in ("sdpa", "eager", "fusedattn"):
            results[implementation] = {
                "model": shape.name, "implementation": implementation, "context": context,
                "dtype": str(dtype).removeprefix("torch."), "status": "ok", "reason": "", "prefill_tokens_per_s": None,
                "decode_tokens_per_s": None, "prefill_peak_memory_bytes": None, "max_logit_difference": None,
                "prefill_attention_share": None, "decode_attention_share": None,
            }  # fmt: skip
            if implementation == "eager" and _eager_weights_bytes(shape, context) > EAGER_WEIGHTS_LIMIT:
                results[implementation]["status"] = "skipped"
                results[implementation]["reason"] = (
                    f"eager materializes {_eager_weights_bytes(shape, context) / 2**30:.1f} GiB of attention "
                    f"weights per layer (more than {EAGER_WEIGHTS_LIMIT / 2**30:.0f} GiB)"
                )
                continue
            try:
                runs[implementation] = _Run(shape, implementation, context, dtype, ids)
            except Exception as error:  # noqa: BLE001  (a run that fails is reported, never fatal)
                results[implementation]["status"], results[implementation]["reason"] = _failure(error)
        prefill_times: dict[str, list[float]] = {name: [] for name in runs}
        decode_times: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(repeats):
            # Every other round in reverse order, so that no implementation always runs last.
            order = list(runs.items()) if round_index % 2 == 0 else list(reversed(runs.items()))
            for name, run in order:
                try:
                    start = time.perf_counter()
                    run.prefill()
                    prefill_times[name].append(time.perf_counter() - start)
                    decode_times[name].append(run.decode(decode_steps))
                except Exception as error:  # noqa: BLE001
                    results[name]["status"], results[name]["reason"] = _failure(error)
                    del runs[name]
        for name, run in runs.items():
            result = results[name]
            result["prefill_tokens_per_s"] = context / statistics.median(prefill_times[name])
            result["decode_tokens_per_s"] = decode_steps / statistics.median(decode_times[name])
            result["prefill_seconds"], result["decode_seconds"] = prefill_times[name], decode_times[name]
            result["prefill_peak_memory_bytes"], _ = measure_peak_memory(run.prefill, torch.device("cpu"))
            if name != "eager":
                result["prefill_attention_share"] = attention_share(name, run.prefill)
                result["decode_attention_share"] = attention_share(name, lambda run=run: run.decode(decode_steps))
        # fusedattn's logits against sdpa's, or eager's where transformers has no sdpa path
        # for the model (Gemma 2: its logit softcap).
        reference = next((name for name in ("sdpa", "eager") if name in runs), None)
        if reference is not None and "fusedattn" in runs:
            expected = runs[reference].output.logits[0, -1].float()
            difference = float((runs["fusedattn"].output.logits[0, -1].float() - expected).abs().max())
            results["fusedattn"]["max_logit_difference"] = difference
            results["fusedattn"]["checked_against"] = reference
            if not difference <= 2e-2 * max(1.0, float(expected.abs().max())):  # NaN fails too
                results["fusedattn"]["status"] = "wrong"
                results["fusedattn"]["reason"] = f"last-token logits differ from {reference}'s by {difference:.3g}"
    del runs
    release_memory(torch.device("cpu"))
    return list(results.values())


def run_models(
    models: list[str | ModelShape], contexts: list[int], dtype: torch.dtype, decode_steps: int = 16, repeats: int = 3
) -> list[dict[str, Any]]:
    """Every (model, context, implementation), with ratios against sdpa and eager.
    models: names of MODELS, or shapes of one's own."""
    results = []
    for model in models:
        shape = MODELS[model] if isinstance(model, str) else model
        for context in contexts:
            results += measure_context(shape, context, dtype, decode_steps, repeats)
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
    header = ("model", "context", "implementation", "status", "prefill tok/s", "vs sdpa", "vs eager",
              "attention share", "decode tok/s", "vs sdpa", "vs eager", "attention share", "peak MiB")  # fmt: skip
    rows = [header]
    for r in results:

        def number(value, digits=0):
            return "-" if value is None else f"{value:,.{digits}f}"

        rows.append((
            r["model"], str(r["context"]), r["implementation"], r["status"], number(r["prefill_tokens_per_s"]),
            number(r["prefill_vs_sdpa"], 2), number(r["prefill_vs_eager"], 2),
            number(r.get("prefill_attention_share"), 2), number(r["decode_tokens_per_s"], 1),
            number(r["decode_vs_sdpa"], 2), number(r["decode_vs_eager"], 2), number(r.get("decode_attention_share"), 2),
            number(None if r["prefill_peak_memory_bytes"] is None else r["prefill_peak_memory_bytes"] / 2**20, 1),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
