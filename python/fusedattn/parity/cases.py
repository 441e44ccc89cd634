"""The seeded case grid of the parity harness.

Case number i of a grid is a pure function of (seed, size profile, i): its ID ("c0042")
names it forever, whatever --cases, --dtype or --features selected it, so
``fusedattn parity --case c0042 --seed S --device D`` rebuilds the same tensors.

Coverage is guaranteed by construction, not by luck: case i focuses on
FOCUS[i % len(FOCUS)] (each feature of semantics.FEATURES, plus fully masked rows and
non-contiguous inputs) and draws the other features at random; its dtype, query length,
head dim and GQA ratio cycle through their lists, so the first 3 x len(FOCUS) cases hold
every (focus, dtype) pair. Half the cases whose focus is an option take that option (and
the others of the entry) from an entry of the shared feature-case table
(fusedattn.testing.FEATURE_CASES, the one every backend's tests run) that uses it, on the
grid's random shapes; the other half draw the option's values.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..semantics import FEATURES, AttentionCall
from ..testing import FEATURE_CASES, paged_case, quantize_test_cache

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_ALIASES = {
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}

# What case i focuses on: every feature a call can use (backward comes from --grad),
# plus two properties of the inputs that are not features but break kernels.
FOCUS: tuple[str, ...] = tuple(name for name in FEATURES if name != "backward") + ("fully_masked", "non_contiguous")
# Paged cases come only from their focus: drawn at random they would take a fifth of every
# other feature's cases out of the backward check (paged calls are checked forward only).
# 8-bit K/V cases likewise (forward only).
_FORWARD_ONLY = ("paged_kv", "quantized_kv")
_DRAWN = tuple(name for name in FOCUS if not name.startswith("causal_") and name not in _FORWARD_ONLY) + ("causal",)
# Features whose rules read positions: a sequence block needs one, or its starts change nothing.
_POSITIONAL = ("causal", "window", "alibi", "dropout")
_DRAW_PROBABILITY = 0.2
_TABLE_PROBABILITY = 0.5
_MASK_FEATURES = ("bool_mask", "additive_mask", "key_lengths")  # dense-only: attention_varlen has none

HEAD_DIMS: tuple[int, ...] = (16, 32, 40, 64, 80, 96, 112, 128, 192, 256)
ODD_HEAD_DIMS: tuple[int, ...] = (8, 24, 72, 100, 136, 200)  # drawn now and then, to find tile-edge bugs
GQA_RATIOS: tuple[int, ...] = (2, 7, 8)  # ratio 1 is every case without the gqa feature
PAGED_BLOCK_SIZES: tuple[int, ...] = (1, 2, 16, 64, 256)
# Head dims past 256 (Gemma 4's 512; DeepSeek's absorbed MLA, D 576 with Dv 512), now and then.
WIDE_HEAD_DIMS: tuple[tuple[int, int], ...] = ((512, 512), (576, 512))
_WIDE_HEAD_PROBABILITY = 0.06

_HEAD_DIM_PADDING = 8  # extra elements per row of the buffer non-contiguous inputs are cut from

ID_PATTERN = re.compile(r"^c(\d{4,})$")


@dataclass(frozen=True)
class SizeProfile:
    """How large cases get: small on CPU (CI), full on GPUs."""

    name: str
    seqlens: tuple[int, ...]
    large_seqlens: tuple[int, int]  # inclusive range for the sequence lengths of large cases
    large_every: int  # case i is large when i % large_every == large_every - 1
    max_heads_kv: int
    max_batch_heads: int  # cap on batch * heads_q of an ordinary case
    large_max_batch_heads: int
    large_max_head_dim: int


PROFILES: dict[str, SizeProfile] = {
    "small": SizeProfile(
        name="small",
        seqlens=(1, 7, 17, 32, 64, 100, 127, 128),
        large_seqlens=(1000, 1100),
        large_every=50,
        max_heads_kv=2,
        max_batch_heads=8,  # the Triton interpreter's cost grows with batch x heads
        large_max_batch_heads=2,
        large_max_head_dim=64,
    ),
    "full": SizeProfile(
        name="full",
        seqlens=(1, 7, 17, 64, 127, 128, 255, 256, 333, 512),
        large_seqlens=(1000, 4200),
        large_every=6,
        max_heads_kv=4,
        max_batch_heads=64,
        large_max_batch_heads=16,
        large_max_head_dim=256,
    ),
}


def profile_for_device(sizes: str, device: torch.device) -> SizeProfile:
    """sizes "auto" picks small on CPU and full elsewhere."""
    if sizes == "auto":
        sizes = "small" if device.type == "cpu" else "full"
    if sizes not in PROFILES:
        raise ValueError(f"sizes: expected one of {['auto', *PROFILES]}, got {sizes!r}")
    return PROFILES[sizes]


def dtype_name(text: str) -> str:
    """Canonical dtype name (fp16, bf16, fp32) for a user's spelling."""
    key = text.strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {text!r}")
    return _DTYPE_ALIASES[key]


