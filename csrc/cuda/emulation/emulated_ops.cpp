// The CUDA backend's kernels and operator bodies, run on the CPU (tests/test_cuda_backend.py).
//
// Registers fusedattn_cuda_emulation::cuda_attention_forward / _backward for CPU tensors
// with the schemas of the real operators: the same attention_ops.h bodies, the same
// kernels, launched block by block by host_emulation.h on the grids of the real launchers
// (mma_forward_grid_blocks and combine_grid_blocks for fp16/bf16, forward_grid_blocks for
// fp32, mma_backward_grid_blocks for fp16/bf16, backward_grid_blocks for fp32, and
// group_sum_grid_blocks), with an H100's SM count for the split-KV choice. Also
// primitive_check (emulation/primitive_checks.h), the one-warp test of warp_mma.cuh. Built
// on demand by the tests with torch.utils.cpp_extension; never part of fusedattn._C.
#include "host_emulation.h"
// clang-format off: the kernels need the emulation vocabulary first
#include "../attention_backward.cuh"
#include "../attention_backward_mma.cuh"
#include "../attention_forward.cuh"
#include "../attention_forward_mma.cuh"
#include "../attention_ops.h"
#include "primitive_checks.h"
// clang-format on

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
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
// The SM count the emulated device reports to the split-KV choice (an H100's), and the
// number of splits the last fp16/bf16 forward launch used (tests check the choice).
constexpr int kEmulatedMultiprocessors = 132;
int64_t last_forward_splits = 0;
int64_t forward_splits_of_last_launch() { return last_forward_splits; }

// An error the emulation found in a kernel (host_emulation.h, report_error), for the launch's
// return value.
std::string launch_error;

template <typename Kernel, typename Params>
const char* launch(Kernel kernel, int64_t blocks, int shared_bytes, const Params& params, int threads = kThreads) {
  if (blocks < 0) return "more than 2^31 - 1 blocks";
  if (shared_bytes > static_cast<int>(sizeof(shared))) return "the kernel asks for more shared memory than exists";
  const dim3 grid(static_cast<unsigned>(blocks));
  fusedattn_emulation::grid_dimension = grid;
  fusedattn_emulation::block_dimension = dim3(threads);
  fusedattn_emulation::set_shared_region(shared, static_cast<size_t>(shared_bytes));
  fusedattn_emulation::first_error.clear();
  auto run = [&](unsigned x) {
    // Garbage (NaN in every float format) where a kernel reads shared memory it never wrote.
    std::memset(shared, 0xFF, shared_bytes);
    fusedattn_emulation::run_block(dim3(x), [&] { kernel(params); });
  };
  if (sampled_blocks.empty()) {
    for (unsigned x = 0; x < grid.x && fusedattn_emulation::first_error.empty(); ++x) run(x);
  } else {
    for (int64_t x : sampled_blocks)
      if (x >= 0 && x < blocks && fusedattn_emulation::first_error.empty()) run(static_cast<unsigned>(x));
  }
  if (fusedattn_emulation::first_error.empty()) return nullptr;
  launch_error = "the CUDA emulation found an error in the kernel: " + fusedattn_emulation::first_error;
  return launch_error.c_str();
}

