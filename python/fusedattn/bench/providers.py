"""The implementations a benchmark compares: every fusedattn backend, torch SDPA (and on
CUDA each SDPA backend separately), a naive eager implementation, and flash-attn and
xformers when they are installed.

A provider turns a case's canonical inputs into a :class:`Prepared` call, or raises
:class:`Skip` with the reason it cannot run the case. Layout changes, padding and dense
masks a provider needs are made once in prepare(), outside the timed region.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import dispatch, semantics
from ..api import attention, attention_varlen
from ..validation import validate_attention, validate_varlen
from .cases import Case

BASELINE = "sdpa"
"""The provider every speedup is measured against: torch's own SDPA dispatch."""


class Skip(Exception):
    """A provider cannot run a case; the message is the reason."""


# ---- inputs ------------------------------------------------------------------------
@dataclass
class CaseInputs:
    """A case's tensors in fusedattn's layout, shared by every provider (none requires grad).

    Dense: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); varlen: q (T, Hq, D),
    k (T, Hkv, D), v (T, Hkv, Dv) with cu_seqlens (N + 1,) int32 for both queries and keys.
    attn_mask: bool (B, 1, 1, Sk) key padding, or additive (1, 1, Sq, Sk) in the input dtype.
    """

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    def fusedattn_options(self) -> dict[str, Any]:
        """Keyword arguments of fusedattn.attention / attention_varlen for this case."""
        options: dict[str, Any] = {"causal": self.case.causal}
        if self.case.window is not None:
            options["window"] = self.case.window
        if self.case.softcap is not None:
            options["softcap"] = self.case.softcap
        if self.alibi_slopes is not None:
            options["alibi_slopes"] = self.alibi_slopes
        if self.attn_mask is not None:
            options["attn_mask"] = self.attn_mask
        return options