def case_id(index: int) -> str:
    """The ID of grid case number index, like "c0042"."""
    return f"c{index:04d}"


def case_index(identifier: str) -> int:
    """The grid index named by a case ID like "c0042"."""
    match = ID_PATTERN.match(identifier.strip())
    if match is None:
        raise ValueError(f"case: expected an ID like c0042, got {identifier!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class Case:
    """One attention problem of the grid, described by plain values (JSON-ready).

    Dense cases have q (batch, heads_q, seqlen_q, head_dim); varlen cases pack
    `batch` sequences of lengths seqlens_q / seqlens_k, and seqlen_q / seqlen_k are
    the longest ones. Paged cases are varlen cases whose keys (seqlens_k of them per
    sequence) live in a paged cache of block_size keys per block (attention_paged;
    checked forward only).
    """

    id: str
    index: int
    seed: int  # seeds the tensors of this case
    dtype: str
    layout: str  # "dense", "varlen" or "paged"
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    seqlens_q: tuple[int, ...] | None = None
    seqlens_k: tuple[int, ...] | None = None
    block_size: int | None = None  # keys per cache block (paged cases)
    causal: bool = False
    causal_alignment: str = "bottom_right"
    window: tuple[int | None, int | None] | None = None
    mask: str | None = None  # "bool" or "additive"
    mask_shape: tuple[int, ...] | None = None  # broadcast to (batch, heads_q, seqlen_q, seqlen_k)
    key_lengths: tuple[int, ...] | None = None
    alibi: str | None = None  # "per_head" (Hq,) or "per_batch" (batch, Hq) slopes
    sinks: str | None = None  # "random": one logit per query head
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    scale: float | None = None
    input_scale: float = 1.0
    query_start: int = 0  # a block of a longer sequence (dense cases)
    key_start: int = 0
    kv_quantized: str | None = None  # "int8" or "float8_e4m3fn": K and V quantized per row
    fully_masked: str | None = None  # how the case makes some rows see no key
    non_contiguous: bool = False
    large: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def features(self, grad: bool) -> frozenset[str]:
        """semantics.FEATURES names this case uses, read from an AttentionCall on the meta
        device (so the names come from semantics.py, not from a copy of its rules)."""
        meta = "meta"
        if self.layout == "paged":
            q = torch.empty(sum(self.seqlens_q), self.heads_q, self.head_dim, device=meta)
            k = torch.empty(1, self.block_size, self.heads_kv, self.head_dim, device=meta)
            v = torch.empty(1, self.block_size, self.heads_kv, self.head_dim_v, device=meta)
            offsets = torch.empty(self.batch + 1, dtype=torch.int32, device=meta)
            table = torch.empty(self.batch, 1, dtype=torch.int32, device=meta)
            varlen = dict(cu_seqlens_q=offsets, block_table=table, cache_lengths=offsets[1:])
            grad = False  # checked forward only
        elif self.layout == "varlen":
            tokens_q, tokens_k = sum(self.seqlens_q), sum(self.seqlens_k)
            q = torch.empty(tokens_q, self.heads_q, self.head_dim, device=meta)
            k = torch.empty(tokens_k, self.heads_kv, self.head_dim, device=meta)
            v = torch.empty(tokens_k, self.heads_kv, self.head_dim_v, device=meta)
            offsets = torch.empty(self.batch + 1, dtype=torch.int32, device=meta)
            varlen = dict(cu_seqlens_q=offsets, cu_seqlens_k=offsets)
        else:
            q = torch.empty(self.batch, self.heads_q, self.seqlen_q, self.head_dim, device=meta)
            k = torch.empty(self.batch, self.heads_kv, self.seqlen_k, self.head_dim, device=meta)
            v = torch.empty(self.batch, self.heads_kv, self.seqlen_k, self.head_dim_v, device=meta)
            varlen = {}
        if self.kv_quantized is not None:
            k, v = (t.to(getattr(torch, self.kv_quantized)) for t in (k, v))
            grad = False  # checked forward only
        mask = None
        if self.mask is not None:
            mask = torch.empty(1, device=meta, dtype=torch.bool if self.mask == "bool" else torch.float32)
        left, right = self.window if self.window is not None else (None, None)
        call = AttentionCall(
            q=q,
            k=k,
            v=v,
            scale=1.0,
            causal=self.causal,
            causal_alignment=self.causal_alignment,  # type: ignore[arg-type]
            attn_mask=mask,
            key_lengths=None if self.key_lengths is None else torch.empty(1, device=meta),
            window_left=left,
            window_right=right,
            alibi_slopes=None if self.alibi is None else torch.empty(1, device=meta),
            sinks=None if self.sinks is None else torch.empty(1, device=meta),
            softcap=self.softcap,
            dropout_p=self.dropout_p,
            query_start=self.query_start,
            key_start=self.key_start,
            needs_grad=grad,
            **varlen,
        )
        return call.features()

    def describe(self) -> str:
        """One short line: dtype, shape and options."""
        heads = f"H{self.heads_q}" if self.heads_q == self.heads_kv else f"H{self.heads_q}/{self.heads_kv}"
        dims = f"D{self.head_dim}" if self.head_dim == self.head_dim_v else f"D{self.head_dim}/{self.head_dim_v}"
        if self.layout == "paged":
            shape = f"paged q{list(self.seqlens_q)} cache{list(self.seqlens_k)} block{self.block_size}"
        elif self.layout == "varlen":
            shape = f"varlen q{list(self.seqlens_q)} k{list(self.seqlens_k)}"
        else:
            shape = f"B{self.batch} Sq{self.seqlen_q} Sk{self.seqlen_k}"
        parts = [self.dtype, shape, heads, dims]
        if self.causal:
            parts.append("causal" + ("" if self.causal_alignment == "bottom_right" else "-top-left"))
        elif self.causal_alignment == "top_left" and (self.window is not None or self.alibi is not None):
            parts.append("top-left")
        if self.window is not None:
            parts.append(f"window{self.window}".replace(" ", ""))
        if self.mask is not None:
            parts.append(f"{self.mask}-mask{list(self.mask_shape)}".replace(" ", ""))
        if self.key_lengths is not None:
            parts.append(f"key_lengths{list(self.key_lengths)}".replace(" ", ""))
        if self.alibi is not None:
            parts.append(f"alibi-{self.alibi}")
        if self.sinks is not None:
            parts.append("sinks")
        if self.softcap is not None:
            parts.append(f"softcap{self.softcap:g}")
        if self.dropout_p:
            parts.append(f"dropout{self.dropout_p:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:.3g}")
        if self.query_start or self.key_start:
            parts.append(f"block@q{self.query_start},k{self.key_start}")
        if self.kv_quantized is not None:
            parts.append(f"kv-{self.kv_quantized}")
        if self.fully_masked is not None:
            parts.append(f"masked-rows:{self.fully_masked}")
        if self.non_contiguous:
            parts.append("non-contiguous")
        return " ".join(parts)


# ---- building one case ------------------------------------------------------------
def _heads_and_batch(rng: random.Random, profile: SizeProfile, ratio: int, large: bool) -> tuple[int, int, int]:
    """(batch, heads_q, heads_kv) with batch * heads_q under the profile's cap."""
    cap = profile.large_max_batch_heads if large else profile.max_batch_heads
    ratio = min(ratio, max(2, cap)) if ratio > 1 else 1
    heads_kv = rng.randint(1, profile.max_heads_kv)
    while heads_kv > 1 and heads_kv * ratio > cap:
        heads_kv -= 1
    batch = rng.randint(1, 4)
    while batch > 1 and batch * heads_kv * ratio > cap:
        batch -= 1
    return batch, heads_kv * ratio, heads_kv


def _window(rng: random.Random) -> tuple[int | None, int | None]:
    left = rng.choice((0, 1, 4, 16, None))
    right = rng.choice((0, 2, 9, None))
    if left is None and right is None:
        left = 3
    return left, right


def _mask_shape(rng: random.Random, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int) -> tuple[int, ...]:
    """A broadcastable mask shape: full, per batch, per head, 2-D, or key padding style."""
    return rng.choice(
        (
            (batch, heads_q, seqlen_q, seqlen_k),
            (batch, 1, seqlen_q, seqlen_k),
            (1, heads_q, seqlen_q, seqlen_k),
            (seqlen_q, seqlen_k),
            (batch, 1, 1, seqlen_k),
        )
    )


# ---- the shared feature-case table as grid options -------------------------------------
_TABLE_MASKS = {"bool": ("bool_mask", None), "bool_every_third_row_empty": ("bool_mask", "mask_row"),
                "additive": ("additive_mask", None)}  # fmt: skip


def _table_entry(name: str) -> tuple[frozenset[str], str | None, dict[str, Any], str | None]:
    """(grid features it turns on, its causal alignment or None, Case fields, fully_masked)
    of FEATURE_CASES[name], whose symbolic values the grid's Case fields share."""
    options = FEATURE_CASES[name]
    on, fields, fully_masked = set(), {}, None
    if options.get("causal"):
        on.add("causal")
    if "window" in options:
        on.add("window")
        fields["window"] = tuple(options["window"])
    if "alibi_slopes" in options:
        on.add("alibi")
        fields["alibi"] = options["alibi_slopes"]
    if "sinks" in options:
        on.add("sinks")
        fields["sinks"] = "random"
    if "softcap" in options:
        on.add("softcap")
        fields["softcap"] = options["softcap"]
    if options.get("dropout_p"):
        on.add("dropout")
        fields["dropout_p"] = options["dropout_p"]
    if "query_start" in options or "key_start" in options:
        on.add("sequence_block")
        fields.update(query_start=options.get("query_start", 0), key_start=options.get("key_start", 0))
    if "attn_mask" in options:
        feature, fully_masked = _TABLE_MASKS[options["attn_mask"]]
        on.add(feature)
    if "key_lengths" in options:
        on.add("key_lengths")
        if options["key_lengths"] == "first_zero":
            fully_masked = "zero_key_length"
    return frozenset(on), options.get("causal_alignment"), fields, fully_masked


def _table_entries_for(focus: str) -> list[str]:
    """The FEATURE_CASES names that use the option feature focus (empty for shape features)."""
    names = []
    for name in FEATURE_CASES:
        on, alignment, _, _ = _table_entry(name)
        if focus.startswith("causal_"):
            if "causal" in on and (alignment or "bottom_right") == focus.removeprefix("causal_"):
                names.append(name)
        elif focus in on:
            names.append(name)
    return names


def make_case(index: int, seed: int, profile: SizeProfile) -> Case:
    """Case number index of the grid for (seed, profile)."""
    if index < 0:
        raise ValueError(f"case index: expected >= 0, got {index}")
    rng = random.Random(f"fusedattn-parity:{seed}:{profile.name}:{index}")
    focus = FOCUS[index % len(FOCUS)]
    on = {name: rng.random() < _DRAW_PROBABILITY for name in _DRAWN}
    on.update(dict.fromkeys(_FORWARD_ONLY, False))
    alignment = rng.choice(("bottom_right", "top_left"))
    if focus.startswith("causal_"):
        on["causal"] = True
        alignment = focus.removeprefix("causal_")
    else:
        on[focus] = True
    # attention_varlen takes no attn_mask or key_lengths; one attn_mask at a time.
    if on["varlen"] and focus in _MASK_FEATURES:
        on["varlen"] = False
    if on["varlen"]:
        for name in _MASK_FEATURES:
            on[name] = False
    table_fields: dict[str, Any] = {}
    table_fully_masked = None
    entries = _table_entries_for(focus)
    if entries and rng.random() < _TABLE_PROBABILITY:
        entry_on, entry_alignment, table_fields, table_fully_masked = _table_entry(rng.choice(entries))
        for name in ("causal", "window", "alibi", "sinks", "softcap", "dropout", "bool_mask", "additive_mask",
                     "key_lengths", "sequence_block"):  # fmt: skip
            on[name] = name in entry_on
        alignment = entry_alignment or "bottom_right"
        if entry_on & set(_MASK_FEATURES):
            on["varlen"] = False
    if focus in ("varlen", "paged_kv"):
        on["sequence_block"] = False  # dense calls only: it would take the focus away
    if on["paged_kv"]:
        # A paged call is a varlen call over a cache, forward only: no masks, no dropout.
        on.update(varlen=True, dropout=False, non_contiguous=False)
    if on["sequence_block"]:
        # Dense calls only, and with a rule that reads positions (else the starts are dropped).
        on.update(varlen=False, paged_kv=False)
        if not any(on[name] for name in _POSITIONAL):
            on["causal"] = True
    if on["varlen"]:
        for name in _MASK_FEATURES:
            on[name] = False
    if on["bool_mask"] and on["additive_mask"]:
        on["bool_mask" if focus == "additive_mask" else "additive_mask"] = False

    large = index % profile.large_every == profile.large_every - 1
    # Shifted once per focus cycle, so every (focus, dtype) pair comes within 3 cycles.
    cycle, position = divmod(index, len(FOCUS))
    dtype = tuple(DTYPES)[(position + cycle) % len(DTYPES)]
    ratio = GQA_RATIOS[(index // len(FOCUS)) % len(GQA_RATIOS)] if on["gqa"] else 1
    batch, heads_q, heads_kv = _heads_and_batch(rng, profile, ratio, large)

    head_dim = HEAD_DIMS[(index * 7) % len(HEAD_DIMS)]
    if rng.random() < 0.15:
        head_dim = rng.choice(ODD_HEAD_DIMS)
    if large:
        head_dim = min(head_dim, profile.large_max_head_dim)
    head_dim_v = head_dim
    if on["value_head_dim"]:
        choices = [d for d in HEAD_DIMS if d != head_dim and (not large or d <= profile.large_max_head_dim)]
        head_dim_v = rng.choice(choices)
    if not large and rng.random() < _WIDE_HEAD_PROBABILITY:
        head_dim, head_dim_v = rng.choice([d for d in WIDE_HEAD_DIMS if (d[0] != d[1]) or not on["value_head_dim"]])

    if large:
        seqlen_q = rng.randint(*profile.large_seqlens) if rng.random() < 0.7 else rng.choice(profile.seqlens)
        seqlen_k = rng.randint(*profile.large_seqlens)
    else:
        seqlen_q = profile.seqlens[index % len(profile.seqlens)]
        seqlen_k = seqlen_q if rng.random() < 0.4 else rng.choice(profile.seqlens)

    fields: dict[str, Any] = {}
    fully_masked = table_fully_masked
    if on["fully_masked"] and fully_masked is None:
        if on["varlen"]:
            # An empty key sequence needs a second sequence that is not empty.
            fully_masked = rng.choice(("empty_key_sequence", "causal_short_keys")) if batch > 1 else "causal_short_keys"
        else:
            fully_masked = rng.choice(("mask_row", "zero_key_length", "causal_short_keys"))
            if fully_masked == "mask_row" and not on["additive_mask"]:
                on["bool_mask"] = True
            if fully_masked == "zero_key_length":
                on["key_lengths"] = True
        if fully_masked == "causal_short_keys":
            # Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key.
            on["causal"], alignment = True, "bottom_right"
            if seqlen_q <= seqlen_k:
                seqlen_q, seqlen_k = max(seqlen_k, 2), max(1, min(seqlen_q, seqlen_k) // 2)
                if seqlen_q <= seqlen_k:
                    seqlen_q = seqlen_k + 1

    if on["varlen"]:
        seqlens_q = [seqlen_q] + [rng.choice(profile.seqlens) for _ in range(batch - 1)]
        seqlens_k = [q_len if rng.random() < 0.5 else rng.choice(profile.seqlens) for q_len in seqlens_q]
        seqlens_k[0] = seqlen_k
        if batch > 1 and rng.random() < 0.15:
            seqlens_q[-1] = 0  # a sequence with no query tokens
        if fully_masked == "empty_key_sequence":
            seqlens_k[rng.randrange(batch)] = 0
            if sum(seqlens_k) == 0:
                seqlens_k[0] = 1
        # seqlens_q[0] >= 1 and some key sequence is non-empty, so the call is never empty.
        fields.update(seqlens_q=tuple(seqlens_q), seqlens_k=tuple(seqlens_k))
        seqlen_q, seqlen_k = max(seqlens_q), max(seqlens_k)
        if on["paged_kv"]:
            fields["block_size"] = rng.choice(PAGED_BLOCK_SIZES)

    if on["bool_mask"] or on["additive_mask"]:
        fields["mask"] = "bool" if on["bool_mask"] else "additive"
        shape = _mask_shape(rng, batch, heads_q, seqlen_q, seqlen_k)
        if fully_masked == "mask_row" and len(shape) == 4 and shape[2] == 1:
            shape = (batch, 1, seqlen_q, seqlen_k)  # a row can only be masked where rows exist
        fields["mask_shape"] = shape
    if on["key_lengths"]:
        lengths = [rng.randint(1, seqlen_k) for _ in range(batch)]
        if fully_masked == "zero_key_length":
            lengths[rng.randrange(batch)] = 0
        fields["key_lengths"] = tuple(lengths)
    if on["window"]:
        fields["window"] = _window(rng)
    if on["alibi"]:
        fields["alibi"] = rng.choice(("per_head", "per_batch"))
    if on["sinks"]:
        fields["sinks"] = "random"
    if on["softcap"]:
        fields["softcap"] = rng.choice((2.0, 10.0, 30.0))
    if on["dropout"]:
        fields["dropout_p"] = rng.choice((0.1, 0.25, 0.5))
        fields["dropout_seed"] = rng.randrange(2**62)
    fields.update(table_fields)  # a table entry's values replace the drawn ones
    if on["sequence_block"] and "query_start" not in table_fields:
        fields.update(query_start=rng.randint(1, 300), key_start=rng.randint(0, 300))
    if on["quantized_kv"]:
        fields["kv_quantized"] = rng.choice(("int8", "float8_e4m3fn"))
    if on["paged_kv"]:
        fields.update(dropout_p=0.0, dropout_seed=None)  # a table entry may carry dropout
    if rng.random() < 0.2:
        fields["scale"] = round(rng.uniform(0.3, 2.0) / math.sqrt(head_dim), 6)
    return Case(
        id=case_id(index),
        index=index,
        seed=rng.randrange(2**31),
        dtype=dtype,
        layout="paged" if on["paged_kv"] else "varlen" if on["varlen"] else "dense",
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        causal=on["causal"],
        causal_alignment=alignment,
        input_scale=rng.choice((1.0, 1.0, 1.0, 3.0)),
        fully_masked=fully_masked,
        non_contiguous=on["non_contiguous"],
        large=large,
        **fields,
    )


_SCAN_LIMIT = 100_000


def select_cases(
    count: int,
    seed: int,
    profile: SizeProfile,
    *,
    dtypes: frozenset[str] | None = None,
    features: frozenset[str] | None = None,
    grad: bool = True,
) -> list[Case]:
    """The first count cases of the grid whose dtype is in dtypes and which use every
    feature in features (None: no filter)."""
    unknown = set(features or ()) - set(FEATURES)
    if unknown:
        raise ValueError(f"features: expected names from {list(FEATURES)}, got {sorted(unknown)}")
    if features and "backward" in features and not grad:
        raise ValueError("features: 'backward' needs --grad")
    if features and "varlen" in features and features & set(_MASK_FEATURES):
        raise ValueError(f"features: varlen cannot combine with {sorted(features & set(_MASK_FEATURES))}")
    if features and {"bool_mask", "additive_mask"} <= features:
        raise ValueError("features: a call has one attn_mask, bool or additive, not both")
    selected: list[Case] = []
    for index in range(_SCAN_LIMIT):
        if len(selected) == count:
            break
        case = make_case(index, seed, profile)
        if dtypes is not None and case.dtype not in dtypes:
            continue
        if features and not features <= case.features(grad):
            continue
        selected.append(case)
    else:
        if len(selected) < count:
            raise ValueError(f"only {len(selected)} of the first {_SCAN_LIMIT} cases match the filters")
    return selected


# ---- tensors ------------------------------------------------------------------------
def _alibi_slopes(case: Case) -> torch.Tensor:
    """Standard ALiBi slopes 2^(-8 (h + 1) / Hq); per batch, scaled per sequence."""
    heads = torch.arange(1, case.heads_q + 1, dtype=torch.float32)
    slopes = torch.pow(2.0, -8.0 * heads / case.heads_q)
    if case.alibi == "per_batch":
        slopes = slopes[None, :] * (1.0 + 0.5 * torch.arange(case.batch, dtype=torch.float32))[:, None]
    return slopes


def _attn_mask(case: Case, generator: torch.Generator) -> torch.Tensor:
    shape = case.mask_shape
    if case.mask == "bool":
        mask = torch.rand(shape, generator=generator) < 0.7
    else:
        mask = torch.randn(shape, generator=generator)
        mask = mask.masked_fill(torch.rand(shape, generator=generator) < 0.1, float("-inf"))
    if case.fully_masked == "mask_row":
        mask = mask.clone()
        row = int(torch.randint(case.seqlen_q, (), generator=generator)) if shape[-2] > 1 else 0
        mask[..., row, :] = False if case.mask == "bool" else float("-inf")
    return mask


def make_inputs(
    case: Case, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(q, k, v, kwargs) for fusedattn.attention, attention_varlen when kwargs hold
    cu_seqlens_q, or attention_paged (k, v the caches) when they also hold block_table. Drawn on the CPU from the case's seed, so every device gets the same
    values; non-contiguous cases get (B, S, H, D) storage viewed as (B, H, S, D)."""
    generator = torch.Generator().manual_seed(case.seed)
    dtype = case.torch_dtype

    def draw(*shape: int, transposed: tuple[int, int]) -> torch.Tensor:
        if not case.non_contiguous:
            return (torch.randn(shape, generator=generator) * case.input_scale).to(dtype).to(device)
        # A slice of a wider buffer stored in another dim order, like q, k and v cut from
        # a packed QKV projection: non-dense, and the sequence is not the outer dim.
        first, second = transposed
        storage_shape = list(shape)
        storage_shape[first], storage_shape[second] = storage_shape[second], storage_shape[first]
        storage_shape[-1] += _HEAD_DIM_PADDING
        storage = (torch.randn(storage_shape, generator=generator) * case.input_scale).to(dtype).to(device)
        return storage[..., : shape[-1]].transpose(first, second)

    options: dict[str, Any] = {}
    if case.layout == "paged":
        (q, k, v), paged = paged_case(
            case.seqlens_q, case.seqlens_k, block_size=case.block_size, heads_q=case.heads_q,
            heads_kv=case.heads_kv, head_dim=case.head_dim, head_dim_v=case.head_dim_v, generator=generator,
        )  # fmt: skip
        q, k, v = ((t * case.input_scale).to(dtype).to(device) for t in (q, k, v))
        options.update({name: value.to(device) if isinstance(value, torch.Tensor) else value
                        for name, value in paged.items()})  # fmt: skip
    elif case.layout == "varlen":
        tokens_q, tokens_k = sum(case.seqlens_q), sum(case.seqlens_k)
        q = draw(tokens_q, case.heads_q, case.head_dim, transposed=(0, 1))
        k = draw(tokens_k, case.heads_kv, case.head_dim, transposed=(0, 1))
        v = draw(tokens_k, case.heads_kv, case.head_dim_v, transposed=(0, 1))
        offsets_q = torch.tensor([0, *torch.tensor(case.seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
        offsets_k = torch.tensor([0, *torch.tensor(case.seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
        options.update(
            cu_seqlens_q=offsets_q.to(device),
            cu_seqlens_k=offsets_k.to(device),
            max_seqlen_q=case.seqlen_q,
            max_seqlen_k=case.seqlen_k,
        )
    else:
        q = draw(case.batch, case.heads_q, case.seqlen_q, case.head_dim, transposed=(1, 2))
        k = draw(case.batch, case.heads_kv, case.seqlen_k, case.head_dim, transposed=(1, 2))
        v = draw(case.batch, case.heads_kv, case.seqlen_k, case.head_dim_v, transposed=(1, 2))
        if case.mask is not None:
            mask = _attn_mask(case, generator)
            options["attn_mask"] = (mask if case.mask == "bool" else mask.to(dtype)).to(device)
        if case.key_lengths is not None:
            options["key_lengths"] = torch.tensor(case.key_lengths, dtype=torch.int32, device=device)
    if case.causal:
        options["causal"] = True
    options["causal_alignment"] = case.causal_alignment
    if case.window is not None:
        options["window"] = case.window
    if case.alibi is not None:
        options["alibi_slopes"] = _alibi_slopes(case).to(device)
    if case.sinks is not None:
        # Their own generator: the other tensors of a case stay what they were without sinks.
        sink_generator = torch.Generator().manual_seed(case.seed + 1)
        options["sinks"] = (2.0 * torch.randn(case.heads_q, generator=sink_generator)).to(device)
    if case.softcap is not None:
        options["softcap"] = case.softcap
    if case.dropout_p:
        options.update(dropout_p=case.dropout_p, dropout_seed=case.dropout_seed)
    if case.scale is not None:
        options["scale"] = case.scale
    if case.query_start or case.key_start:
        options.update(query_start=case.query_start, key_start=case.key_start)
    if case.kv_quantized is not None:
        # One scale per row (token and head), as fusedattn.quantize_kv makes a cache; a paged
        # cache's storage rows keep NaN scales (quantize_test_cache).
        kv_dtype = getattr(torch, case.kv_quantized)
        (k, options["k_descale"]), (v, options["v_descale"]) = (quantize_test_cache(t, kv_dtype) for t in (k, v))
    return q, k, v, options
