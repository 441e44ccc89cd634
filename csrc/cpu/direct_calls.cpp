// fusedattn._C.cpu_forward / cpu_backward / CpuForwardPlan: the CPU entry points as plain
// pybind functions.
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
#include <utility>
#include <vector>

#include "cpu/attention_entry.h"
#include "cpu/direct_calls.h"
#include "cpu/output_memory.h"

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
#define FUSEDATTN_OPTION_TYPE(type, name, schema) , type

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

// A forward prepared once for calls that differ only in q, k and v (fusedattn.repeat_calls):
// it keeps the native options and the output shapes (semantics' out_shape and lse_shape,
// computed once in Python), so a call converts three arguments (five with an 8-bit
// cache's scales) instead of 28 and allocates its outputs here (at::empty costs a
// fraction of two torch.empty calls from Python). It keeps no tensor: plans are made for
// calls whose only option tensors are the scales, and those come with each call.
class CpuForwardPlan {
 public:
  CpuForwardPlan(std::vector<int64_t> out_shape, std::vector<int64_t> lse_shape FUSEDATTN_OPTION_PARAMETERS)
      : out_shape_(std::move(out_shape)), lse_shape_(std::move(lse_shape)) {
#define FUSEDATTN_PLAN_OPTION(type, name, schema) options_.name = name;
    FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_PLAN_OPTION)
#undef FUSEDATTN_PLAN_OPTION
#define FUSEDATTN_PLAN_TENSOR_FREE(type, name, schema) holds_tensor = holds_tensor || is_tensor(name);
    bool holds_tensor = false;
    FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_PLAN_TENSOR_FREE)
#undef FUSEDATTN_PLAN_TENSOR_FREE
    TORCH_CHECK_VALUE(!holds_tensor, "CpuForwardPlan: expected options without tensors (plain calls only)");
  }

  // k_descale, v_descale: an 8-bit cache's scales as the call passed them (repeat_calls'
  // key holds their shapes, strides and dtypes, so validation's verdict stands); here
  // they become what validation makes of them, float32 views expanded to k.shape[:-1].
  std::tuple<at::Tensor, at::Tensor> operator()(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& k_descale,
                                                const std::optional<at::Tensor>& v_descale) const {
    // CPU tensors only (the checks refuse others): the outputs skip the dispatcher.
    TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU tensor, got one on ", q.device());
    at::Tensor out = empty_output(out_shape_, q.scalar_type());
    at::Tensor lse = at::detail::empty_cpu(lse_shape_, at::kFloat);
    NativeOptions options = options_;
    if (k_descale.has_value()) options.k_descale = expanded_scale(*k_descale, k);
    if (v_descale.has_value()) options.v_descale = expanded_scale(*v_descale, v);
    {
      // A call this small finishes in microseconds: releasing and taking back the GIL
      // would cost a tenth of it. Larger ones let other Python threads run meanwhile.
      std::optional<pybind11::gil_scoped_release> unlocked;
      if (q.numel() * k.size(-2) > kHoldGilBelow) unlocked.emplace();
      cpu_forward_with_options(resolved(q), resolved(k), resolved(v), out, lse, options);
    }
    return {out, lse};
  }

 private:
  static at::Tensor expanded_scale(const at::Tensor& scale, const at::Tensor& cache) {
    return resolved(scale.expand(cache.sizes().slice(0, cache.dim() - 1)).to(at::kFloat));
  }
  static bool is_tensor(const std::optional<at::Tensor>& value) { return value.has_value(); }
  template <typename Value>
  static bool is_tensor(const Value&) {
    return false;
  }

  // Multiply-adds of the score product below which the call keeps the GIL (a few us).
  static constexpr int64_t kHoldGilBelow = int64_t(1) << 16;
  std::vector<int64_t> out_shape_;
  std::vector<int64_t> lse_shape_;
  NativeOptions options_;
};

#undef FUSEDATTN_RESOLVED_OPTION
#undef FUSEDATTN_OPTION_ARGUMENT

}  // namespace

void bind_direct_calls(pybind11::module_& module) {
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("cpu_forward", &cpu_forward_direct, release,
             "The CPU forward (fusedattn_native::cpu_forward's arguments), without the dispatcher");
  pybind11::class_<CpuForwardPlan>(module, "CpuForwardPlan",
                                    "cpu_forward prepared for calls that differ only in q, k, v: "
                                    "CpuForwardPlan(out_shape, lse_shape, *options)(q, k, v, k_descale=None, v_descale=None) "
                                    "-> (out, lse); options without tensors (the scales come with each call)")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t> FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_TYPE)>())
      .def("__call__", &CpuForwardPlan::operator(), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
           pybind11::arg("k_descale") = pybind11::none(), pybind11::arg("v_descale") = pybind11::none());
  module.def(
      "cpu_empty_output",
      [](std::vector<int64_t> shape, at::ScalarType dtype) { return empty_output(shape, dtype); },
      "An uninitialized CPU output as CpuForwardPlan allocates it (csrc/cpu/output_memory.h): "
      "cpu_empty_output(shape, dtype) -> Tensor");
  module.def("cpu_backward", &cpu_backward_direct, release,
             "The CPU backward (fusedattn_native::cpu_backward's arguments), without the dispatcher");
}

#undef FUSEDATTN_OPTION_TYPE

}  // namespace fusedattn::cpu
