// Backward kernels for bfloat16 inputs, every head-dim bucket (see attention_backward.cuh).
#include "attention_backward.cuh"

namespace fusedattn::cuda {

const char* attention_backward_bfloat16(const AttentionBackwardParams& params, void* stream) {
  return attention_backward_for<__nv_bfloat16>(params, stream);
}

}  // namespace fusedattn::cuda
