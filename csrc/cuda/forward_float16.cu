// Forward kernels for float16 inputs, every head-dim bucket (see attention_forward_mma.cuh).
#include "attention_forward_mma.cuh"

namespace fusedattn::cuda {

const char* attention_forward_float16(const AttentionParams& params, void* stream) {
  return attention_forward_mma_for<__half>(params, stream);
}

}  // namespace fusedattn::cuda
