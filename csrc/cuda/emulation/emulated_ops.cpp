// The CUDA backend's kernels and operator bodies, run on the CPU (tests/test_cuda_backend.py).
//
// Registers fusedattn_cuda_emulation::cuda_attention_forward / _backward for CPU tensors
// with the schemas of the real operators: the same attention_ops.h bodies, the same
// kernels (their FMA path), launched block by block by host_emulation.h on the grids of the
// real launchers (forward_grid_blocks, backward_grid_blocks). Built on demand by the tests
// with torch.utils.cpp_extension; never part of fusedattn._C.
#include "host_emulation.h"
// clang-format off: the kernels need the emulation vocabulary first
#include "../attention_backward.cuh"
#include "../attention_forward.cuh"
#include "../attention_ops.h"
// clang-format on

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fusedattn::cuda {

alignas(128) unsigned char shared[kMaxSharedBytes];  // the kernels' `extern __shared__` buffer

namespace {

// When not empty, launches run only these block indices of their grids: the tests check the
// decoding of grids too large to emulate whole (more than 65535 sequences or heads).
std::vector<int64_t> sampled_blocks;

void sample_blocks(std::vector<int64_t> blocks) { sampled_blocks = std::move(blocks); }

// Run the blocks of a flat grid (flat_grid_blocks: 0 launches nothing, -1 is refused as by
// the real launchers).
template <typename Kernel, typename Params>
const char* launch(Kernel kernel, int64_t blocks, int shared_bytes, const Params& params) {
  if (blocks < 0) return "more than 2^31 - 1 blocks";
  const dim3 grid(static_cast<unsigned>(blocks));
  fusedattn_emulation::grid_dimension = grid;
  fusedattn_emulation::block_dimension = dim3(kThreads);
  auto run = [&](unsigned x) {
    // Garbage (NaN in every float format) where a kernel reads shared memory it never wrote.
    std::memset(shared, 0xFF, shared_bytes);
    fusedattn_emulation::run_block(dim3(x), [&] { kernel(params); });
  };
  if (sampled_blocks.empty()) {
    for (unsigned x = 0; x < grid.x; ++x) run(x);
  } else {
    for (int64_t x : sampled_blocks)
      if (x >= 0 && x < blocks) run(static_cast<unsigned>(x));
  }
  return nullptr;
}

template <typename Element>
const char* emulate_forward(const AttentionParams& p) {
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_EMULATED_FORWARD(HEAD_DIM)                                                              \
  case HEAD_DIM: {                                                                                        \
    return launch(attention_forward_kernel<Element, HEAD_DIM>, forward_grid_blocks<Element, HEAD_DIM>(p), \
                  ForwardConfig<Element, HEAD_DIM>::kSharedBytes, p);                                     \
  }
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_EMULATED_FORWARD)
#undef FUSEDATTN_EMULATED_FORWARD
    default:
      return "no kernel for this head dim";
  }
}

template <typename Element>
const char* emulate_backward(const AttentionBackwardParams& bp) {
  const AttentionParams& p = bp.forward;
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_EMULATED_BACKWARD(HEAD_DIM)                                                             \
  case HEAD_DIM: {                                                                                        \
    return launch(attention_backward_kernel<Element, HEAD_DIM>, backward_grid_blocks<Element, HEAD_DIM>(p), \
                  BackwardConfig<Element, HEAD_DIM>::kSharedBytes, bp);                                     \
  }
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_EMULATED_BACKWARD)
#undef FUSEDATTN_EMULATED_BACKWARD
    default:
      return "no kernel for this head dim";
  }
}

// The largest shared-memory request of any tile configuration (python/fusedattn/backends/
// cuda.py refuses GPUs that offer less; a test keeps its constant equal to this).
int64_t largest_shared_bytes() {
  int64_t largest = 0;
#define FUSEDATTN_LARGEST_SHARED_BYTES(HEAD_DIM)                                                           \
  largest = std::max<int64_t>({largest, ForwardConfig<__half, HEAD_DIM>::kSharedBytes,                    \
                               BackwardConfig<__half, HEAD_DIM>::kSharedBytes,                             \
                               ForwardConfig<float, HEAD_DIM>::kSharedBytes,                               \
                               BackwardConfig<float, HEAD_DIM>::kSharedBytes});
  FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_LARGEST_SHARED_BYTES)
#undef FUSEDATTN_LARGEST_SHARED_BYTES
  return largest;
}

struct HostDevice {
  static void check(const at::Tensor& q) { TORCH_CHECK(q.is_cpu(), "fusedattn cuda emulation: q must be on the CPU"); }
  static int guard(const at::Tensor&) { return 0; }
  static void* stream() { return nullptr; }
};

}  // namespace

// The entry points of attention_params.h, emulated.
const char* attention_forward(const AttentionParams& p, void*) {
  switch (p.element_type) {
    case ElementType::Float16:
      return emulate_forward<__half>(p);
    case ElementType::BFloat16:
      return emulate_forward<__nv_bfloat16>(p);
    case ElementType::Float32:
      return emulate_forward<float>(p);
  }
  return "unsupported element type";
}

const char* attention_backward(const AttentionBackwardParams& bp, void*) {
  switch (bp.forward.element_type) {
    case ElementType::Float16:
      return emulate_backward<__half>(bp);
    case ElementType::BFloat16:
      return emulate_backward<__nv_bfloat16>(bp);
    case ElementType::Float32:
      return emulate_backward<float>(bp);
  }
  return "unsupported element type";
}

}  // namespace fusedattn::cuda

TORCH_LIBRARY(fusedattn_cuda_emulation, m) {
  m.def("cuda_attention_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse" FUSEDATTN_OPTIONS_SCHEMA
        ") -> ()");
  m.def(
      "cuda_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv" FUSEDATTN_OPTIONS_SCHEMA ") -> ()");
  m.def("largest_shared_bytes() -> int", &fusedattn::cuda::largest_shared_bytes);
  m.def("sample_blocks(int[] blocks) -> ()", &fusedattn::cuda::sample_blocks);
}

TORCH_LIBRARY_IMPL(fusedattn_cuda_emulation, CPU, m) {
  m.impl("cuda_attention_forward", &fusedattn::cuda::attention_forward_op<fusedattn::cuda::HostDevice>);
  m.impl("cuda_attention_backward", &fusedattn::cuda::attention_backward_op<fusedattn::cuda::HostDevice>);
}
