// Backward kernels for float16 inputs, every head-dim bucket: the mma kernel
// (attention_backward_mma.cuh).
#include "attention_backward_mma.cuh"

namespace fusedattn::cuda {

const char* attention_backward_float16(const AttentionBackwardParams& params, void* stream) {
  return attention_backward_mma_for<__half>(params, stream);
}

}  // namespace fusedattn::cuda
