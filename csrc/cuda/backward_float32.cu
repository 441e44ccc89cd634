// Backward kernels for float32 inputs, every head-dim bucket (see attention_backward.cuh).
#include "attention_backward.cuh"

namespace fusedattn::cuda {

const char* attention_backward_float32(const AttentionBackwardParams& params, void* stream) {
  return attention_backward_for<float>(params, stream);
}

}  // namespace fusedattn::cuda
