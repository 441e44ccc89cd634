// Forward kernels for bfloat16 inputs, every head-dim bucket (see attention_forward_mma.cuh).
#include "attention_forward_mma.cuh"

namespace fusedattn::cuda {

const char* attention_forward_bfloat16(const AttentionParams& params, void* stream) {
  return attention_forward_mma_for<__nv_bfloat16>(params, stream);
}

}  // namespace fusedattn::cuda
