// Element-type dispatch: the entry points declared in attention_params.h.
#include "attention_params.h"

namespace fusedattn::cuda {

const char* attention_forward(const AttentionParams& params, void* stream) {
  switch (params.element_type) {
    case ElementType::Float16:
      return attention_forward_float16(params, stream);
    case ElementType::BFloat16:
      return attention_forward_bfloat16(params, stream);
    case ElementType::Float32:
      return attention_forward_float32(params, stream);
  }
  return "fusedattn cuda: unsupported element type";
}

const char* attention_backward(const AttentionBackwardParams& params, void* stream) {
  switch (params.forward.element_type) {
    case ElementType::Float16:
      return attention_backward_float16(params, stream);
    case ElementType::BFloat16:
      return attention_backward_bfloat16(params, stream);
    case ElementType::Float32:
      return attention_backward_float32(params, stream);
  }
  return "fusedattn cuda: unsupported element type";
}

}  // namespace fusedattn::cuda
