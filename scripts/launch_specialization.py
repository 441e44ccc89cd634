"""How a real Triton launch specializes a kernel's arguments, for compiling it without a GPU
(scripts/device_compile_check.py): the signature, constants and divisibility attributes the
JIT binder gives each argument, by Triton's own rules where the installed Triton exposes
them, else the same rules by hand."""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget


# ---- specialization ------------------------------------------------------------------------
def _backend(capability: int):
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


def _parse_attr(backend, desc: str) -> list:
    # Triton 3.3+ (3.6 and 3.9 alike): ASTSource attrs map a parameter's path (index,) to
    # backend.parse_attr(desc), desc "D" for "divisible by 16", i.e. [["tt.divisibility", 16]].
    if hasattr(backend, "parse_attr"):
        return backend.parse_attr(desc)
    return [["tt.divisibility", 16]] if "D" in desc else []


def _specialize_value(backend, value, is_const: bool, specialize: bool, align: bool) -> tuple[str, object]:
    """(type, desc) the JIT's binder computes for a runtime argument; desc is "D"
    (divisible by 16), "" or None (not specialized), or the value of a constexpr."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # not in this Triton: the same rules by hand
        native_specialize_impl = None
    if isinstance(value, torch.Tensor):
        if native_specialize_impl is not None:
            kind = native_specialize_impl(type(backend), value, is_const, False, False)[0]
        else:
            kind = ("*k" if is_const else "*") + _TYPE_NAMES[value.dtype]
        if not specialize:
            return kind, None
        # CUDA allocations are aligned far beyond 16 bytes: the offset into the storage decides.
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return kind, "D" if align and aligned else ""
    if native_specialize_impl is not None:
        return native_specialize_impl(type(backend), value, is_const, specialize, align)
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        desc = ("D" if align and value % 16 == 0 else "") if specialize else None
        if -(2**31) <= value < 2**31:
            return "i32", desc
        return ("u64" if value >= 2**63 else "i64"), desc
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"unsupported argument {type(value).__name__}")


_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "u1",
    torch.uint8: "u8",
}


def specialize(fn, arguments: dict, backend, enabled: bool = True) -> tuple[dict, dict, dict]:
    """(signature, constants, attrs) for ASTSource(fn, ...), as a real launch with these
    arguments gets them (enabled=False: no divisibility hints, only the constexpr 1s)."""
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name, value = param.name, arguments[param.name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", value
            continue
        do_specialize = not param.do_not_specialize
        kind, desc = _specialize_value(
            backend, value, param.is_const, do_specialize, enabled and not param.do_not_specialize_on_alignment
        )
        annotation = getattr(param, "annotation_type", "")
        if annotation and kind != "constexpr":
            # The JIT does not specialize non-constexpr floats and bools with an annotation.
            if annotation == "u1" or annotation[:2] in ("fp", "bf") or not do_specialize:
                desc = None
            kind = annotation
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = desc
        elif isinstance(desc, str) and desc:
            attrs[(index,)] = _parse_attr(backend, desc)
    return signature, constants, attrs


def jit_specialization(fn, arguments: dict, options: dict, backend):
    """(signature, constants, attrs) from the installed Triton's own JIT binder (private
    API: None where it is missing or differs)."""
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, backend)
        call = {param.name: arguments[param.name] for param in fn.params}
        bound, specialization, _ = binder(**call, **options)
        _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, {})
    except Exception:  # noqa: BLE001 - any change of the private API
        return None
    constants = {fn.params[path[0]].name: value for path, value in constexprs.items()}
    attrs = {path: value for path, value in attrs.items() if value}
    return signature, constants, attrs
