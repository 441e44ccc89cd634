"""fusedattn.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict.

torch's module is the oracle: run in float64 for the result, in the input dtype for the
same-precision error (fusedattn.testing's 2x rule), and for refusals (raising the same
exception class as torch counts as a refusal). One documented difference: a query whose
keys are all masked gives NaN in torch and a finite result in fusedattn; those rows must
be finite and are not compared.
"""

from __future__ import annotations

import copy
from typing import Any

import fusedattn.nn
import torch
from hypothesis import strategies as st

from . import faults as fl
from .case import Case, flags
from .oracle import compare, first_failure
from .problem import BACKENDS

NAMES = ("query", "key", "value")


def _mask(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    if draw(st.booleans()):
        return hidden  # bool: True = ignore, torch's convention
    return torch.zeros(shape, dtype=dtype).masked_fill(hidden, float("-inf"))


@st.composite
def multihead_cases(draw: st.DrawFn) -> Case:
    heads, head_dim = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 4, 8, 16]))
    embed = heads * head_dim
    kdim, vdim = draw(st.sampled_from([None, None, 5])), draw(st.sampled_from([None, None, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    backend = draw(st.sampled_from(BACKENDS))
    if backend == "cpu" and dtype == torch.float64:
        backend = "reference"  # forcing cpu for float64 is tested on fusedattn.attention
    options = dict(bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()), add_zero_attn=draw(st.booleans()),
                   kdim=kdim, vdim=vdim, batch_first=draw(st.booleans()), dtype=dtype)  # fmt: skip
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    reference = torch.nn.MultiheadAttention(embed, heads, **options).eval()
    module = fusedattn.nn.MultiheadAttention(embed, heads, **options).eval()
    module.load_state_dict(reference.state_dict())
    batch, target, source = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 7))
    batched = draw(st.integers(0, 3)) != 0
    generator = torch.Generator().manual_seed(seed)

    def inputs(length: int, features: int) -> torch.Tensor:
        shape = (batch, length, features) if options["batch_first"] else (length, batch, features)
        return torch.randn(shape if batched else (length, features), generator=generator).to(dtype)

    query = inputs(target, embed)
    if kdim is None and vdim is None and draw(st.booleans()):
        key = value = query  # self-attention: the module's packed projection
        source = target
    else:
        key, value = inputs(source, kdim or embed), inputs(source, vdim or embed)
    values: dict[str, Any] = {"query": query, "key": key, "value": value}
    if draw(st.booleans()):
        values["key_padding_mask"] = _mask(draw, (batch, source) if batched else (source,), dtype, seed + 1)
    mask_kind = draw(st.sampled_from(["none", "none", "2d", "3d", "causal"]))
    if mask_kind == "2d":
        values["attn_mask"] = _mask(draw, (target, source), dtype, seed + 2)
    elif mask_kind == "3d":  # (batch * heads, L, S); unbatched (heads, L, S)
        values["attn_mask"] = _mask(draw, ((batch if batched else 1) * heads, target, source), dtype, seed + 3)
    elif mask_kind == "causal":
        values["attn_mask"] = torch.ones(target, source, dtype=torch.bool).triu(1)
        values["is_causal"] = True
    values["need_weights"] = draw(st.booleans())
    if values["need_weights"]:
        values["average_attn_weights"] = draw(st.booleans())
    arguments = fl.Arguments(values, NAMES)
    faults = [
        fl.resize("query", -1, lambda n: [n + 1]), fl.resize("key", -1, lambda n: [n + 2]), fl.wrong_dtype(NAMES),
        fl.wrong_rank(NAMES), fl.option("is_causal", [True]) if "attn_mask" not in values else fl.wrong_rank(NAMES),
        _mask_fault("key_padding_mask", (batch, source + 1) if batched else (source + 1,),
                    (batch, source) if batched else (source,)),
        _mask_fault("attn_mask", (target + 1, source), (target, source)),
    ]  # fmt: skip
    if batched:
        faults.append(fl.resize("key", 0 if options["batch_first"] else 1, lambda n: [n + 1], also=("value",)))
    from .dense import _pick_fault

    fault_target, fault = _pick_fault(draw, faults, arguments)
    args, kwargs = arguments.split()

    def run_torch() -> BaseException | None:
        # In the grad mode fusedattn's module runs in (parameters requiring grad): under
        # no_grad torch takes its fast path, which refuses some inputs with other classes.
        try:
            with torch.enable_grad():
                reference(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (torch's refusal, whatever its class)
            return error
        return None

    # torch decides what is a fault: a drawn fault torch accepts (a mask shape that
    # broadcasts, say) makes a valid case, judged on its result; a valid draw torch refuses
    # must be refused with torch's exception class.
    torch_error = run_torch()
    if fault_target is not None and torch_error is None:
        fault_target, fault = None, None

    def torch_oracle() -> BaseException | None:
        return torch_error

    features = {f"mask_{mask_kind}", "batched" if batched else "unbatched", str(dtype).removeprefix("torch.")}
    features |= {name for name in ("add_bias_kv", "add_zero_attn", "batch_first") if options[name]}
    features |= flags(
        key_padding_mask="key_padding_mask" in values,
        kdim=kdim is not None,
        need_weights=values["need_weights"],
        self_attention=key is query,
    )
    return Case(entry="MultiheadAttention", function=module, args=args, kwargs=kwargs, backend=backend,
                backend_by_environment=True, check=lambda result: _check(reference, args, kwargs, result),
                features=frozenset(features), target=fault_target, fault=fault, torch_oracle=torch_oracle,
                same_class_as_torch=True)  # fmt: skip


def _mask_fault(name: str, bad_shape: tuple[int, ...], good_shape: tuple[int, ...]) -> fl.Fault:
    def fault(draw: st.DrawFn, a: fl.Arguments) -> tuple[str, str]:
        if draw(st.booleans()):
            a.values[name] = torch.zeros(bad_shape, dtype=torch.bool)
            return name, f"shape {bad_shape}"
        a.values[name] = torch.zeros(good_shape, dtype=torch.int32)
        return name, "dtype torch.int32"

    return fault


def _check(reference: torch.nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any],
           result: Any) -> str | None:  # fmt: skip
    dtype = args[0].dtype
    wide_module = copy.deepcopy(reference).double()
    wide_args = tuple(a.double() for a in args)
    wide_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
                   for k, v in kwargs.items()}  # fmt: skip
    with torch.enable_grad():  # torch's general path, as fusedattn's call (not the no_grad fast path)
        oracle = wide_module(*wide_args, **wide_kwargs)
        lowprec = reference(*args, **kwargs)
    out, weights = result
    failures = [_compare_rows("attn_output", out, oracle[0], lowprec[0], dtype)]
    if kwargs.get("need_weights"):
        failures.append(_compare_rows("attn_weights", weights, oracle[1], lowprec[1], dtype))
    elif weights is not None:
        failures.append("attn_weights: expected None with need_weights=False")
    return first_failure(*failures)


def _compare_rows(
    name: str, actual: Any, oracle: torch.Tensor, lowprec: torch.Tensor, dtype: torch.dtype
) -> str | None:
    """compare(), except where torch's float64 result is NaN (a query with every key masked):
    there fusedattn must be finite, and is not compared."""
    if not isinstance(actual, torch.Tensor) or actual.shape != oracle.shape:
        return compare(name, actual, oracle, lowprec, dtype)
    torch_nan = torch.isnan(oracle)
    if bool((torch_nan & torch.isnan(actual)).any()):
        return f"{name}: NaN where every key is masked (fusedattn gives a finite result there by design)"
    actual = actual.masked_fill(torch_nan, 0.0)
    return compare(name, actual, oracle.masked_fill(torch_nan, 0.0), lowprec.masked_fill(torch_nan, 0.0), dtype,
                   expected_dtype=dtype)  # fmt: skip