def alibi_slopes(heads: int) -> torch.Tensor:
    """The usual ALiBi slopes 2^(-8 (h + 1) / H), float32 (H,)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """Random normal q, k, v (and the case's mask, slopes, offsets) on device, reproducibly."""
    # Drawn on the device itself: 16k-token GPU cases would take seconds to draw on the CPU.
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    cu_seqlens = None
    if case.varlen_seqlens is not None:
        total = sum(case.varlen_seqlens)
        q = randn(total, case.heads_q, case.head_dim)
        k = randn(total, case.heads_kv, case.head_dim)
        v = randn(total, case.heads_kv, case.head_dim_v)
        offsets = [0]
        for length in case.varlen_seqlens:
            offsets.append(offsets[-1] + length)
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    else:
        q = randn(case.batch, case.heads_q, case.seqlen_q, case.head_dim)
        k = randn(case.batch, case.heads_kv, case.seqlen_k, case.head_dim)
        v = randn(case.batch, case.heads_kv, case.seqlen_k, case.head_dim_v)
    attn_mask = None
    if case.mask == "bool":
        lengths = torch.tensor([case.key_length(b) for b in range(case.batch)])
        attn_mask = (torch.arange(case.seqlen_k)[None, :] < lengths[:, None])[:, None, None, :].to(device)
    elif case.mask == "additive":
        attn_mask = randn(1, 1, case.seqlen_q, case.seqlen_k)
    slopes = alibi_slopes(case.heads_q).to(device) if case.alibi else None
    return CaseInputs(case, q, k, v, attn_mask=attn_mask, alibi_slopes=slopes, cu_seqlens=cu_seqlens)


# ---- what a provider returns --------------------------------------------------------
def _same(gradients: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return gradients


@dataclass
class Prepared:
    """A ready-to-time call.

    forward() returns the output in the case's layout ((B, Hq, Sq, Dv) or (T, Hq, Dv)).
    leaves are the provider's own input tensors (they receive the gradients);
    canonical_grads maps their gradients back to the case's layout.
    context() is entered around every call (for example sdpa_kernel for one SDPA backend).
    """

    forward: Callable[[], torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    canonical_grads: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] = _same
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    # Seconds prepare() spent compiling (torch.compile's first calls), never in the timings.
    compile_s: float | None = None


@dataclass(frozen=True)
class Provider:
    """One implementation to compare. availability(device) says whether it exists here at all."""

    name: str
    kind: str  # "fusedattn", "torch", "eager" or "external"
    description: str
    prepare: Callable[[CaseInputs], Prepared]
    availability: Callable[[torch.device], tuple[bool, str]] = field(default=lambda device: (True, ""))
    default_devices: frozenset[str] = frozenset({"cpu", "cuda"})


def _leaves(inputs: CaseInputs, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fresh leaves sharing storage with tensors, requiring grad when the case has a backward."""
    return tuple(t.detach().requires_grad_(inputs.case.needs_grad) for t in tensors)


# ---- fusedattn backends ------------------------------------------------------------
def _fusedattn_provider(backend_name: str) -> Provider:
    backend = dispatch.registry()[backend_name]

    def prepare(inputs: CaseInputs) -> Prepared:
        case = inputs.case
        if inputs.device.type == "cpu" and "triton" in backend_name:
            raise Skip("Triton on CPU runs only under TRITON_INTERPRET=1, far too slow to benchmark")
        q, k, v = _leaves(inputs, inputs.q, inputs.k, inputs.v)
        options = inputs.fusedattn_options()
        with torch.enable_grad():
            if case.varlen_seqlens is not None:
                varlen = (inputs.cu_seqlens, inputs.cu_seqlens, case.seqlen_q, case.seqlen_k)
                call = validate_varlen(q, k, v, *varlen, **options)
            else:
                call = validate_attention(q, k, v, **options)
        reason = dispatch.refusal(backend, call)
        if reason is not None:
            raise Skip(reason)
        if case.varlen_seqlens is not None:
            return Prepared(lambda: attention_varlen(q, k, v, *varlen, backend=backend_name, **options), (q, k, v))
        return Prepared(lambda: attention(q, k, v, backend=backend_name, **options), (q, k, v))

    def availability(device: torch.device) -> tuple[bool, str]:
        available, reason = backend.availability()
        if not available:
            return False, reason
        if device.type not in backend.capabilities.devices:
            return False, f"device {device.type!r} is not supported"
        return True, ""

    return Provider(
        name=f"fusedattn:{backend_name}",
        kind="fusedattn",
        description=backend.description or f"fusedattn backend {backend_name!r}",
        prepare=prepare,
        availability=availability,
        # The reference is the oracle (the naive algorithm in float32): opt in with --providers.
        default_devices=frozenset() if backend_name == "reference" else frozenset({"cpu", "cuda"}),
    )


# ---- dense masks for the providers without native features ------------------------------
@dataclass
class _Padding:
    """Varlen tokens scattered into a padded batch (N, Hq, S_max, D) and gathered back."""

    sequence: torch.Tensor  # (T,) sequence of each token
    row: torch.Tensor  # (T,) index of the token within its sequence

    @classmethod
    def of(cls, case: Case, device: torch.device) -> _Padding:
        lengths = torch.tensor(case.varlen_seqlens)
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        row = torch.arange(int(lengths.sum())) - starts[sequence]
        return cls(sequence.to(device), row.to(device))

    def pad(self, packed: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        """(T, H, D) -> (N, H, S_max, D), zeros in the padding."""
        padded = packed.new_zeros(batch, seqlen, *packed.shape[1:])
        padded[self.sequence, self.row] = packed
        return padded.transpose(1, 2).contiguous()

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(N, H, S_max, D) -> (T, H, D)."""
        return padded.transpose(1, 2)[self.sequence, self.row]


def dense_masks(inputs: CaseInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(allowed, bias) expressing the case's causal/window/padding/ALiBi/mask rules densely.

    allowed: bool broadcastable to (B, Hq, Sq, Sk), True = attend; bias: additive in the input
    dtype, broadcastable likewise. Varlen cases describe the padded batch; padding query rows
    see key 0 so that they stay finite (their outputs are discarded).
    """
    case = inputs.case
    device = inputs.device
    visible = semantics.visible_keys(
        case.seqlen_q,
        case.seqlen_k,
        causal=case.causal,
        alignment="bottom_right",
        window_left=None if case.window is None else case.window[0],
        window_right=None if case.window is None else case.window[1],
        device=device,
    )
    allowed = None if visible is None else visible[None, None]
    if case.mask == "bool":
        allowed = inputs.attn_mask if allowed is None else allowed & inputs.attn_mask
    if case.varlen_seqlens is not None:
        lengths = torch.tensor(case.varlen_seqlens, device=device)
        key = torch.arange(case.seqlen_k, device=device)
        in_sequence = key[None, :] < lengths[:, None]  # (N, S_max)
        padding_row = ~in_sequence[:, :, None] & (key == 0)[None, None, :]  # (N, S_max, S_max)
        real = in_sequence[:, None, :] & in_sequence[:, :, None]
        if visible is not None:
            real = real & visible[None]
        allowed = (real | padding_row)[:, None]
    bias = None
    if inputs.alibi_slopes is not None:
        bias = semantics.alibi_bias(inputs.alibi_slopes, case.seqlen_q, case.seqlen_k, "bottom_right")[None]
    if case.mask == "additive":
        bias = inputs.attn_mask.float() if bias is None else bias + inputs.attn_mask.float()
    return allowed, None if bias is None else bias.to(case.torch_dtype)


def _dense_inputs(
    inputs: CaseInputs,
) -> tuple[tuple[torch.Tensor, ...], Callable[[torch.Tensor], torch.Tensor], Callable]:
    """Leaves in (B, H, S, D) layout, the output gather, and the gradient gather (padding for varlen)."""
    case = inputs.case
    if case.varlen_seqlens is None:
        return _leaves(inputs, inputs.q, inputs.k, inputs.v), lambda out: out, _same
    padding = _Padding.of(case, inputs.device)
    padded = [padding.pad(t, case.batch, case.seqlen_q) for t in (inputs.q, inputs.k, inputs.v)]
    return _leaves(inputs, *padded), padding.unpad, lambda grads: tuple(padding.unpad(g) for g in grads)


# ---- torch SDPA --------------------------------------------------------------------
SDPA_VARIANTS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}  # fmt: skip


def _sdpa_provider(variant: str | None) -> Provider:
    name = BASELINE if variant is None else f"{BASELINE}:{variant}"

    def prepare(inputs: CaseInputs) -> Prepared:
        case = inputs.case
        if case.softcap is not None:
            raise Skip("softcap: torch SDPA has no softcap (and a dense mask cannot express one)")
        (q, k, v), gather, gather_grads = _dense_inputs(inputs)
        options: dict[str, Any] = {"enable_gqa": case.heads_q != case.heads_kv}
        plain = case.window is None and case.mask is None and not case.alibi and case.varlen_seqlens is None
        note = ""
        if plain and case.causal and case.seqlen_q == case.seqlen_k:
            options["is_causal"] = True
        elif plain and case.causal:
            from torch.nn.attention.bias import causal_lower_right

            options["attn_mask"] = causal_lower_right(case.seqlen_q, case.seqlen_k)
        elif not plain or case.causal:
            allowed, bias = dense_masks(inputs)
            if bias is None:
                options["attn_mask"] = allowed
            else:
                options["attn_mask"] = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
            note = "features as a dense mask built outside the timed region"
        if case.varlen_seqlens is not None:
            note = "varlen as a padded batch with a dense mask (padding made outside the timed region)"
        function = torch.nn.functional.scaled_dot_product_attention
        context = contextlib.nullcontext
        if variant is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, SDPA_VARIANTS[variant])
            context = lambda: sdpa_kernel([backend])  # noqa: E731

        return Prepared(lambda: gather(function(q, k, v, **options)), (q, k, v), gather_grads, context, note)

    def availability(device: torch.device) -> tuple[bool, str]:
        if variant is None or device.type == "cuda" or variant == "math":
            return True, ""
        return False, f"SDPA's {variant} backend runs only on CUDA here"

    description = "torch.nn.functional.scaled_dot_product_attention" + (
        "" if variant is None else f" forced to its {variant} backend (torch.nn.attention.sdpa_kernel)"
    )
    return Provider(
        name=name,
        kind="torch",
        description=description,
        prepare=prepare,
        availability=availability,
        default_devices=frozenset({"cpu", "cuda"}) if variant is None else frozenset({"cuda"}),
    )


# ---- naive eager -------------------------------------------------------------------
def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The textbook implementation, as model code writes it: K/V heads expanded, the full
    (Sq, Sk) score matrix, softmax in float32. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probabilities, v)


def _naive_provider() -> Provider:
    def prepare(inputs: CaseInputs) -> Prepared:
        case = inputs.case
        (q, k, v), gather, gather_grads = _dense_inputs(inputs)
        allowed, bias = dense_masks(inputs)
        scale = 1.0 / math.sqrt(case.head_dim)

        def forward() -> torch.Tensor:
            out = naive_attention(q, k, v, scale=scale, softcap=case.softcap, allowed=allowed, bias=bias)
            return gather(out)

        return Prepared(forward, (q, k, v), gather_grads)

    return Provider("naive", "eager", "plain matmul-softmax-matmul in eager PyTorch (softmax in float32)", prepare)


# ---- optional external libraries ---------------------------------------------------
def _module_available(module: str) -> Callable[[torch.device], tuple[bool, str]]:
    def availability(device: torch.device) -> tuple[bool, str]:
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed"
        if device.type != "cuda":
            return False, f"{module} runs only on CUDA"
        return True, ""

    return availability


def _half_precision_only(case: Case, library: str) -> None:
    if case.dtype not in ("float16", "bfloat16"):
        raise Skip(f"dtype {case.dtype}: {library} supports float16 and bfloat16 only")


def _flash_attn_provider() -> Provider:
    def prepare(inputs: CaseInputs) -> Prepared:
        import flash_attn

        case = inputs.case
        _half_precision_only(case, "flash-attn")
        if case.mask is not None:
            raise Skip(f"mask {case.mask}: flash-attn takes no attention mask")
        if case.head_dim != case.head_dim_v:
            raise Skip("Dv != D: flash-attn 2 needs equal head dims")
        options: dict[str, Any] = {"causal": case.causal}
        if case.window is not None:
            options["window_size"] = tuple(-1 if side is None else side for side in case.window)
        if case.softcap is not None:
            options["softcap"] = case.softcap
        if inputs.alibi_slopes is not None:
            options["alibi_slopes"] = inputs.alibi_slopes
        if case.varlen_seqlens is not None:
            q, k, v = _leaves(inputs, inputs.q, inputs.k, inputs.v)
            varlen = (inputs.cu_seqlens, inputs.cu_seqlens, case.seqlen_q, case.seqlen_k)
            return Prepared(lambda: flash_attn.flash_attn_varlen_func(q, k, v, *varlen, **options), (q, k, v))
        # flash-attn's layout is (B, S, H, D): transpose once here, and the output back as a view.
        q, k, v = _leaves(inputs, *(t.transpose(1, 2).contiguous() for t in (inputs.q, inputs.k, inputs.v)))
        return Prepared(
            lambda: flash_attn.flash_attn_func(q, k, v, **options).transpose(1, 2),
            (q, k, v),
            lambda grads: tuple(g.transpose(1, 2) for g in grads),
        )

    return Provider("flash-attn", "external", "flash_attn.flash_attn_func / flash_attn_varlen_func", prepare,
                    _module_available("flash_attn"))  # fmt: skip


def _xformers_provider() -> Provider:
    def prepare(inputs: CaseInputs) -> Prepared:
        import xformers.ops as xops

        case = inputs.case
        _half_precision_only(case, "xformers")
        unsupported = [name for name, used in (("varlen", case.varlen_seqlens is not None),
                       ("window", case.window is not None), ("softcap", case.softcap is not None),
                       ("alibi", case.alibi), ("mask", case.mask is not None),
                       ("gqa", case.heads_q != case.heads_kv)) if used]  # fmt: skip
        if unsupported:
            raise Skip(f"{', '.join(unsupported)}: not wired for xformers in this benchmark")
        bias = None
        if case.causal:
            bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
        q, k, v = _leaves(inputs, *(t.transpose(1, 2).contiguous() for t in (inputs.q, inputs.k, inputs.v)))
        return Prepared(
            lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2),
            (q, k, v),
            lambda grads: tuple(g.transpose(1, 2) for g in grads),
        )

    return Provider("xformers", "external", "xformers.ops.memory_efficient_attention", prepare,
                    _module_available("xformers"))  # fmt: skip


# ---- FlexAttention ---------------------------------------------------------------------
def _flex_provider() -> Provider:
    """torch.nn.attention.flex_attention under torch.compile, each case's rules written as
    FlexAttention users write them: causal, window, key padding and packed documents as a
    block mask (built outside the timed region), softcap, ALiBi and an additive bias as a
    score_mod. Compiling happens in prepare(): its time is reported apart (compile_s)."""

    def prepare(inputs: CaseInputs) -> Prepared:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        case, device = inputs.case, inputs.device
        if case.varlen_seqlens is not None:
            # Packed sequences as one batch of T tokens; a token sees only its own document.
            q, k, v = _leaves(inputs, *(t.transpose(0, 1)[None] for t in (inputs.q, inputs.k, inputs.v)))
            lengths = torch.tensor(case.varlen_seqlens, device=device)
            document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
            batch, seqlen_q, seqlen_k, offset = 1, q.shape[2], k.shape[2], 0

            def gather(out: torch.Tensor) -> torch.Tensor:
                return out[0].transpose(0, 1)

            def gather_grads(grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                return tuple(g[0].transpose(0, 1) for g in grads)
        else:
            q, k, v = _leaves(inputs, inputs.q, inputs.k, inputs.v)
            document = None
            batch, seqlen_q, seqlen_k = case.batch, case.seqlen_q, case.seqlen_k
            offset = seqlen_k - seqlen_q  # bottom-right: query i at key position i + Sk - Sq
            gather, gather_grads = (lambda out: out), _same
        key_lengths = None
        if case.mask == "bool":
            key_lengths = torch.tensor([case.key_length(b) for b in range(case.batch)], device=device)
        left, right = case.window if case.window is not None else (None, None)
        masked = case.causal or case.window is not None or key_lengths is not None or document is not None

        def mask_mod(b, h, query, key):
            position = query + offset
            allowed = key >= 0
            if document is not None:
                allowed = allowed & (document[query] == document[key])
            if key_lengths is not None:
                allowed = allowed & (key < key_lengths[b])
            if case.causal:
                allowed = allowed & (key <= position)
            if left is not None:
                allowed = allowed & (key >= position - left)
            if right is not None:
                allowed = allowed & (key <= position + right)
            return allowed

        slopes, bias, cap = inputs.alibi_slopes, None, case.softcap
        if case.mask == "additive":
            bias = inputs.attn_mask[0, 0]

        def score_mod(score, b, h, query, key):
            if cap is not None:
                score = cap * torch.tanh(score / cap)
            if slopes is not None:
                score = score - slopes[h] * torch.abs(query + offset - key)
            if bias is not None:
                score = score + bias[query, key]
            return score

        block_mask = create_block_mask(mask_mod, batch, None, seqlen_q, seqlen_k, device=device) if masked else None
        uses_scores = cap is not None or slopes is not None or bias is not None
        compiled = torch.compile(flex_attention, dynamic=False)
        options = dict(block_mask=block_mask, score_mod=score_mod if uses_scores else None,
                       enable_gqa=case.heads_q != case.heads_kv)  # fmt: skip

        def forward() -> torch.Tensor:
            return gather(compiled(q, k, v, **options))

        start = time.perf_counter()
        out = forward()
        if case.needs_grad:  # the backward compiles on its first call too
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        compile_s = time.perf_counter() - start
        note = f"compiled in {compile_s:.1f} s (first calls, not timed)"
        return Prepared(forward, (q, k, v), gather_grads, note=note, compile_s=compile_s)

    def availability(device: torch.device) -> tuple[bool, str]:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return False, "this torch has no torch.nn.attention.flex_attention"
        return True, ""

    # On CPU each case compiles for several seconds (C++ through inductor): asked for by
    # name there (--providers flex_attention), run by default on CUDA.
    return Provider("flex_attention", "torch", "torch.compile(flex_attention) with a block mask and score_mod",
                    prepare, availability, default_devices=frozenset({"cuda"}))  # fmt: skip


# ---- the catalog -------------------------------------------------------------------
def all_providers() -> list[Provider]:
    """Every provider known to this process (available or not), fusedattn backends first."""
    providers = [_fusedattn_provider(name) for name in dispatch.registry()]
    providers.append(_sdpa_provider(None))
    providers += [_sdpa_provider(variant) for variant in SDPA_VARIANTS]
    providers += [_flex_provider(), _naive_provider(), _flash_attn_provider(), _xformers_provider()]
    return providers


def select_providers(device: torch.device, patterns: list[str] | None = None) -> list[Provider]:
    """The providers to run: those matching patterns (names or globs such as "fusedattn:*"),
    or by default every provider meant for this device that is available.

    Raises ValueError for a pattern that matches no provider.
    """
    catalog = all_providers()
    if not patterns:
        return [p for p in catalog if device.type in p.default_devices and p.availability(device)[0]]
    chosen: list[Provider] = []
    for pattern in patterns:
        matches = [p for p in catalog if fnmatch.fnmatchcase(p.name, pattern)]
        if not matches:
            raise ValueError(f"--providers: {pattern!r} matches no provider; known: {[p.name for p in catalog]}")
        chosen += [p for p in matches if p not in chosen]
    return chosen
