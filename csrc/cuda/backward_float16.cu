// Backward kernels for float16 inputs, every head-dim bucket (see attention_backward.cuh).
#include "attention_backward.cuh"

namespace fusedattn::cuda {

const char* attention_backward_float16(const AttentionBackwardParams& params, void* stream) {
  return attention_backward_for<__half>(params, stream);
}

}  // namespace fusedattn::cuda
