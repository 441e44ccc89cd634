// fusedattn._C.cpu_forward / cpu_backward: the CPU entry points as plain pybind functions.
//
// A call through torch.ops boxes its 28 arguments into IValues against the schema (about
// 8 us, more than a decode step of a small model computes); pybind converts them directly
// (about 1 us). The operators stay registered for torch.compile and for anyone calling
// them through torch.ops; both routes run the same function with the same checks. The GIL
// is released while the kernel runs, as the dispatcher does.
#include <ATen/EmptyTensor.h>
#include <torch/python.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/attention_entry.h"
#include "cpu/direct_calls.h"

namespace fusedattn::cpu {
namespace {

// A tensor viewed with the negative bit (x.conj().imag) holds its values' negations in
// memory: the dispatcher's Negative fallback materializes such an input before an
// operator's kernel runs, and the kernels read memory, so these bindings do the same.
// Only tensors with the bit set: resolve_neg is an operator call even when it does nothing
// (a profiler would see one per argument, and tests/test_paged.py checks that a paged
// cache is read in place, with no operator over it).
at::Tensor resolved(const at::Tensor& tensor) { return tensor.is_neg() ? tensor.resolve_neg() : tensor; }
std::optional<at::Tensor> resolved(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? std::optional<at::Tensor>(resolved(*tensor)) : std::nullopt;
}
template <typename Value>
Value resolved(Value value) {
  return value;
}

#define FUSEDATTN_OPTION_ARGUMENT(type, name, schema) , name
#define FUSEDATTN_RESOLVED_OPTION(type, name, schema) , resolved(name)

void cpu_forward_direct(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                        at::Tensor& lse FUSEDATTN_OPTION_PARAMETERS) {
  cpu_forward(resolved(q), resolved(k), resolved(v), out, lse FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_RESOLVED_OPTION));
}

void cpu_backward_direct(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                         at::Tensor& grad_v FUSEDATTN_OPTION_PARAMETERS) {
  cpu_backward(resolved(grad_out), resolved(q), resolved(k), resolved(v), resolved(out), resolved(lse), grad_q, grad_k,
               grad_v FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_RESOLVED_OPTION));
}

// The forward into new outputs of the given shapes (semantics' out_shape and lse_shape,
// computed once in Python by the caller): at::empty here costs a fraction of two
// torch.empty calls from Python.
std::tuple<at::Tensor, at::Tensor> cpu_forward_new(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::vector<int64_t>& out_shape,
                                                   const std::vector<int64_t>& lse_shape FUSEDATTN_OPTION_PARAMETERS) {
  // CPU tensors only (the operator's checks refuse others): empty_cpu skips the dispatcher.
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU tensor, got one on ", q.device());
  at::Tensor out = at::detail::empty_cpu(out_shape, q.scalar_type());
  at::Tensor lse = at::detail::empty_cpu(lse_shape, at::kFloat);
  cpu_forward_direct(q, k, v, out, lse FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_ARGUMENT));
  return {out, lse};
}

#undef FUSEDATTN_RESOLVED_OPTION
#undef FUSEDATTN_OPTION_ARGUMENT

}  // namespace

void bind_direct_calls(pybind11::module_& module) {
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("cpu_forward", &cpu_forward_direct, release,
             "The CPU forward (fusedattn_native::cpu_forward's arguments), without the dispatcher");
  module.def("cpu_forward_new", &cpu_forward_new, release,
             "cpu_forward into new outputs: (q, k, v, out_shape, lse_shape, *options) -> (out, lse)");
  module.def("cpu_backward", &cpu_backward_direct, release,
             "The CPU backward (fusedattn_native::cpu_backward's arguments), without the dispatcher");
}

}  // namespace fusedattn::cpu
