// Torch operators of the CUDA backend: fusedattn_native::cuda_attention_forward and
// fusedattn_native::cuda_attention_backward, registered for CUDA tensors. The operator
// bodies live in attention_ops.h; this file adds the CUDA device guard and stream.
// Compiled only when the CUDA backend is built (CMakeLists.txt, CUDA block).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "attention_ops.h"

namespace fusedattn::cuda {

struct CudaDevice {
  static void check(const at::Tensor& q) { TORCH_CHECK(q.is_cuda(), "fusedattn cuda: q must be a CUDA tensor"); }
  static c10::cuda::CUDAGuard guard(const at::Tensor& q) { return c10::cuda::CUDAGuard(q.device()); }
  static void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  // The SM count the split-KV choice fills; 0 (no split) if the runtime cannot say.
  static int multiprocessors(const at::Tensor& q) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, q.get_device()) != cudaSuccess) return 0;
    return count;
  }
};

}  // namespace fusedattn::cuda

TORCH_LIBRARY_FRAGMENT(fusedattn_native, m) {
  m.def("cuda_attention_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse" FUSEDATTN_OPTIONS_SCHEMA
        ") -> ()");
  m.def(
      "cuda_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv" FUSEDATTN_OPTIONS_SCHEMA ") -> ()");
}

TORCH_LIBRARY_IMPL(fusedattn_native, CUDA, m) {
  m.impl("cuda_attention_forward", &fusedattn::cuda::attention_forward_op<fusedattn::cuda::CudaDevice>);
  m.impl("cuda_attention_backward", &fusedattn::cuda::attention_backward_op<fusedattn::cuda::CudaDevice>);
}