// fp32: the FMA kernel (attention_forward.cuh); fp16/bf16: the mma kernel
// (attention_forward_mma.cuh), as forward_{float32,float16,bfloat16}.cu choose.
template <typename Element>
const char* emulate_forward(const AttentionParams& p) {
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_EMULATED_FORWARD(HEAD_DIM)                                                                  \
  case HEAD_DIM: {                                                                                            \
    if constexpr (kIsFloat32<Element>) {                                                                      \
      return launch(attention_forward_kernel<Element, HEAD_DIM>, forward_grid_blocks<Element, HEAD_DIM>(p),   \
                    ForwardConfig<Element, HEAD_DIM>::kSharedBytes, p);                                       \
    } else {                                                                                                  \
      using Config = MmaForwardConfig<Element, HEAD_DIM>;                                                     \
      last_forward_splits = p.num_splits;                                                                     \
      const char* error = launch(attention_forward_mma_kernel<Element, HEAD_DIM>,                             \
                                 mma_forward_grid_blocks<Element, HEAD_DIM>(p), Config::kSharedBytes, p,      \
                                 Config::kThreads);                                                           \
      if (error != nullptr || p.num_splits == 1) return error;                                                \
      return launch(attention_forward_combine_kernel<Element>, combine_grid_blocks(p), 0, p);                 \
    }                                                                                                         \
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
  if (bp.dk_partial != nullptr) {
    // A sample of the grid leaves most GQA partials unwritten; they read as 0 in the group
    // sum (the tests add up only the sampled query heads). Full launches must write every
    // row the group sum reads: their partials start as NaN (as the GPU's uninitialized
    // memory may be), so a row read unwritten shows in dK or dV.
    const int64_t rows = p.cu_seqlens_q != nullptr ? p.total_k : int64_t{p.batch} * p.seqlen_k;
    const int64_t count = rows * p.heads_q * std::max(p.head_dim, p.head_dim_v);
    const float fill = sampled_blocks.empty() ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    std::fill_n(bp.dk_partial, count, fill);
    std::fill_n(bp.dv_partial, count, fill);
  }
  if (sampled_blocks.empty()) {
    const char* error = launch(attention_backward_delta_kernel<Element>, delta_grid_blocks(p), 0, bp);
    if (error != nullptr) return error;
  } else {
    // A sample of the backward grid's indices says nothing about the delta kernel's grid:
    // sampled launches (grids too large to emulate whole) get delta from this host loop.
    const int64_t rows_per_head = p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q;
    for (int64_t row = 0; row < delta_rows(p); ++row) {
      const int64_t position = row % rows_per_head, head = row / rows_per_head % p.heads_q;
      const int64_t sequence = row / rows_per_head / p.heads_q;
      const Element* out_row = static_cast<const Element*>(p.out) + sequence * p.out_strides.batch +
                               head * p.out_strides.head + position * p.out_strides.row;
      const Element* grad_out_row = static_cast<const Element*>(bp.grad_out) + sequence * bp.grad_out_strides.batch +
                                    head * bp.grad_out_strides.head + position * bp.grad_out_strides.row;
      float sum = 0.0f;
      for (int column = 0; column < p.head_dim_v; ++column)
        sum += to_float(out_row[column]) * to_float(grad_out_row[column]);
      const int64_t at = sequence * bp.delta_strides.batch + head * bp.delta_strides.head;
      bp.delta[at + position * bp.delta_strides.row] = sum;
    }
  }
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_EMULATED_BACKWARD(HEAD_DIM)                                                               \
  case HEAD_DIM: {                                                                                          \
    const char* error = nullptr;                                                                            \
    if constexpr (!kIsFloat32<Element>) {                                                                   \
      using Config = MmaBackwardConfig<Element, HEAD_DIM>;                                                  \
      error = launch(attention_backward_mma_kernel<Element, HEAD_DIM>,                                      \
                     mma_backward_grid_blocks<Element, HEAD_DIM>(p), Config::kSharedBytes, bp,              \
                     Config::kThreads);                                                                     \
    } else {                                                                                                \
      error = launch(attention_backward_kernel<Element, HEAD_DIM>, backward_grid_blocks<Element, HEAD_DIM>(p), \
                     BackwardConfig<Element, HEAD_DIM>::kSharedBytes, bp);                                  \
    }                                                                                                       \
    if (error != nullptr || p.heads_q == p.heads_kv) return error;                                          \
    return launch(attention_backward_group_sum_kernel<Element>, group_sum_grid_blocks(p), 0, bp);           \
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
  largest = std::max<int64_t>({largest, MmaForwardConfig<__half, HEAD_DIM>::kSharedBytes,                 \
                               MmaBackwardConfig<__half, HEAD_DIM>::kSharedBytes,                          \
                               ForwardConfig<float, HEAD_DIM>::kSharedBytes,                               \
                               BackwardConfig<float, HEAD_DIM>::kSharedBytes});
  FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_LARGEST_SHARED_BYTES)
#undef FUSEDATTN_LARGEST_SHARED_BYTES
  return largest;
}

// d = 1 + a b by one emulated warp (primitive_checks.h), or the error the emulation found.
at::Tensor primitive_check(const at::Tensor& a, const at::Tensor& b, int64_t check, int64_t valid_rows) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) && a.is_contiguous() &&
                  b.is_contiguous() && a.scalar_type() == b.scalar_type(),
              "primitive_check: a (16, 16) and b (16, 8), contiguous, one dtype");
  const bool bfloat16 = a.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bfloat16 || a.scalar_type() == at::kHalf, "primitive_check: float16 or bfloat16");
  // Copies 16-byte aligned, as cp.async wants (torch's allocations are; a view might not be).
  const at::Tensor a_copy = a.clone(), b_copy = b.clone();
  at::Tensor d = at::full({16, 8}, std::nanf(""), a.options().dtype(at::kFloat));
  PrimitiveCheckParams params{a_copy.data_ptr(), b_copy.data_ptr(), d.data_ptr<float>(),
                              static_cast<PrimitiveCheck>(check), static_cast<int>(valid_rows)};
  const char* error = bfloat16 ? launch(primitive_check_kernel<__nv_bfloat16>, 1, kPrimitiveCheckSharedBytes, params, 32)
                               : launch(primitive_check_kernel<__half>, 1, kPrimitiveCheckSharedBytes, params, 32);
  TORCH_CHECK(error == nullptr, error);
  return d;
}

struct HostDevice {
  static void check(const at::Tensor& q) { TORCH_CHECK(q.is_cpu(), "fusedattn cuda emulation: q must be on the CPU"); }
  static int guard(const at::Tensor&) { return 0; }
  static void* stream() { return nullptr; }
  static int multiprocessors(const at::Tensor&) { return kEmulatedMultiprocessors; }
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
  m.def("forward_splits_of_last_launch() -> int", &fusedattn::cuda::forward_splits_of_last_launch);
  m.def("primitive_check(Tensor a, Tensor b, int check, int valid_rows) -> Tensor", &fusedattn::cuda::primitive_check);
}

TORCH_LIBRARY_IMPL(fusedattn_cuda_emulation, CPU, m) {
  m.impl("cuda_attention_forward", &fusedattn::cuda::attention_forward_op<fusedattn::cuda::HostDevice>);
  m.impl("cuda_attention_backward", &fusedattn::cuda::attention_backward_op<fusedattn::cuda::HostDevice>);
}
