// The CPU backend's two entry points, reached two ways with the same arguments: as the
// fusedattn_native::cpu_forward / cpu_backward operators (attention_cpu.cpp; what schemas,
// torch.compile and the tests see) and as plain pybind functions of fusedattn._C
// (direct_calls.cpp; what the Python backend calls, skipping the dispatcher's argument
// boxing, about 7 us of a small call).
#pragma once

#include <ATen/ATen.h>

#include "native_options.h"

namespace fusedattn::cpu {

void cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse FUSEDATTN_OPTION_PARAMETERS);

// cpu_forward with its options already gathered (the prepared plans of direct_calls.cpp).
void cpu_forward_with_options(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const NativeOptions& options);

void cpu_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                  at::Tensor& grad_v FUSEDATTN_OPTION_PARAMETERS);

}  // namespace fusedattn::cpu
