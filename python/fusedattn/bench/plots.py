"""The PNG charts of a run (and of `bench compare`), meant to be looked at rather than read:

- speedup.png: the speedup against SDPA of every case, a bar per case, grouped by workload,
  with a line at 1.0x;
- throughput_<mode>.png: TFLOP/s against sequence length of the plain prefill (or training)
  cases, a panel per dtype, with the dtype's measured matmul rate drawn as the ceiling;
- decode_bandwidth.png: GB/s against KV length of the decode cases, with the copy bandwidth;
- features.png: the feature cases (window, GQA, softcap, ALiBi, masks, packed documents) on
  their own, TFLOP/s per provider with the speedup against SDPA written on fusedattn's bars;
- compare.png (bench compare): the per-case speed ratio of two runs.

matplotlib is optional: without it no chart is written and the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .providers import BASELINE
from .summary import SHORT_DTYPES, WORKLOADS, workload

ROW_INCHES = 0.26  # height of one bar row in the horizontal bar charts
FASTER, SLOWER = "#2e7d32", "#c62828"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


FIXED_COLORS = {BASELINE: "#ff7f0e", "naive": "#2ca02c", "flex_attention": "#9467bd"}
PALETTE = ["#1f77b4", "#d62728", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _colors(report: dict[str, Any]) -> dict[str, str]:
    """A colour per provider of the whole report, so one provider looks the same in every chart."""
    names = sorted({r["provider"] for r in report["results"]} - set(FIXED_COLORS))
    names.sort(key=lambda name: not name.startswith("fusedattn:"))
    return {**FIXED_COLORS, **{name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}}


def _dtype(case: dict[str, Any]) -> str:
    return SHORT_DTYPES.get(case["dtype"], case["dtype"])


def _heads(case: dict[str, Any]) -> str:
    return f"h{case['heads_q']}" + (f":{case['heads_kv']}" if case["heads_kv"] != case["heads_q"] else "")


def feature_name(case: dict[str, Any]) -> str:
    """What sets a feature case apart, e.g. "window 128", "GQA 8:2", "additive mask", "6 packed docs"."""
    parts = []
    if case["varlen_seqlens"] is not None:
        parts.append(f"{len(case['varlen_seqlens'])} packed docs")
    if case["window"] is not None:
        parts.append("window " + ",".join("-" if side is None else str(side) for side in case["window"]))
    if case["heads_kv"] != case["heads_q"]:
        parts.append(f"GQA {case['heads_q']}:{case['heads_kv']}")
    if case["softcap"] is not None:
        parts.append(f"softcap {case['softcap']:g}")
    if case["alibi"]:
        parts.append("ALiBi")
    if case["mask"] is not None:
        parts.append(f"{case['mask']} mask")
    return ", ".join(parts) or ("causal" if case["causal"] else "plain")


def case_label(case: dict[str, Any]) -> str:
    """A short row label: dtype, lengths, shape and features (the mode is the chart's grouping)."""
    if workload(case) == "decode":
        lengths = f"q{case['seqlen_q']} kv{case['seqlen_k']}"
    elif case["varlen_seqlens"] is not None:
        lengths = f"{sum(case['varlen_seqlens'])} tok"
    else:
        lengths = f"s{case['seqlen_q']}" + (f"x{case['seqlen_k']}" if case["seqlen_k"] != case["seqlen_q"] else "")
    dims = f"d{case['head_dim']}" + (f":{case['head_dim_v']}" if case["head_dim_v"] != case["head_dim"] else "")
    label = f"{_dtype(case)} {lengths} b{case['batch']} {_heads(case)} {dims}"
    if case["mode"] != "fwd":
        label = f"{case['mode']} {label}"
    # GQA is already in the heads ("h16:4"); the other features are spelled out.
    extra = [part for part in feature_name(case).split(", ") if not part.startswith("GQA")]
    extra = [part for part in extra if part not in ("causal", "plain")] + (["causal"] if case["causal"] else [])
    return " ".join([label, *extra])


def _case_order(case: dict[str, Any]) -> tuple[Any, ...]:
    """Rows in reading order: workload, dtype, the length sweeps before the feature cases, length."""
    return (WORKLOADS.index(workload(case)), case["mode"], case["dtype"], not _is_plain(case), case["seqlen_k"],
            case["seqlen_q"], case_label(case))  # fmt: skip


def _ok(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["status"] == "ok"]


def _is_plain(case: dict[str, Any]) -> bool:
    """A length-sweep case: not a feature case (no window, softcap, ALiBi, mask, packing)."""
    return (case["group"] != "features" and case["window"] is None and case["softcap"] is None
            and not case["alibi"] and case["mask"] is None and case["varlen_seqlens"] is None)  # fmt: skip


def _bar_panels(
    plt: Any, groups: list[tuple[str, list[str]]], width: float = 10.0, bars: int = 1
) -> tuple[Any, list[Any]]:
    """A column of horizontal-bar panels, each as tall as its number of rows (bars: bars per row)."""
    heights = [max(len(labels), 1) for _, labels in groups]
    row = ROW_INCHES * max(1.0, 0.55 * bars)  # several bars per row need room for their numbers
    figure, axes = plt.subplots(
        len(groups), 1, figsize=(width, 1.3 + row * sum(heights) + 0.5 * len(groups)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    return figure, [row[0] for row in axes]


def _value_labels(axis: Any, positions: Iterable[float], values: Iterable[float]) -> None:
    """'1.23x' beside each horizontal ratio bar, outside its end (right when >= 1)."""
    for y, value in zip(positions, values):
        axis.text(value * (1.04 if value >= 1 else 0.96), y, f"{value:.2f}x", va="center",
                  ha="left" if value >= 1 else "right", fontsize=7)  # fmt: skip


def _name_rows(axis: Any, labels: list[str], name: str) -> None:
    """Case labels top to bottom, and the panel's name."""
    axis.set_yticks(range(len(labels)))
    axis.set_yticklabels(labels, fontsize=8)
    axis.set_ylim(len(labels) - 0.5, -0.5)
    axis.set_ylabel(name, fontsize=10, fontweight="bold")


def _log_ratio_axis(axis: Any, values: list[float], reference: float = 1.0) -> None:
    """Log x axis around 1.0x with plain "0.5x, 1x, 2x" ticks."""
    low = min([*values, reference]) / 1.8  # room for the value written before a bar pointing left
    high = max([*values, reference]) * 1.6  # room for the value written after each bar
    axis.set_xscale("log")
    axis.set_xlim(min(low, 0.5), max(high, 2.0))
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if min(low, 0.5) <= t <= max(high, 2.0)]
    axis.set_xticks(ticks)
    axis.set_xticklabels([f"{t:g}x" for t in ticks])
    axis.minorticks_off()
    axis.axvline(reference, color="black", linewidth=1.2, linestyle="--")
    axis.grid(True, axis="x", alpha=0.3)


def speedup_chart(report: dict[str, Any], path: Path) -> bool:
    """speedup.png: SDPA's time over each compared provider's, a bar per case, grouped by workload."""
    plt = _pyplot()
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for result in _ok(report):
        by_case.setdefault(result["case_id"], {})[result["provider"]] = result
    shown = sorted({r["provider"] for r in _ok(report) if r["speedup_vs_sdpa"] is not None
                    and not r["provider"].startswith(BASELINE) and r["provider"] != "naive"},
                   key=lambda name: (not name.startswith("fusedattn:"), name))  # fmt: skip
    if plt is None or not shown:
        return False
    groups: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for providers in by_case.values():
        values = {p: providers[p]["speedup_vs_sdpa"] for p in shown
                  if p in providers and providers[p]["speedup_vs_sdpa"] is not None}  # fmt: skip
        if values:
            case = next(iter(providers.values()))["case"]
            groups.setdefault(workload(case), []).append((case, values))
    ordered = [(name, [(case_label(case), values) for case, values in sorted(groups[name], key=lambda item:
                _case_order(item[0]))]) for name in WORKLOADS if name in groups]  # fmt: skip
    figure, axes = _bar_panels(plt, [(name, [label for label, _ in rows]) for name, rows in ordered], bars=len(shown))
    colors = _colors(report)
    everything = [v for _, rows in ordered for _, values in rows for v in values.values()]
    height = 0.8 / len(shown)
    for axis, (name, rows) in zip(axes, ordered):
        for index, provider in enumerate(shown):
            positions, widths, bar_colors = [], [], []
            for row, (_, values) in enumerate(rows):
                if provider in values:
                    positions.append(row - 0.4 + height * (index + 0.5))
                    widths.append(values[provider])
                    if len(shown) == 1:
                        bar_colors.append(FASTER if values[provider] >= 1 else SLOWER)
                    else:
                        bar_colors.append(colors[provider])
            # Bars start at 1.0x so a slower case points left and a faster one right.
            axis.barh(positions, [w - 1 for w in widths], left=1, height=height, color=bar_colors,
                      label=provider if len(shown) > 1 else None)  # fmt: skip
            _value_labels(axis, positions, widths)
        _name_rows(axis, [label for label, _ in rows], name)
        _log_ratio_axis(axis, everything)
    axes[-1].set_xlabel("speedup against torch SDPA (SDPA time / provider time; right of the line = faster)")
    if len(shown) > 1:
        axes[0].legend(fontsize=8, loc="lower right")
    count = sum(len(rows) for _, rows in ordered)
    title = (
        f"{', '.join(shown)} against SDPA: {count} cases with an SDPA result ({report['environment']['device_name']})"
    )
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _line_chart(
    report: dict[str, Any],
    panels: dict[Any, dict[str, list[tuple[int, float]]]],
    ceilings: dict[Any, tuple[float, str]],
    titles: dict[Any, str],
    xlabel: str,
    ylabel: str,
    suptitle: str,
    path: Path,
) -> bool:
    """A row of panels, a line per provider (log2 x axis), each panel's ceiling a dashed line."""
    plt = _pyplot()
    if plt is None or not panels:
        return False
    keys = sorted(panels)
    colors = _colors(report)
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        top = 0.0
        for label, points in sorted(panels[key].items()):
            points = sorted(points)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                      color=colors[label.split(" (")[0]])  # fmt: skip
            top = max(top, *(p[1] for p in points))
        if key in ceilings:
            value, text = ceilings[key]
            axis.axhline(value, color="black", linestyle="--", linewidth=1.2, label=text)
            top = max(top, value)
        axis.set_xscale("log", base=2)
        xs = sorted({p[0] for points in panels[key].values() for p in points})
        axis.set_xticks(xs)
        axis.set_xticklabels([str(x) for x in xs], fontsize=8)
        axis.minorticks_off()
        axis.set_ylim(0, top * 1.12)
        axis.set_title(titles[key], fontsize=10)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle(suptitle, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _unit(values: list[float]) -> tuple[float, str]:
    """TFLOP/s for GPUs, GFLOP/s when every value is below 1 TFLOP/s (a CPU)."""
    return (1.0, "TFLOP/s") if max(values, default=0) >= 1 else (1000.0, "GFLOP/s")


def throughput_chart(report: dict[str, Any], mode: str, path: Path) -> bool:
    """TFLOP/s against sequence length of the plain cases of one mode, a panel per dtype, head dim
    and causal setting, with the dtype's matmul rate as the ceiling. False when no line has two
    lengths (nothing to draw against length)."""
    results = [r for r in _ok(report) if r["case"]["mode"] == mode and _is_plain(r["case"])
               and workload(r["case"]) != "decode" and r["case"]["seqlen_q"] == r["case"]["seqlen_k"]]  # fmt: skip
    matmul = (report.get("ceilings") or {}).get("matmul_tflops") or {}
    scale, unit = _unit([r["tflops"] for r in results] + list(matmul.values()))
    panels: dict[Any, dict[str, list[tuple[int, float]]]] = {}
    families: dict[Any, set[str]] = {}
    for result in results:
        case = result["case"]
        key = (case["dtype"], case["head_dim"], case["causal"])
        families.setdefault(key, set()).add(_heads(case))
    for result in results:
        case = result["case"]
        key = (case["dtype"], case["head_dim"], case["causal"])
        label = result["provider"] + (f" ({_heads(case)})" if len(families[key]) > 1 else "")
        panels.setdefault(key, {}).setdefault(label, []).append((case["seqlen_q"], result["tflops"] * scale))
    if not any(len(points) > 1 for panel in panels.values() for points in panel.values()):
        return False
    ceilings = {key: (matmul[key[0]] * scale, f"torch.mm ceiling {matmul[key[0]] * scale:.3g} {unit}")
                for key in panels if key[0] in matmul}  # fmt: skip
    titles = {key: f"{SHORT_DTYPES.get(key[0], key[0])}, d{key[1]}, {'causal' if key[2] else 'non-causal'}"
              for key in panels}  # fmt: skip
    what = {"fwd": "prefill forward", "bwd": "backward", "fwd_bwd": "forward + backward"}[mode]
    return _line_chart(report, panels, ceilings, titles, "sequence length (tokens per batch constant)", unit,
                       f"{what} throughput ({report['environment']['device_name']})", path)  # fmt: skip


def decode_chart(report: dict[str, Any], path: Path) -> bool:
    """GB/s against KV length of the decode cases, a panel per dtype (and query count), with the
    copy bandwidth as the ceiling."""
    panels: dict[Any, dict[str, list[tuple[int, float]]]] = {}
    for result in _ok(report):
        case = result["case"]
        if workload(case) != "decode" or result["gb_per_s"] is None or not _is_plain(case):
            continue
        key = (case["dtype"], case["seqlen_q"])
        label = f"{result['provider']} (b{case['batch']} {_heads(case)})"
        panels.setdefault(key, {}).setdefault(label, []).append((case["seqlen_k"], result["gb_per_s"]))
    # One shape per panel needs no shape in the legend.
    for panel in panels.values():
        if len({label.split(" (")[1] for label in panel}) == 1:
            for label in list(panel):
                panel[label.split(" (")[0]] = panel.pop(label)
    copy = (report.get("ceilings") or {}).get("copy_gb_per_s")
    ceilings = {key: (copy, f"copy bandwidth {copy:.3g} GB/s") for key in panels} if copy else {}
    titles = {key: f"{SHORT_DTYPES.get(key[0], key[0])}, {key[1]} new token(s)" for key in panels}
    # A KV cache small enough to stay in the CPU's caches can beat the copy of a buffer that cannot.
    title = f"decode bandwidth ({report['environment']['device_name']})"
    if report["environment"].get("device") == "cpu":
        title += "\nabove the copy line: the KV cache fits in the CPU caches"
    return _line_chart(report, panels, ceilings, titles, "KV length", "GB/s (q, K, V read + out written)", title, path)


def features_chart(report: dict[str, Any], path: Path) -> bool:
    """TFLOP/s of each feature case per provider (grouped bars), the speedup against SDPA written
    on fusedattn's bars, the matmul ceiling dashed."""
    plt = _pyplot()
    results = [r for r in _ok(report) if not _is_plain(r["case"]) and workload(r["case"]) != "decode"]
    if plt is None or not results:
        return False
    cases: dict[str, dict[str, Any]] = {}
    for result in results:
        cases.setdefault(result["case_id"], result["case"])
    providers = sorted({r["provider"] for r in results}, key=lambda n: (not n.startswith("fusedattn:"), n))
    colors = _colors(report)
    dtypes = sorted({case["dtype"] for case in cases.values()})
    matmul = (report.get("ceilings") or {}).get("matmul_tflops") or {}
    scale, unit = _unit([r["tflops"] for r in results] + [matmul[d] for d in dtypes if d in matmul])
    figure, axes = plt.subplots(len(dtypes), 1, figsize=(11, 4.6 * len(dtypes)), squeeze=False)
    width = 0.8 / len(providers)
    for axis, dtype in zip((row[0] for row in axes), dtypes):
        ids = sorted((i for i, c in cases.items() if c["dtype"] == dtype), key=lambda i: feature_name(cases[i]))
        top = max([r["tflops"] * scale for r in results if r["case"]["dtype"] == dtype]
                  + ([matmul[dtype] * scale] if dtype in matmul else []))  # fmt: skip
        for index, provider in enumerate(providers):
            for position, case_id in enumerate(ids):
                result = next((r for r in results if r["case_id"] == case_id and r["provider"] == provider), None)
                if result is None:
                    continue
                x = position - 0.4 + width * (index + 0.5)
                value = result["tflops"] * scale
                axis.bar(x, value, width, color=colors[provider], label=provider if position == 0 else None)
                if provider.startswith("fusedattn:"):
                    speedup = result["speedup_vs_sdpa"]
                    text = "no SDPA" if speedup is None else f"{speedup:.2f}x"
                    # Upright numbers over narrow neighbouring bars would overlap.
                    axis.text(x, value + top * 0.01, text, ha="center", va="bottom", fontsize=7,
                              rotation=90 if len(providers) > 3 else 0)  # fmt: skip
        if dtype in matmul:
            axis.axhline(matmul[dtype] * scale, color="black", linestyle="--", linewidth=1.2,
                         label=f"torch.mm ceiling {matmul[dtype] * scale:.3g} {unit}")  # fmt: skip
        axis.set_ylim(0, top * 1.25)
        axis.set_xticks(range(len(ids)))
        axis.set_xticklabels([_feature_tick(cases[i]) for i in ids], fontsize=8)
        axis.set_ylabel(unit)
        axis.set_title(f"{SHORT_DTYPES.get(dtype, dtype)}; the number on fusedattn's bars: its speedup against SDPA",
                       fontsize=10)  # fmt: skip
        axis.grid(True, axis="y", alpha=0.3)
        # Deduplicated legend (bars were labelled only at their first case).
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(f"feature cases: throughput ({report['environment']['device_name']})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _feature_tick(case: dict[str, Any]) -> str:
    """Two-line tick: the feature, then the shape."""
    shape = f"b{case['batch']} {_heads(case)} s{case['seqlen_q']}" if case["varlen_seqlens"] is None else ""
    if case["varlen_seqlens"] is not None:
        shape = f"{sum(case['varlen_seqlens'])} tok {_heads(case)}"
    return f"{feature_name(case)}{' causal' if case['causal'] else ''}\n{shape} d{case['head_dim']}"


def write_plots(report: dict[str, Any], folder: Path) -> list[str]:
    """Every chart the report has data for, written to folder; their file names."""
    if _pyplot() is None:
        return []
    written = []
    if speedup_chart(report, folder / "speedup.png"):
        written.append("speedup.png")
    for mode in ("fwd", "fwd_bwd", "bwd"):
        name = f"throughput_{mode}.png"
        if throughput_chart(report, mode, folder / name):
            written.append(name)
    if decode_chart(report, folder / "decode_bandwidth.png"):
        written.append("decode_bandwidth.png")
    if features_chart(report, folder / "features.png"):
        written.append("features.png")
    return written


def compare_chart(
    rows: list[tuple[str, dict[str, Any], float]], base_name: str, new_name: str, threshold: float, path: Path
) -> bool:
    """compare.png: per (provider, case) the base time over the new time (> 1: the new run is
    faster), a panel per provider, a line at 1.0x and the gate's limit dotted. Red bars are the
    ones the gate fails, green ones faster by more than the threshold, grey ones within it."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    providers = sorted({p for p, _, _ in rows}, key=lambda n: (not n.startswith("fusedattn:"), n != BASELINE, n))
    groups = [(p, [case_label(case) for q, case, _ in rows if q == p]) for p in providers]
    figure, axes = _bar_panels(plt, groups, width=11)
    values = [v for _, _, v in rows]

    def color(value: float) -> str:
        return SLOWER if value < 1 / (1 + threshold) else FASTER if value > 1 + threshold else "#9e9e9e"

    for axis, (provider, _) in zip(axes, groups):
        ordered = sorted(((case, v) for q, case, v in rows if q == provider), key=lambda item: _case_order(item[0]))
        mine = [(case_label(case), v) for case, v in ordered]
        axis.barh(range(len(mine)), [v - 1 for _, v in mine], left=1, height=0.7, color=[color(v) for _, v in mine])
        _value_labels(axis, range(len(mine)), [value for _, value in mine])
        _name_rows(axis, [label for label, _ in mine], provider)
        _log_ratio_axis(axis, values)
        axis.axvline(1 / (1 + threshold), color=SLOWER, linestyle=":", linewidth=1)
    limit = f"; dotted: the gate's {threshold * 100:g}% limit"
    axes[-1].set_xlabel(f"NEW speed / BASE speed (BASE time / NEW time; right of the line = NEW faster{limit})")
    figure.suptitle(f"NEW: {new_name}\nagainst BASE: {base_name}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def finite(value: float | None) -> bool:
    """A usable positive ratio (not None, NaN or infinite)."""
    return value is not None and math.isfinite(value) and value > 0
