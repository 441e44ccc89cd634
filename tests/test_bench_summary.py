"""`fusedattn bench`'s one-screen summary, its charts, the quick preset's contents and
`bench compare` across two runs. Synthetic results.json documents with chosen times, so every
number the summary prints is known in advance; nothing here is timed."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from fusedattn.bench import cases as bench_cases
from fusedattn.bench import cli as bench_cli
from fusedattn.bench import report, run, summary
from fusedattn.bench.cases import Case
from fusedattn.bench.measure import case_flops, minimum_bytes
from fusedattn.cli import main as fusedattn_main

CEILINGS = {"matmul_tflops": {"float32": 0.1, "bfloat16": 0.2}, "copy_gb_per_s": 20.0, "method": "synthetic"}


def _case(**overrides) -> Case:
    values = dict(mode="fwd", batch=2, heads_q=8, heads_kv=8, seqlen_q=256, seqlen_k=256, head_dim=64, head_dim_v=64,
                  dtype="float32", causal=True, group="prefill")  # fmt: skip
    values.update(overrides)
    return Case(**values)


def _result(case: Case, provider: str, ms: float | None, status: str = "ok") -> dict:
    """A result as run_pair writes it, with the median time ms."""
    seconds = None if ms is None else ms / 1e3
    timing = None
    if status == "ok":
        timing = {"median_ms": ms, "q1_ms": ms, "q3_ms": ms, "iqr_ms": 0.0, "min_ms": ms, "mean_ms": ms,
                  "repeats": 3, "warmup_calls": 1, "samples_ms": [ms] * 3}  # fmt: skip
    flops = case_flops(case)
    return {
        "case_id": case.case_id, "provider": provider, "status": status, "reason": "" if status == "ok" else status,
        "note": "", "case": case.as_dict(), "flops": flops, "timing": timing,
        "tflops": flops / seconds / 1e12 if timing else None,
        "tokens_per_s": case.query_tokens / seconds if timing else None,
        "gb_per_s": minimum_bytes(case) / seconds / 1e9 if timing and case.mode == "fwd" else None,
        "peak_memory_bytes": None, "memory_method": "", "check": None, "speedup_vs_sdpa": None, "wall_s": 0.1,
        "compile_s": None,
    }  # fmt: skip


PREFILL_256 = _case()
PREFILL_512 = _case(seqlen_q=512, seqlen_k=512, batch=1)
PREFILL_BF16 = _case(dtype="bfloat16")
DECODE = _case(seqlen_q=1, seqlen_k=1024, heads_q=16, heads_kv=4, head_dim=128, head_dim_v=128, group="decode")
TRAIN = _case(mode="fwd_bwd", group="train")
SOFTCAP = _case(softcap=30.0, causal=False, group="features")
MASK = _case(mask="additive", causal=False, group="features")
# (case, sdpa ms, fusedattn ms): speedups 2, 0.5, 2, 4, 3; softcap has no SDPA; the mask case fails.
TIMES = [(PREFILL_256, 10.0, 5.0), (PREFILL_512, 10.0, 20.0), (PREFILL_BF16, 8.0, 4.0), (DECODE, 4.0, 1.0),
         (TRAIN, 9.0, 3.0), (SOFTCAP, None, 2.0), (MASK, 5.0, None)]  # fmt: skip


def _synthetic_report(flex: bool = False) -> dict:
    results = []
    for case, sdpa_ms, ours_ms in TIMES:
        results.append(_result(case, "fusedattn:cpu", ours_ms, "ok" if ours_ms else "error"))
        results.append(_result(case, "sdpa", sdpa_ms, "ok" if sdpa_ms else "skipped"))
        results.append(_result(case, "naive", 4 * (sdpa_ms or 5.0)))
        if flex:
            results.append(_result(case, "flex_attention", 10.0 if case is PREFILL_256 else None,
                                   "ok" if case is PREFILL_256 else "skipped"))  # fmt: skip
    run.add_speedups(results)
    settings = run.BenchSettings()
    data = report.build_report(results, settings, preset="quick", command=["fusedattn", "bench"], ceilings=CEILINGS)
    assert report.validate_report(data) == []
    return data


# ---- the summary's numbers -----------------------------------------------------------
def test_workload_classification():
    assert summary.workload(PREFILL_256.as_dict()) == "prefill"
    assert summary.workload(DECODE.as_dict()) == "decode"
    assert summary.workload(TRAIN.as_dict()) == "training"
    assert summary.workload(_case(mode="bwd").as_dict()) == "training"
    assert summary.workload(_case(seqlen_q=16, seqlen_k=16).as_dict()) == "prefill"  # short prefill, not decode


def test_summary_numbers_from_a_synthetic_report():
    result = summary.summarize(_synthetic_report())
    rows = {(r.provider, r.workload, r.dtype): r for r in result.rows}
    prefill = rows[("fusedattn:cpu", "prefill", "float32")]
    assert sorted(prefill.speedups) == pytest.approx([0.5, 2.0])
    assert prefill.geomean == pytest.approx(1.0)
    assert [case_id for case_id, _ in prefill.slower] == [PREFILL_512.case_id]
    assert rows[("fusedattn:cpu", "decode", "float32")].speedups == pytest.approx([4.0])
    assert rows[("fusedattn:cpu", "training", "float32")].speedups == pytest.approx([3.0])
    assert not any(row.provider == "naive" for row in result.rows)  # a headline, not rows
    assert (
        result.headlines[1]
        == "naive is 0.25x to 0.25x SDPA (geomean 0.25x): faster in 0 of 6 cases, slower in 6 (+1 SDPA cannot run)"
    )
    # The ceiling fractions: TFLOP/s over the dtype's matmul rate, decode GB/s over the copy bandwidth.
    expected = case_flops(PREFILL_BF16) / 4e-3 / 1e12 / CEILINGS["matmul_tflops"]["bfloat16"]
    assert rows[("fusedattn:cpu", "prefill", "bfloat16")].ceiling == pytest.approx([expected])
    expected = minimum_bytes(DECODE) / 1e-3 / 1e9 / CEILINGS["copy_gb_per_s"]
    assert rows[("fusedattn:cpu", "decode", "float32")].ceiling == pytest.approx([expected])
    assert rows[("fusedattn:cpu", "decode", "float32")].baseline_ceiling == pytest.approx([expected / 4])
    # Headline over all cases: geomean of 2, 0.5, 2, 4, 3 = 24 ** (1 / 5).
    headline, _ = result.headlines
    assert f"geomean {24**0.2:.2f}x" in headline and "0.50x to 4.00x" in headline
    assert "faster in 4 of 5 cases, slower in 1" in headline and "+1 SDPA cannot run" in headline
    assert result.slower == [("fusedattn:cpu", PREFILL_512.case_id, pytest.approx(0.5))]
    assert result.failed == [("fusedattn:cpu", MASK.case_id, "error")]
    assert "vs flex" not in summary.table_rows(result)[0]
    assert (result.noisy, result.timed) == (0, 19)


def test_summary_flags_noisy_timings():
    data = _synthetic_report()
    data["results"][0]["timing"]["iqr_ms"] = data["results"][0]["timing"]["median_ms"]  # spread = the median
    result = summary.summarize(data)
    assert result.noisy == 1
    assert "Noise: 1 of 19 timings" in summary.format_summary(result)


def test_summary_against_flex_attention_when_it_ran():
    result = summary.summarize(_synthetic_report(flex=True))
    header, cells = summary.table_rows(result)
    assert "vs flex" in header
    row = next(c for c in cells if c[:3] == ["fusedattn:cpu", "prefill", "fp32"])
    assert row[header.index("vs flex")] == "2.00x"  # flex 10 ms, fusedattn 5 ms
    assert "2.00x FlexAttention" in result.headlines[0]
    assert any(r.provider == "flex_attention" for r in result.rows)


def test_summary_text_report_md_and_charts(tmp_path):
    data = _synthetic_report()
    text = summary.format_summary(summary.summarize(data))
    assert text.splitlines()[0].startswith("Summary: what fusedattn gains over torch SDPA")
    assert "Slower than SDPA:" in text and "0.50x  fusedattn:cpu" in text
    assert "Ceilings measured in this run: torch.mm 200 GFLOP/s bf16, 100 GFLOP/s fp32; copy 20.0 GB/s" in text
    assert len(text.splitlines()) < 40  # one screen
    paths = report.write_outputs(data, tmp_path)
    markdown = paths["markdown"].read_text()
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## Summary") and "| fusedattn:cpu | prefill | fp32 | 2 | 1.00x |" in markdown
    pytest.importorskip("matplotlib")
    charts = {path.name for path in tmp_path.glob("*.png")}
    # Two fp32 prefill lengths make a line; no training line (one length), so no throughput_fwd_bwd.png.
    assert charts == {"speedup.png", "throughput_fwd.png", "decode_bandwidth.png", "features.png"}
    assert all(f"]({name})" in markdown for name in charts)


def test_older_reports_without_ceilings_still_summarize():
    data = _synthetic_report()
    del data["ceilings"]
    assert report.validate_report(data) == []
    result = summary.summarize(data)
    assert all(not row.ceiling for row in result.rows)
    assert "not measured" in summary.format_summary(result)


# ---- the quick preset --------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quick_preset_covers_both_dtypes_lengths_and_decode(device):
    quick = bench_cases.preset_cases("quick", device)
    for dtype in ("bfloat16", "float32"):
        prefill = [c for c in quick if c.group == "prefill" and c.dtype == dtype]
        configurations: dict[tuple, set[int]] = {}
        for case in prefill:
            key = (case.mode, case.heads_q, case.head_dim, case.causal)
            configurations.setdefault(key, set()).add(case.seqlen_q)
        assert max(len(lengths) for lengths in configurations.values()) >= 4, (dtype, configurations)
        decode = [c for c in quick if summary.workload(c.as_dict()) == "decode" and c.dtype == dtype]
        assert len({c.seqlen_k for c in decode}) >= 3
    assert any(c.mode != "fwd" for c in quick)  # training
    features = [c for c in quick if c.group == "features"]
    assert {c.window is not None for c in features} == {True, False}
    assert any(c.softcap for c in features) and any(c.alibi for c in features)
    assert any(c.varlen_seqlens for c in features) and {c.mask for c in features} >= {"bool", "additive"}
    assert any(c.heads_kv < c.heads_q for c in features)
    # The feature cases stay out of the length sweeps.
    assert all(c.window is None and c.mask is None and c.softcap is None for c in quick if c.group == "prefill")
    # --dtype collapses both dtypes into one.
    single = bench_cases.expand_grids(bench_cases.preset_grids("quick", device), {"dtype": "float32"})
    assert {c.dtype for c in single} == {"float32"} and len(single) < len(quick)


# ---- bench compare across two runs -------------------------------------------------
def _slower(data: dict, factor: float, provider: str) -> dict:
    changed = copy.deepcopy(data)
    for result in changed["results"]:
        if result["provider"] == provider and result["timing"]:
            for key in ("median_ms", "min_ms", "mean_ms"):
                result["timing"][key] *= factor
    return changed


def test_compare_prints_and_plots_two_machines(tmp_path, capsys):
    base = _synthetic_report()
    other = _slower(base, 0.5, "fusedattn:cpu")  # a machine where fusedattn takes half the time
    other["environment"]["device_name"] = "Another CPU"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(base))
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    code = fusedattn_main(["bench", "compare", str(tmp_path / "a" / "results.json"),
                           str(tmp_path / "b" / "results.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "Another CPU" in out and "different machines" in out
    assert "fusedattn:cpu        NEW is 2.00x BASE's speed (geomean of 6" in out
    assert "vs SDPA: 1.89x on BASE, 3.78x on NEW" in out
    assert "skipped in both runs" in out
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "b" / "compare.png").stat().st_size > 0
    # The gate still fails the reverse direction, and --no-plot draws nothing.
    code = fusedattn_main(["bench", "compare", str(tmp_path / "b" / "results.json"),
                           str(tmp_path / "a" / "results.json"), "--no-plot"])  # fmt: skip
    assert code == 1 and "REGRESSION" in capsys.readouterr().out
    assert not (tmp_path / "a" / "compare.png").exists()
    plot = tmp_path / "chart.png"
    code = fusedattn_main(["bench", "compare", str(tmp_path / "a" / "results.json"),
                           str(tmp_path / "a" / "results.json"), "--plot", str(plot)])  # fmt: skip
    assert code == 0 and "PASS" in capsys.readouterr().out


# ---- the progress bar --------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_quiet_off_a_terminal():
    provider = bench_cli.all_providers()[0]
    stream = io.StringIO()
    with bench_cli.Progress(stream) as progress:
        progress(0, 2, PREFILL_256, provider, None)
        progress(1, 2, PREFILL_256, provider, _result(PREFILL_256, provider.name, 1.0))
    assert stream.getvalue() == ""
    terminal = _Terminal()
    with bench_cli.Progress(terminal) as progress:
        progress(1, 2, PREFILL_256, provider, None)
    assert terminal.getvalue()  # something was drawn (rich's bar, or the plain one without rich)


def test_matmul_ceiling_is_a_rate():
    from fusedattn.bench.ceilings import matmul_tflops

    value = matmul_tflops("float32", torch.device("cpu"))
    assert math.isfinite(value) and value > 0
