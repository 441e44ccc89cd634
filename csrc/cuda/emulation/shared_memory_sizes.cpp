// Prints, as JSON, the threads and dynamic shared memory per block of every kernel
// configuration of csrc/cuda (the sizes the launchers request), for
// scripts/cuda_resource_report.py: the compiled objects do not record dynamic shared memory.
// Built with the host emulation's CUDA vocabulary, so it needs neither nvcc nor torch.
#include "host_emulation.h"
// clang-format off: the kernels need the emulation vocabulary first
#include "../attention_backward.cuh"
#include "../attention_backward_mma.cuh"
#include "../attention_forward.cuh"
#include "../attention_forward_mma.cuh"
// clang-format on

#include <cstdio>

namespace fusedattn::cuda {
alignas(128) unsigned char shared[1];  // the kernels' `extern __shared__` buffer (never run here)
}

template <int kHeadDim, typename Row>
void mma_backward_rows(Row& row) {
  using namespace fusedattn::cuda;
  row("attention_backward_mma_kernel", "__half", kHeadDim, MmaBackwardConfig<__half, kHeadDim>::kThreads,
      MmaBackwardConfig<__half, kHeadDim>::kSharedBytes);
  row("attention_backward_mma_kernel", "__nv_bfloat16", kHeadDim,
      MmaBackwardConfig<__nv_bfloat16, kHeadDim>::kThreads, MmaBackwardConfig<__nv_bfloat16, kHeadDim>::kSharedBytes);
}

int main() {
  using namespace fusedattn::cuda;
  std::printf("[\n");
  bool first = true;
  auto row = [&](const char* kernel, const char* element, int head_dim, int threads, int bytes) {
    std::printf("%s  {\"kernel\": \"%s\", \"element\": \"%s\", \"head_dim\": %d, \"threads\": %d, \"shared_bytes\": %d}",
                first ? "" : ",\n", kernel, element, head_dim, threads, bytes);
    first = false;
  };
#define FUSEDATTN_SIZES(HEAD_DIM)                                                                               \
  row("attention_forward_mma_kernel", "__half", HEAD_DIM, MmaForwardConfig<__half, HEAD_DIM>::kThreads,         \
      MmaForwardConfig<__half, HEAD_DIM>::kSharedBytes);                                                        \
  row("attention_forward_mma_kernel", "__nv_bfloat16", HEAD_DIM, MmaForwardConfig<__nv_bfloat16, HEAD_DIM>::kThreads, \
      MmaForwardConfig<__nv_bfloat16, HEAD_DIM>::kSharedBytes);                                                 \
  row("attention_forward_kernel", "float", HEAD_DIM, kThreads, ForwardConfig<float, HEAD_DIM>::kSharedBytes);    \
  row("attention_backward_kernel", "float", HEAD_DIM, kThreads, BackwardConfig<float, HEAD_DIM>::kSharedBytes);  \
  mma_backward_rows<HEAD_DIM>(row);
  FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_SIZES)
#undef FUSEDATTN_SIZES
  std::printf("\n]\n");
  return 0;
}
