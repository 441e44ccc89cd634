"""Benchmark cases: what one measurement runs, the presets, `--shapes` and TOML grids.

A case is one attention problem in one mode (forward, backward or both). Cases are
written as *grids*: dicts whose values may be lists, expanded as a cartesian product.
The presets, the `--shapes` option and TOML files all produce grids, so they share one
expander and one set of keys (docs/benchmarks.md lists them).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
MASK_KINDS: tuple[str, ...] = ("bool", "additive")
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DTYPE_ALIASES: dict[str, str] = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                                 "float": "float32", "fp64": "float64", "double": "float64"}  # fmt: skip
SOFTCAP_DEFAULT = 30.0


def dtype_name(name: str) -> str:
    """Canonical dtype name ("bf16" -> "bfloat16"); ValueError for unknown names."""
    name = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return name


@dataclass(frozen=True)
class Case:
    """One attention problem in one mode.

    Dense cases: q (batch, heads_q, seqlen_q, head_dim), k/v (batch, heads_kv, seqlen_k, head_dim[_v]).
    Varlen cases (varlen_seqlens set): batch = number of sequences, each sequence attends to
    itself (query length = key length), seqlen_q = seqlen_k = the longest sequence.
    Causal masking is bottom-right aligned (query i at key position i + Sk - Sq).
    mask "bool" is a key-padding mask (batch b sees its first key_lengths(b) keys) given as a
    (B, 1, 1, Sk) bool tensor; "additive" is a (1, 1, Sq, Sk) float bias in the input dtype.
    """

    mode: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    dtype: str
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    alibi: bool = False
    mask: str | None = None
    varlen_seqlens: tuple[int, ...] | None = None
    group: str = "custom"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        for name in ("batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim", "head_dim_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q: expected a multiple of heads_kv ({self.heads_kv}), got {self.heads_q}")
        dtype_name(self.dtype)
        if self.mask is not None and self.mask not in MASK_KINDS:
            raise ValueError(f"mask: expected one of {MASK_KINDS} or none, got {self.mask!r}")
        if self.varlen_seqlens is not None:
            if self.mask is not None:
                raise ValueError("mask: varlen cases take no mask (fusedattn.attention_varlen has none)")
            if len(self.varlen_seqlens) != self.batch or max(self.varlen_seqlens) != self.seqlen_q:
                raise ValueError("varlen_seqlens: batch must be their count and seqlen_q/seqlen_k their maximum")

    # ---- derived facts ----------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[dtype_name(self.dtype)]

    @property
    def needs_grad(self) -> bool:
        return self.mode != "fwd"

    @property
    def query_tokens(self) -> int:
        """Query rows processed per call (summed over the batch or the packed sequences)."""
        if self.varlen_seqlens is not None:
            return sum(self.varlen_seqlens)
        return self.batch * self.seqlen_q

    def key_length(self, batch_index: int) -> int:
        """Keys batch_index may see under mask="bool": the last quarter of them at most is padding."""
        if self.mask != "bool":
            return self.seqlen_k
        return max(1, self.seqlen_k - ((batch_index + 1) * self.seqlen_k) // (4 * self.batch))

    @property
    def case_id(self) -> str:
        """A stable name, the key `bench compare` matches results on."""
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}:{self.heads_kv}"
        dims = f"d{self.head_dim}" if self.head_dim == self.head_dim_v else f"d{self.head_dim}:{self.head_dim_v}"
        parts = [self.mode, self.dtype, f"b{self.batch}", heads, f"s{self.seqlen_q}x{self.seqlen_k}", dims]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            left, right = ("-" if side is None else str(side) for side in self.window)
            parts.append(f"window{left},{right}")
        if self.softcap is not None:
            parts.append(f"softcap{self.softcap:g}")
        if self.alibi:
            parts.append("alibi")
        if self.mask is not None:
            parts.append(f"mask-{self.mask}")
        if self.varlen_seqlens is not None:
            lengths = ",".join(map(str, self.varlen_seqlens))
            digest = hashlib.sha1(lengths.encode()).hexdigest()[:8]
            parts.append(f"varlen{self.batch}-{sum(self.varlen_seqlens)}-{digest}")
        return "/".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window"] = None if self.window is None else list(self.window)
        data["varlen_seqlens"] = None if self.varlen_seqlens is None else list(self.varlen_seqlens)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        known = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        if values.get("window") is not None:
            values["window"] = tuple(values["window"])
        if values.get("varlen_seqlens") is not None:
            values["varlen_seqlens"] = tuple(values["varlen_seqlens"])
        return cls(**values)


# ---- grids -------------------------------------------------------------------------
GRID_KEYS: dict[str, str] = {
    "group": "label of the cases (prefill, decode, varlen, ...)",
    "mode": "fwd, bwd or fwd_bwd",
    "dtype": "float16, bfloat16, float32 or float64 (bf16, fp16, fp32 accepted)",
    "batch": "batch size (or use tokens)",
    "tokens": "batch = tokens // seqlen_q (FlashAttention's constant tokens per batch)",
    "heads": "heads_q = heads_kv",
    "heads_q": "query heads",
    "heads_kv": "key/value heads (GQA when smaller than heads_q)",
    "model_dim": "heads_q = heads_kv = model_dim // head_dim",
    "seqlen": "seqlen_q = seqlen_k",
    "seqlen_q": "query length",
    "seqlen_k": "key length",
    "head_dim": "D",
    "head_dim_v": "Dv (default D)",
    "causal": "true/false (bottom-right aligned)",
    "window": "[left, right] sliding window (null for an unbounded side); a list of such pairs is a grid axis",
    "softcap": "softcap value, or true for 30",
    "alibi": "true/false",
    "mask": "none, bool (key padding) or additive (float bias)",
    "varlen": "list of sequence lengths, or {documents = N, tokens = T} for N random lengths summing to T",
}


def _is_axis(key: str, value: Any) -> bool:
    """Whether a grid value lists alternatives (an axis) rather than being one value."""
    if not isinstance(value, (list, tuple)):
        return False
    if key in ("window", "varlen"):
        # One window is a pair, one varlen batch a list of ints: only lists of those are axes.
        return len(value) > 0 and all(isinstance(item, (list, tuple, dict)) or item is None for item in value)
    return True


def random_seqlens(documents: int, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """documents lengths >= 1 summing to tokens, drawn reproducibly (cut points of a seeded shuffle)."""
    if documents < 1 or tokens < documents:
        raise ValueError(f"varlen: expected 1 <= documents <= tokens, got documents={documents}, tokens={tokens}")
    generator = random.Random(seed)
    cuts = sorted(generator.sample(range(1, tokens), documents - 1))
    bounds = [0, *cuts, tokens]
    return tuple(bounds[i + 1] - bounds[i] for i in range(documents))


def _case_from_point(point: dict[str, Any]) -> Case:
    unknown = sorted(set(point) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"grid: unknown key(s) {unknown}; known keys: {sorted(GRID_KEYS)}")
    head_dim = int(point.get("head_dim", 64))
    if "model_dim" in point:
        heads_q = heads_kv = int(point["model_dim"]) // head_dim
    else:
        heads_q = int(point.get("heads_q", point.get("heads", 8)))
        heads_kv = int(point.get("heads_kv", point.get("heads", heads_q)))
    varlen = point.get("varlen")
    if varlen is not None:
        if isinstance(varlen, dict):
            seqlens = random_seqlens(int(varlen["documents"]), int(varlen["tokens"]))
        else:
            seqlens = tuple(int(length) for length in varlen)
        seqlen_q = seqlen_k = max(seqlens)
        batch = len(seqlens)
    else:
        seqlens = None
        seqlen_q = int(point.get("seqlen_q", point.get("seqlen", 1024)))
        seqlen_k = int(point.get("seqlen_k", point.get("seqlen", seqlen_q)))
        if "tokens" in point:
            batch = max(1, int(point["tokens"]) // seqlen_q)
        else:
            batch = int(point.get("batch", 1))
    softcap = point.get("softcap")
    if softcap is True:
        softcap = SOFTCAP_DEFAULT
    elif softcap is False:
        softcap = None
    window = point.get("window")
    if window is not None:
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ValueError(f"window: expected [left, right], got {window!r}")
        window = tuple(None if side is None else int(side) for side in window)
    mask = point.get("mask")
    mask = None if mask in (None, "none", False) else str(mask)
    return Case(
        mode=str(point.get("mode", "fwd")),
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        head_dim_v=int(point.get("head_dim_v", head_dim)),
        dtype=dtype_name(point.get("dtype", "float32")),
        causal=bool(point.get("causal", False)),
        window=window,
        softcap=None if softcap is None else float(softcap),
        alibi=bool(point.get("alibi", False)),
        mask=mask,
        varlen_seqlens=seqlens,
        group=str(point.get("group", "custom")),
    )


def expand_grid(grid: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[Case]:
    """Every case of one grid: the cartesian product of its list-valued keys.

    overrides replace keys of the grid before expansion (the CLI's --modes, --dtype).
    """
    grid = {**grid, **(overrides or {})}
    axes = [(key, list(value) if _is_axis(key, value) else [value]) for key, value in grid.items()]
    cases = []
    for values in itertools.product(*(choices for _, choices in axes)):
        cases.append(_case_from_point(dict(zip((key for key, _ in axes), values))))
    return cases


def expand_grids(grids: list[dict[str, Any]], overrides: dict[str, Any] | None = None) -> list[Case]:
    """The cases of several grids, duplicates removed, in order."""
    seen: dict[str, Case] = {}
    for grid in grids:
        for case in expand_grid(grid, overrides):
            seen.setdefault(case.case_id, case)
    return list(seen.values())


# ---- presets -----------------------------------------------------------------------
def _preset_quick(device: str, dtype: str) -> list[dict[str, Any]]:
    """What `make bench` runs: the main prefill configuration at four or more lengths and decode at
    three KV lengths in both common dtypes (bf16 is what models run, fp32 what CPUs run fastest),
    a training step, and the feature cases once, in the device's default dtype."""
    dtypes = sorted({dtype, _other_dtype(dtype)})
    if device == "cuda":
        # FlashAttention's benchmark shapes: 16k tokens per batch, model dim 2048.
        return [
            dict(group="prefill", mode="fwd", tokens=16384, seqlen=[512, 1024, 2048, 4096, 8192], head_dim=128,
                 model_dim=2048, causal=[False, True], dtype=dtypes),
            dict(group="train", mode="fwd_bwd", tokens=16384, seqlen=[1024, 4096], head_dim=128, model_dim=2048,
                 causal=True, dtype=dtype),
            dict(group="decode", batch=8, heads_q=32, heads_kv=8, seqlen_q=1, seqlen_k=[4096, 16384, 65536],
                 head_dim=128, causal=True, dtype=dtypes),
            dict(group="features", mode="fwd", varlen={"documents": 16, "tokens": 16384}, heads=16, head_dim=128,
                 causal=True, dtype=dtype),
            *_feature_grids(dict(batch=4, heads=16, seqlen=4096, head_dim=128, dtype=dtype), window=1024),
        ]  # fmt: skip
    # The 2-core CPU: the same structure at a size that finishes in under two minutes.
    return [
        dict(group="prefill", mode="fwd", tokens=2048, seqlen=[256, 512, 1024, 2048], head_dim=64, model_dim=512,
             causal=True, dtype=dtypes),
        dict(group="train", mode="fwd_bwd", tokens=512, seqlen=512, head_dim=64, model_dim=512, causal=True,
             dtype=dtypes),
        dict(group="decode", batch=2, heads_q=16, heads_kv=4, seqlen_q=1, seqlen_k=[1024, 4096, 16384],
             head_dim=128, causal=True, dtype=dtypes),
        dict(group="features", varlen={"documents": 6, "tokens": 1536}, heads=8, head_dim=64, causal=True,
             dtype=dtype),
        *_feature_grids(dict(batch=2, heads=8, seqlen=512, head_dim=64, dtype=dtype), window=128),
    ]  # fmt: skip


def _feature_grids(shape: dict[str, Any], window: int) -> list[dict[str, Any]]:
    """One case per feature on one shape: window, GQA, softcap, ALiBi, both masks."""
    base = dict(group="features", **shape)
    gqa = dict(base, heads_q=shape["heads"], heads_kv=max(1, shape["heads"] // 4))
    del gqa["heads"]
    return [
        dict(base, causal=True, window=[[window, 0]]),
        dict(gqa, causal=True),
        dict(base, softcap=True),
        dict(base, alibi=True, causal=True),
        dict(base, mask=list(MASK_KINDS)),
    ]


def _other_dtype(dtype: str) -> str:
    """bfloat16 for a float32 run, float32 for a half-precision one."""
    return "bfloat16" if dtype == "float32" else "float32"


def _preset_standard(device: str, dtype: str) -> list[dict[str, Any]]:
    if device == "cuda":
        seqlens, tokens, model_dim = [512, 1024, 2048, 4096, 8192, 16384], 16384, 2048
    else:
        seqlens, tokens, model_dim = [256, 512, 1024, 2048, 4096], 4096, 1024
    return [
        dict(group="prefill", mode=list(MODES), tokens=tokens, seqlen=seqlens, head_dim=[64, 128],
             model_dim=model_dim, causal=[False, True], dtype=dtype),
    ]  # fmt: skip


def _preset_llm_prefill(device: str, dtype: str) -> list[dict[str, Any]]:
    seqlens = [1024, 2048, 4096, 8192, 16384] if device == "cuda" else [512, 1024, 2048, 4096]
    window = 4096 if device == "cuda" else 1024
    longest = seqlens[-1]
    return [
        dict(group="prefill", batch=1, heads_q=32, heads_kv=8, seqlen=seqlens, head_dim=128, causal=True, dtype=dtype),
        dict(group="sliding-window", batch=1, heads_q=32, heads_kv=8, seqlen=longest, head_dim=128, causal=True,
             window=[[window - 1, 0]], dtype=dtype),
        dict(group="softcap", batch=1, heads_q=16, heads_kv=8, seqlen=longest, head_dim=256 if device == "cuda" else 128,
             causal=True, softcap=50.0, dtype=dtype),
        dict(group="varlen", varlen={"documents": 8, "tokens": longest * 2}, heads_q=32, heads_kv=8, head_dim=128,
             causal=True, dtype=dtype),
    ]  # fmt: skip


def _preset_llm_decode(device: str, dtype: str) -> list[dict[str, Any]]:
    lengths = [4096, 16384, 65536] if device == "cuda" else [2048, 8192, 32768]
    return [
        dict(group="decode", batch=[1, 8], heads_q=32, heads_kv=8, seqlen_q=[1, 4, 16], seqlen_k=lengths,
             head_dim=128, causal=True, dtype=dtype),
        dict(group="decode-window", batch=8, heads_q=32, heads_kv=8, seqlen_q=1, seqlen_k=lengths[-1],
             head_dim=128, causal=True, window=[[4095, 0]], dtype=dtype),
    ]  # fmt: skip


def _preset_training(device: str, dtype: str) -> list[dict[str, Any]]:
    if device == "cuda":
        seqlens, tokens, model_dim = [1024, 2048, 4096, 8192], 16384, 2048
    else:
        seqlens, tokens, model_dim = [512, 1024, 2048], 4096, 512
    return [
        dict(group="train", mode="fwd_bwd", tokens=tokens, seqlen=seqlens, head_dim=[64, 128], model_dim=model_dim,
             causal=True, dtype=dtype),
        dict(group="train-gqa", mode="fwd_bwd", tokens=tokens, seqlen=seqlens[-1], heads_q=32 if device == "cuda"
             else 8, heads_kv=8 if device == "cuda" else 2, head_dim=128, causal=True, dtype=dtype),
        dict(group="train-varlen", mode="fwd_bwd", varlen={"documents": 8, "tokens": tokens}, model_dim=model_dim,
             head_dim=128, causal=True, dtype=dtype),
        dict(group="train-window", mode="fwd_bwd", tokens=tokens, seqlen=seqlens[-1], model_dim=model_dim,
             head_dim=128, causal=True, window=[[seqlens[-1] // 4 - 1, 0]], dtype=dtype),
    ]  # fmt: skip


PRESETS = {
    "quick": (_preset_quick, "the default: bf16 and fp32 prefill (4+ lengths) and decode (3 KV lengths), training, "
              "features; < 2 min on a 2-core CPU"),
    "standard": (_preset_standard, "FlashAttention's grid: seqlen 512..16k at 16k tokens, d64/d128, causal or not, "
                 "fwd/bwd/fwd_bwd"),
    "llm-prefill": (_preset_llm_prefill, "GQA 32/8 d128 causal prefill, sliding window, softcap, packed documents"),
    "llm-decode": (_preset_llm_decode, "1 to 16 queries against a long KV cache, GQA 32/8 d128"),
    "training": (_preset_training, "forward+backward: causal, GQA, packed documents, sliding window"),
}  # fmt: skip


def default_dtype(device: str) -> str:
    """bfloat16 on GPUs; float32 on CPU, where it is the common inference dtype."""
    return "bfloat16" if device == "cuda" else "float32"


def preset_grids(name: str, device: str, dtype: str | None = None) -> list[dict[str, Any]]:
    """The grids of a preset, sized for device ("cpu" or "cuda")."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name][0](device, dtype_name(dtype or default_dtype(device)))


def preset_cases(name: str, device: str, dtype: str | None = None) -> list[Case]:
    """The cases of a preset, sized for device ("cpu" or "cuda")."""
    return expand_grids(preset_grids(name, device, dtype))


# ---- --shapes and TOML -------------------------------------------------------------
_SHAPE_PATTERN = re.compile(r"^(\d+)x(\d+)(?::(\d+))?x(\d+)(?:x(\d+))?x(\d+)(?::(\d+))?$")


def parse_shapes(text: str) -> list[dict[str, Any]]:
    """`--shapes` items, comma separated: BxHxSxD, BxHxSqxSkxD; H may be Hq:Hkv, D may be D:Dv.

    Returns one grid per shape (without mode/dtype/causal, which the CLI adds).
    """
    grids = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _SHAPE_PATTERN.match(item)
        if not match:
            raise ValueError(
                f"--shapes: expected BxHxSxD or BxHxSqxSkxD (H may be Hq:Hkv, D may be D:Dv), got {item!r}"
            )
        batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = match.groups()
        grids.append(
            dict(
                group="shapes",
                batch=int(batch),
                heads_q=int(heads_q),
                heads_kv=int(heads_kv or heads_q),
                seqlen_q=int(seqlen_q),
                seqlen_k=int(seqlen_k or seqlen_q),
                head_dim=int(head_dim),
                head_dim_v=int(head_dim_v or head_dim),
            )
        )
    if not grids:
        raise ValueError("--shapes: expected at least one shape")
    return grids


def load_grid_file(path: str | Path) -> list[dict[str, Any]]:
    """Grids from a TOML file: optional [defaults] merged into every [[grid]] table."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    grids = data.get("grid")
    if not isinstance(grids, list) or not grids:
        raise ValueError(f"{path}: expected one or more [[grid]] tables")
    defaults = data.get("defaults", {})
    unknown = sorted(set(data) - {"grid", "defaults"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; expected [defaults] and [[grid]]")
    return [{**defaults, **grid} for grid in grids]
