// Forward kernels for float32 inputs, every head-dim bucket (see attention_forward.cuh).
#include "attention_forward.cuh"

namespace fusedattn::cuda {

const char* attention_forward_float32(const AttentionParams& params, void* stream) {
  return attention_forward_for<float>(params, stream);
}

}  // namespace fusedattn::cuda
