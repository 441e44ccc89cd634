"""`fusedattn bench`: FLOP counts, grids, the report schema, the compare gate, skip/oom/wrong
handling and CLI errors. Correctness only: nothing here is timed."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from fusedattn import dispatch
from fusedattn.backends.base import Backend, Capabilities
from fusedattn.bench import cases as bench_cases
from fusedattn.bench import measure, providers, report, run
from fusedattn.bench.cases import Case
from fusedattn.cli import main as fusedattn_main

FAST = ["--min-time", "0", "--warmup", "0", "--min-repeats", "1", "--max-repeats", "2"]

TINY_GRID = """
[defaults]
dtype = "float32"
heads = 2
head_dim = 8

[[grid]]
group = "prefill"
mode = ["fwd", "fwd_bwd"]
batch = 2
seqlen_q = [5, 12]
seqlen_k = 12
causal = [false, true]

[[grid]]
group = "features"
mode = "bwd"
batch = 2
heads_q = 4
seqlen = 10
head_dim_v = 4
causal = true
window = [[3, 1]]
alibi = true

[[grid]]
group = "masks"
batch = 3
seqlen = 9
mask = ["bool", "additive"]
softcap = [false, true]

[[grid]]
group = "varlen"
mode = ["fwd", "fwd_bwd"]
varlen = [7, 1, 12]
causal = true
window = [[4, 0]]
"""


def _case(**overrides) -> Case:
    values = dict(mode="fwd", batch=1, heads_q=2, heads_kv=2, seqlen_q=8, seqlen_k=8, head_dim=4, head_dim_v=4,
                  dtype="float32")  # fmt: skip
    values.update(overrides)
    return Case(**values)


# ---- FLOPs -------------------------------------------------------------------------
def _brute_force_pairs(seqlen_q, seqlen_k, causal, window, key_length=None) -> int:
    """Visible pairs by the rule written out per element (query i at key position i + Sk - Sq)."""
    left, right = window if window is not None else (None, None)
    count = 0
    for i in range(seqlen_q):
        position = i + seqlen_k - seqlen_q
        for j in range(seqlen_k):
            visible = (not causal or j <= position) and (left is None or j >= position - left)
            visible = visible and (right is None or j <= position + right)
            visible = visible and (key_length is None or j < key_length)
            count += visible
    return count


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 7), (3, 11), (11, 4), (1, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (2, 0), (0, 3), (None, 1), (4, None), (1, 1)])
def test_visible_pairs_match_brute_force(seqlen_q, seqlen_k, causal, window):
    for key_length in (None, max(1, seqlen_k - 2)):
        expected = _brute_force_pairs(seqlen_q, seqlen_k, causal, window, key_length)
        got = measure.visible_pair_count(seqlen_q, seqlen_k, causal=causal, window=window, key_length=key_length)
        assert got == expected


def test_flops_follow_flash_attention_convention():
    batch, heads, seqlen, dim = 3, 5, 64, 32
    dense = _case(batch=batch, heads_q=heads, heads_kv=heads, seqlen_q=seqlen, seqlen_k=seqlen, head_dim=dim,
                  head_dim_v=dim)  # fmt: skip
    assert measure.forward_flops(dense) == 4 * batch * heads * seqlen * seqlen * dim
    causal = _case(**{**dense.as_dict(), "causal": True, "window": None, "varlen_seqlens": None})
    halved = 4 * batch * heads * seqlen * seqlen * dim / 2
    # Exact visible pairs S (S + 1) / 2: FlashAttention's halving up to (S + 1) / S.
    assert measure.forward_flops(causal) == pytest.approx(halved * (seqlen + 1) / seqlen)
    value_dim = _case(batch=2, heads_q=4, heads_kv=2, seqlen_q=3, seqlen_k=10, head_dim=16, head_dim_v=8)
    assert measure.forward_flops(value_dim) == 2 * 2 * 4 * 3 * 10 * (16 + 8)
    for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
        moded = _case(mode=mode, batch=2, seqlen_q=9, seqlen_k=9)
        assert measure.case_flops(moded) == factor * measure.forward_flops(moded)


def test_varlen_window_and_key_padding_flops_count_unmasked_work():
    lengths = (7, 1, 12)
    varlen = _case(batch=3, seqlen_q=12, seqlen_k=12, varlen_seqlens=lengths, causal=True, window=(4, 0))
    expected = sum(_brute_force_pairs(n, n, True, (4, 0)) for n in lengths)
    assert measure.unmasked_pairs(varlen) == expected
    padded = _case(batch=3, seqlen_q=6, seqlen_k=16, mask="bool", causal=True)
    key_lengths = [padded.key_length(b) for b in range(3)]
    assert min(key_lengths) >= 1 and max(key_lengths) < 16
    assert measure.unmasked_pairs(padded) == sum(_brute_force_pairs(6, 16, True, None, n) for n in key_lengths)
    # The key-padding mask the providers receive is the one the count assumes.
    inputs = providers.make_inputs(padded, torch.device("cpu"))
    assert inputs.attn_mask.sum(dim=-1).flatten().tolist() == key_lengths


# ---- grids -------------------------------------------------------------------------
def test_grid_expansion_and_presets():
    cases = bench_cases.expand_grid(
        dict(mode=["fwd", "bwd"], tokens=1024, seqlen=[128, 256], model_dim=256, head_dim=[32, 64],
             window=[[8, 0], None], varlen=None)
    )  # fmt: skip
    assert len(cases) == 2 * 2 * 2 * 2
    assert {c.batch * c.seqlen_q for c in cases} == {1024}
    assert {c.heads_q * c.head_dim for c in cases} == {256}
    one_window = bench_cases.expand_grid(dict(window=[16, None]))
    assert len(one_window) == 1 and one_window[0].window == (16, None)
    varlen = bench_cases.expand_grid(dict(varlen={"documents": 5, "tokens": 100}))[0]
    assert len(varlen.varlen_seqlens) == 5 and sum(varlen.varlen_seqlens) == 100 and min(varlen.varlen_seqlens) >= 1
    for device in ("cpu", "cuda"):
        for name in bench_cases.PRESETS:
            preset = bench_cases.preset_cases(name, device)
            assert preset and len({c.case_id for c in preset}) == len(preset)
    quick = bench_cases.preset_cases("quick", "cpu")
    assert {c.mode for c in quick} == {"fwd", "fwd_bwd"}
    assert any(c.seqlen_q < c.seqlen_k for c in quick) and any(c.varlen_seqlens for c in quick)
    with pytest.raises(ValueError, match="unknown key"):
        bench_cases.expand_grid(dict(seqlenq=5))
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        bench_cases.expand_grid(dict(heads_q=6, heads_kv=4))


def test_case_round_trips_through_json():
    case = _case(window=(3, None), varlen_seqlens=(8, 2), batch=2, causal=True, alibi=True, softcap=30.0)
    assert Case.from_dict(json.loads(json.dumps(case.as_dict()))) == case


# ---- a real tiny run: schema, files, checks ---------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("bench")
    grid = folder / "grid.toml"
    grid.write_text(TINY_GRID)
    out = folder / "out"
    code = fusedattn_main(["bench", "--config", str(grid), "--device", "cpu", "--out", str(out),
                           "--providers", "fusedattn:reference,sdpa,naive,flash-attn", *FAST])  # fmt: skip
    return out, code


def test_tiny_run_writes_a_valid_report(tiny_run):
    out, code = tiny_run
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert report.validate_report(data) == []
    results = data["results"]
    case_ids = {r["case_id"] for r in results}
    assert len(results) == 4 * len(case_ids)
    by_provider = {}
    for result in results:
        by_provider.setdefault(result["provider"], []).append(result)
    # The reference and naive run everything and pass the check against the float64 reference.
    for name in ("fusedattn:reference", "naive"):
        for result in by_provider[name]:
            assert result["status"] == "ok", (result["case_id"], result["reason"])
            assert result["check"]["passed"]
            assert result["timing"]["median_ms"] > 0 and result["tflops"] > 0 and result["tokens_per_s"] > 0
            assert result["peak_memory_bytes"] is None or result["peak_memory_bytes"] >= 0
    for result in by_provider["sdpa"]:
        if result["case"]["softcap"] is not None:
            assert result["status"] == "skipped" and "softcap" in result["reason"]
        else:
            assert result["status"] == "ok" and result["check"]["passed"], (result["case_id"], result["reason"])
            assert result["speedup_vs_sdpa"] == pytest.approx(1.0)
    assert all(r["status"] == "skipped" and r["reason"] for r in by_provider["flash-attn"])
    checked = {t["name"] for r in by_provider["naive"] if r["case"]["mode"] != "fwd" for t in r["check"]["tensors"]}
    assert checked == {"out", "dq", "dk", "dv"}
    environment = data["environment"]
    assert environment["device"] == "cpu" and environment["torch"] == torch.__version__
    assert environment["torch_threads"] >= 1 and environment["cpu_cores"] >= 1
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(results) + 1
    assert "# fusedattn bench report" in (out / "report.md").read_text()
    assert list(out.glob("*.png"))
    # The schema check can fail.
    broken = copy.deepcopy(data)
    del broken["environment"]["commit"]
    broken["results"][0]["status"] = "fast"
    broken["results"][1]["timing"] = {"median_ms": "1"}
    errors = report.validate_report(broken)
    assert any("commit" in e for e in errors) and any("status" in e for e in errors)
    assert any("results[1].timing" in e for e in errors)


# ---- the compare gate --------------------------------------------------------------
def _slowed(data: dict, factor: float, provider: str = "naive") -> dict:
    changed = copy.deepcopy(data)
    for result in changed["results"]:
        if result["provider"] == provider and result["timing"]:
            for key in ("median_ms", "min_ms", "mean_ms"):
                result["timing"][key] *= factor
    return changed


def test_compare_gate(tmp_path, capsys):
    settings = run.BenchSettings(timing=measure.TimingSettings(warmup_s=0, min_time_s=0, min_repeats=2))
    selected = providers.select_providers(torch.device("cpu"), ["sdpa", "naive"])
    cases = [_case(batch=2, seqlen_q=4, seqlen_k=9), _case(mode="fwd_bwd", causal=True)]
    data = report.build_report(run.run_benchmark(cases, selected, settings), settings, selected)
    assert all(r["status"] == "ok" for r in data["results"])
    base = tmp_path / "base.json"
    base.write_text(json.dumps(data))

    def gate(new_data: dict, *extra: str) -> int:
        new = tmp_path / "new.json"
        new.write_text(json.dumps(new_data))
        return fusedattn_main(["bench", "compare", str(base), str(new), *extra])

    assert gate(data, "--fail-above", "5%") == 0
    assert gate(_slowed(data, 1.10), "--fail-above", "5%") == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert gate(_slowed(data, 1.03), "--fail-above", "5%") == 0
    assert gate(_slowed(data, 1.03), "--fail-above", "2") == 1
    assert gate(_slowed(data, 0.5)) == 0  # faster never fails
    wrong = copy.deepcopy(data)
    wrong["results"][0]["status"] = "wrong"
    assert data["results"][0]["status"] == "ok"
    assert gate(wrong) == 1
    unrelated = copy.deepcopy(data)
    for result in unrelated["results"]:
        result["case_id"] += "/other"
    assert gate(unrelated) == 2
    (tmp_path / "garbage.json").write_text('{"schema": "something else"}')
    assert fusedattn_main(["bench", "compare", str(base), str(tmp_path / "garbage.json")]) == 2
    assert fusedattn_main(["bench", "compare", str(base), str(tmp_path / "missing.json")]) == 2
    assert gate(data, "--fail-above", "five") == 2


# ---- skip, oom, error and wrong results --------------------------------------------
def _fake_provider(name: str, forward=None, skip: str | None = None) -> providers.Provider:
    def prepare(inputs):
        if skip:
            raise providers.Skip(skip)
        q, k, v = (t.detach().requires_grad_(inputs.case.needs_grad) for t in (inputs.q, inputs.k, inputs.v))
        return providers.Prepared(lambda: forward(q, k, v), (q, k, v))

    return providers.Provider(name, "eager", "fake", prepare)


def _raiser(error: BaseException):
    def forward(q, k, v):
        raise error

    return forward


def _naive(q, k, v):
    return providers.naive_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]))


def test_skip_oom_error_and_wrong_never_crash():
    fakes = [
        _fake_provider("memory", _raiser(MemoryError())),
        _fake_provider("cuda-oom", _raiser(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))),
        _fake_provider("cpu-oom", _raiser(RuntimeError("DefaultCPUAllocator: can't allocate memory"))),
        _fake_provider("broken", _raiser(ValueError("kernel bug"))),
        _fake_provider("declines", skip="not for this case"),
        _fake_provider("fast-but-wrong", lambda q, k, v: q * 0.5),
        _fake_provider("right", _naive),
        # Right forward values, doubled gradients: only the backward check can catch it.
        _fake_provider(
            "wrong-backward", lambda q, k, v: (lambda out: out.detach() + 2 * (out - out.detach()))(_naive(q, k, v))
        ),
        providers.select_providers(torch.device("cpu"), ["sdpa"])[0],
    ]
    settings = run.BenchSettings(timing=measure.TimingSettings(warmup_s=0, min_time_s=0, min_repeats=1))
    cases = [_case(mode=mode, batch=2, seqlen_q=6, seqlen_k=10) for mode in ("fwd", "fwd_bwd")]
    results = run.run_benchmark(cases, fakes, settings)
    status = {(r["case"]["mode"], r["provider"]): r for r in results}
    for mode in ("fwd", "fwd_bwd"):
        assert status[mode, "memory"]["status"] == "oom"
        assert status[mode, "cuda-oom"]["status"] == "oom"
        assert status[mode, "cpu-oom"]["status"] == "oom"
        assert status[mode, "broken"]["status"] == "error" and "kernel bug" in status[mode, "broken"]["reason"]
        assert status[mode, "declines"]["status"] == "skipped"
        assert status[mode, "declines"]["reason"] == "not for this case"
        wrong = status[mode, "fast-but-wrong"]
        assert wrong["status"] == "wrong" and not wrong["check"]["passed"] and wrong["speedup_vs_sdpa"] is None
        assert wrong["timing"] is not None  # timed, but flagged
        assert status[mode, "right"]["status"] == "ok" and status[mode, "right"]["speedup_vs_sdpa"] > 0
    assert status["fwd", "wrong-backward"]["status"] == "ok"
    backward = status["fwd_bwd", "wrong-backward"]
    assert backward["status"] == "wrong"
    assert {t["name"] for t in backward["check"]["tensors"] if not t["passed"]} == {"dq", "dk", "dv"}
    assert report.validate_report(report.build_report(results, settings, fakes)) == []


def test_rounds_alternate_providers_and_pool_their_calls(monkeypatch):
    # Every call of a fake provider logs its name; every timed block logs a marker first.
    log: list[str] = []

    def logging(name):
        def forward(q, k, v):
            log.append(name)
            return _naive(q, k, v)

        return forward

    real_samples = run.timed_samples

    def marked(fn, device, settings, count):
        log.append("|")
        return real_samples(fn, device, settings, count)

    monkeypatch.setattr(run, "timed_samples", marked)
    fakes = [_fake_provider("first", logging("first")), _fake_provider("broken", _raiser(ValueError("kernel bug"))),
             _fake_provider("second", logging("second"))]  # fmt: skip
    timing = measure.TimingSettings(warmup_s=0, min_time_s=0, min_repeats=5, max_repeats=5, rounds=4)
    results = run.run_benchmark([_case(batch=1, seqlen_q=4, seqlen_k=8)], fakes, run.BenchSettings(timing=timing))
    first, broken, second = results
    assert broken["status"] == "error" and broken["timing"] is None
    blocks = [log[i + 1] for i, entry in enumerate(log) if entry == "|"]
    assert blocks == ["first", "second", "second", "first", "first", "second", "second", "first"]
    # Each block of these short calls but a provider's first starts with an untimed call.
    later = [i for i, entry in enumerate(log) if entry == "|"][2:]
    assert all(log[i - 1] == log[i + 1] for i in later)
    for result in (first, second):
        assert result["status"] == "ok" and result["check"]["passed"]
        assert result["timing"]["rounds"] == 4 and result["timing"]["repeats"] == 4 * 2  # ceil(5 / 4) per round
    assert log.count("first") == log.count("second")
    assert report.validate_report(report.build_report(results, run.BenchSettings(timing=timing), fakes)) == []


def _cli_report(out: Path, *arguments: str) -> dict:
    """Runs `fusedattn bench ... --no-plots --out out` with FAST timing; its valid report."""
    assert fusedattn_main(["bench", *arguments, "--no-plots", "--out", str(out), *FAST]) == 0
    data = json.loads((out / "results.json").read_text())
    assert report.validate_report(data) == []
    return data


def test_cli_rounds_reach_the_report(tmp_path):
    arguments = ["--shapes", "1x2x3x8", "--providers", "naive,sdpa", "--rounds", "3", "--no-memory", "--no-ceilings"]
    data = _cli_report(tmp_path / "rounds", *arguments)
    assert data["settings"]["rounds"] == 3
    assert [r["timing"]["rounds"] for r in data["results"]] == [3, 3]
    assert all(r["timing"]["repeats"] == 3 for r in data["results"])  # 1 call per round (--min-repeats 1)


def test_fusedattn_refusals_are_skips(monkeypatch):
    limited = Backend(
        name="limited",
        capabilities=Capabilities(
            devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), features=frozenset({"causal_bottom_right"})
        ),  # fmt: skip
        forward=lambda call: (_ for _ in ()).throw(AssertionError("must not run")),
        backward=None,
    )
    monkeypatch.setitem(dispatch.registry(), "limited", limited)
    provider = next(p for p in providers.all_providers() if p.name == "fusedattn:limited")
    inputs = providers.make_inputs(_case(softcap=30.0), torch.device("cpu"))
    with pytest.raises(providers.Skip, match="softcap"):
        provider.prepare(inputs)
    sdpa = providers.select_providers(torch.device("cpu"), ["sdpa"])[0]
    with pytest.raises(providers.Skip, match="softcap"):
        sdpa.prepare(inputs)


def test_peak_memory_is_measured_on_cpu():
    supported, reason = measure.cpu_peak_supported()
    if not supported:
        pytest.skip(reason)
    size = 64 * 2**20
    peak, method = measure.measure_peak_memory(lambda: torch.ones(size // 4, dtype=torch.float32), torch.device("cpu"))
    assert method and size * 0.9 <= peak <= size * 1.5
    small, _ = measure.measure_peak_memory(lambda: torch.ones(16), torch.device("cpu"))
    assert small < size // 4


def test_timed_calls_after_a_peak_measurement_reuse_heap_memory():
    # The peak measurement's fixed 128 KiB mmap threshold would make every 4 MiB output of a
    # later timed call fresh memory (1024 page faults per call, for every provider): after
    # it, blocks below 32 MiB come from the heap again.
    import resource

    supported, reason = measure.cpu_peak_supported()
    if not supported:
        pytest.skip(reason)
    measure.measure_peak_memory(lambda: torch.ones(1024), torch.device("cpu"))
    for _ in range(3):
        torch.empty(2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(2**20).fill_(1.0)  # 4 MiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1024


# ---- CLI errors ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "arguments",
    [
        ["--shapes", "2x8x128"],
        ["--shapes", "2x8x128x64", "--modes", "forward"],
        ["--providers", "no-such-provider", "--list"],
        ["--preset", "enormous"],
        ["--min-time", "-1"],
        ["--rounds", "0"],
        ["--dtype", "int8"],
        ["--shapes", "1x2x8x8", "--config", "grid.toml", "--list"],
        ["--config", "/nonexistent/grid.toml", "--list"],
        ["compare", "only-one.json"],
    ],
)
def test_cli_argument_errors_exit_2(arguments, capsys):
    assert fusedattn_main(["bench", *arguments]) == 2
    captured = capsys.readouterr()
    assert "error" in (captured.err + captured.out).lower()


def test_run_without_check_or_memory(tmp_path):
    out = tmp_path / "plain"
    data = _cli_report(
        out, "--shapes", "1x2:1x3x7x8", "--modes", "bwd", "--providers", "naive", "--no-check", "--no-memory"
    )
    assert data["preset"] is None
    (result,) = data["results"]
    assert result["status"] == "ok" and result["check"] is None and result["peak_memory_bytes"] is None
    assert not list(out.glob("*.png"))


def test_cli_list_shapes_and_bad_toml(tmp_path, capsys):
    assert fusedattn_main(["bench", "--shapes", "2x8:2x4x512x64:32", "--causal", "both", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "fwd/" in listed and "h8:2/s4x512/d64:32/causal" in listed
    assert fusedattn_main(["bench", "list"]) == 0
    assert "quick" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[[grid]]\nseqlen = 64\nwidth = 3\n")
    assert fusedattn_main(["bench", "--config", str(bad), "--list"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_flex_attention_provider_expresses_every_case_feature():
    # FlexAttention's block mask and score_mod for each rule of a case, checked against the
    # float64 reference by the benchmark's own check; its compile time is reported apart.
    flex = providers.select_providers(torch.device("cpu"), ["flex_attention"])[0]
    if not flex.availability(torch.device("cpu"))[0]:
        pytest.skip(flex.availability(torch.device("cpu"))[1])
    assert "cpu" not in flex.default_devices  # compiling takes seconds per case on CPU
    cases = [
        _case(batch=2, heads_q=4, heads_kv=2, seqlen_q=12, seqlen_k=40, causal=True, window=(9, None)),
        _case(batch=2, seqlen_q=16, seqlen_k=32, mask="bool", alibi=True, softcap=5.0),
        _case(batch=1, seqlen_q=16, seqlen_k=24, mask="additive", head_dim_v=8, window=(4, 3)),
        _case(batch=3, seqlen_q=20, seqlen_k=20, causal=True, varlen_seqlens=(20, 7, 13)),
    ]
    settings = run.BenchSettings(timing=measure.TimingSettings(warmup_s=0, min_time_s=0, min_repeats=1))
    results = run.run_benchmark(cases, [flex], settings)
    for result in results:
        assert result["status"] == "ok", (result["case_id"], result["reason"])
        assert result["check"]["passed"] and result["compile_s"] > 0
    assert report.validate_report(report.build_report(results, settings, [flex])) == []


def test_models_benchmark_runs_every_implementation_on_the_same_weights(capsys, monkeypatch):
    pytest.importorskip("transformers")
    from fusedattn.bench import models
    from fusedattn.bench.models import ModelShape, format_models_table, run_models

    prefills: list[str] = []
    real_prefill = models._Run.prefill

    def logged_prefill(run):
        prefills.append(run.implementation)
        return real_prefill(run)

    monkeypatch.setattr(models._Run, "prefill", logged_prefill)
    tiny = ModelShape("tiny-llama", "LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                         num_key_value_heads=2, num_hidden_layers=2))  # fmt: skip
    results = run_models([tiny], [24], torch.float32, decode_steps=2, repeats=2)
    # After each model's warm-up prefill, two timed rounds, the second in reverse order.
    assert prefills[3:9] == ["sdpa", "eager", "fusedattn", "fusedattn", "eager", "sdpa"]
    for result in results:
        assert len(result["prefill_seconds"]) == len(result["decode_seconds"]) == 2
    assert [(r["implementation"], r["status"]) for r in results] == [
        ("sdpa", "ok"),
        ("eager", "ok"),
        ("fusedattn", "ok"),
    ]
    for result in results:
        assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
        assert result["prefill_vs_sdpa"] > 0 and result["decode_vs_eager"] > 0
    fused = results[2]
    assert fused["max_logit_difference"] < 1e-3  # the same weights and ids: the same logits
    for result in (results[0], fused):  # the share of the prefill and decode inside attention
        assert 0 < result["prefill_attention_share"] < 1 and 0 < result["decode_attention_share"] < 1
    assert results[1]["prefill_attention_share"] is None and results[1]["decode_attention_share"] is None
    assert "tiny-llama" in format_models_table(results)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"].__name__ != "timed"  # the timing wrapper is gone


def test_models_benchmark_skips_eager_where_its_weights_would_not_fit(monkeypatch):
    pytest.importorskip("transformers")
    from fusedattn.bench import models

    tiny = models.ModelShape("tiny-llama", "LlamaConfig", dict(hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1))  # fmt: skip
    monkeypatch.setattr(models, "EAGER_WEIGHTS_LIMIT", 2 * 16 * 16 * 4 - 1)  # 2 heads of 16 x 16 floats
    results = models.run_models([tiny], [16], torch.float32, decode_steps=1, repeats=1)
    statuses = {r["implementation"]: r["status"] for r in results}
    assert statuses == {"sdpa": "ok", "eager": "skipped", "fusedattn": "ok"}
    assert "attention weights" in next(r["reason"] for r in results if r["implementation"] == "eager")
    assert next(r for r in results if r["implementation"] == "fusedattn")["prefill_vs_eager"] is None
    assert fusedattn_main(["bench", "models", "--models", "nope"]) == 2  # unknown model: a usage error


def test_models_preset_shapes_build_their_configs():
    transformers = pytest.importorskip("transformers")
    from fusedattn.bench.models import MODELS

    assert {"llama", "qwen", "gemma", "gemma3"} <= set(MODELS)
    for shape in MODELS.values():
        config = getattr(transformers, shape.config_class)(vocab_size=64, **shape.options)
        assert config.num_hidden_layers == shape.options["num_hidden_layers"]
    gemma3 = getattr(transformers, MODELS["gemma3"].config_class)(**MODELS["gemma3"].options)
    assert gemma3.layer_types.count("sliding_attention") == 5 and gemma3.layer_types[-1] == "full_attention"
