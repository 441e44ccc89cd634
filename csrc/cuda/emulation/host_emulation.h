// Just enough of CUDA to run csrc/cuda's kernels on the CPU, for tests on machines with no GPU.
//
// Each CUDA block runs as kThreads cooperative fibers (ucontext) on the calling thread:
// a fiber runs until it reaches __syncthreads, __syncwarp or a warp shuffle, which are
// barriers that switch to the next runnable fiber. Blocks run one after another, sharing
// one shared-memory buffer. fp16 is emulated with _Float16, bf16 with round-to-nearest-even
// bit arithmetic. nvcuda::wmma is emulated too (every lane holds the whole 16x16 tile),
// with its documented layout, ldm and 256-bit pointer alignment rules checked on every
// call, so the tensor-core path of the kernels runs as well: fp16/bf16 take it, fp32 the
// FMA path. Only the launchers and the real hardware remain untested by the emulation.
// Not thread-safe: one emulated launch at a time per process.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__
#define __align__(bytes) __attribute__((aligned(bytes)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t word = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof(f));
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((word >> 16) | 0x40u)};  // quiet NaN
  word += 0x7fffu + ((word >> 16) & 1u);  // round to nearest, ties to even
  return {static_cast<uint16_t>(word >> 16)};
}

namespace fusedattn_emulation {
inline dim3 thread_index;  // of the running fiber
inline dim3 block_index;
inline dim3 grid_dimension;
inline dim3 block_dimension;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool finished = false;
  bool waiting = false;
};

struct Barrier {
  unsigned expected = 0;
  unsigned arrived = 0;
  std::vector<unsigned> waiters;
};

struct Scheduler {
  static constexpr size_t kStackBytes = 256 * 1024;
  std::vector<Fiber> fibers;
  std::vector<Barrier> barriers;  // 0: the block, 1 + w: warp w
  ucontext_t scheduler_context;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
};
inline Scheduler scheduler;

// Warp shuffles exchange through double-buffered slots: one warp barrier per shuffle.
inline float shuffle_slots[2][1024];
inline unsigned shuffle_phase[1024];

inline void fiber_main() {
  (*scheduler.body)();
  scheduler.fibers[scheduler.current].finished = true;
}  // returns to uc_link: the scheduler

inline void arrive_and_wait(unsigned barrier_index) {
  Barrier& barrier = scheduler.barriers[barrier_index];
  if (++barrier.arrived == barrier.expected) {  // the last one releases everybody and runs on
    barrier.arrived = 0;
    for (unsigned waiter : barrier.waiters) scheduler.fibers[waiter].waiting = false;
    barrier.waiters.clear();
    return;
  }
  const unsigned self = scheduler.current;
  scheduler.fibers[self].waiting = true;
  barrier.waiters.push_back(self);
  swapcontext(&scheduler.fibers[self].context, &scheduler.scheduler_context);
}

// Run body() as one CUDA block of block_dimension.x threads.
inline void run_block(dim3 block, const std::function<void()>& body) {
  const unsigned threads = block_dimension.x;
  scheduler.body = &body;
  scheduler.fibers.resize(threads);
  scheduler.barriers.assign(1 + threads / 32, Barrier{});
  scheduler.barriers[0].expected = threads;
  for (unsigned warp = 0; warp < threads / 32; ++warp) scheduler.barriers[1 + warp].expected = 32;
  for (Fiber& fiber : scheduler.fibers) {
    if (!fiber.stack) fiber.stack = std::make_unique<char[]>(Scheduler::kStackBytes);
    fiber.finished = false;
    fiber.waiting = false;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = Scheduler::kStackBytes;
    fiber.context.uc_link = &scheduler.scheduler_context;
    makecontext(&fiber.context, fiber_main, 0);
  }
  std::fill(std::begin(shuffle_phase), std::end(shuffle_phase), 0u);
  block_index = block;
  // Fibers run in a fresh pseudo-random order between barriers, so that a missing barrier
  // shows up whichever side of it the reader sits (a fixed order would hide half of them).
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  std::mt19937 random(block.x * 7919u + block.y * 104729u + block.z);
  unsigned finished = 0;
  while (finished < threads) {
    bool ran = false;
    finished = 0;
    std::shuffle(order.begin(), order.end(), random);
    for (unsigned t : order) {
      Fiber& fiber = scheduler.fibers[t];
      if (fiber.finished) {
        ++finished;
        continue;
      }
      if (fiber.waiting) continue;
      scheduler.current = t;
      thread_index = dim3(t);
      swapcontext(&scheduler.scheduler_context, &fiber.context);
      ran = true;
    }
    if (!ran && finished < threads) {
      std::fprintf(stderr, "fusedattn CUDA emulation: deadlock (threads wait on a barrier others never reach)\n");
      std::abort();
    }
  }
}

}  // namespace fusedattn_emulation

#define threadIdx (::fusedattn_emulation::thread_index)
#define blockIdx (::fusedattn_emulation::block_index)
#define gridDim (::fusedattn_emulation::grid_dimension)
#define blockDim (::fusedattn_emulation::block_dimension)

inline void __syncthreads() { fusedattn_emulation::arrive_and_wait(0); }
inline void __syncwarp(unsigned = 0xffffffffu) { fusedattn_emulation::arrive_and_wait(1 + threadIdx.x / 32); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned self = threadIdx.x;
  const unsigned phase = fusedattn_emulation::shuffle_phase[self]++ & 1u;
  fusedattn_emulation::shuffle_slots[phase][self] = value;
  __syncwarp();
  return fusedattn_emulation::shuffle_slots[phase][self ^ static_cast<unsigned>(lane_mask)];
}
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* address, float value) {  // fibers never interleave inside it
  const float old = *address;
  *address = old + value;
  return old;
}
using std::max;
using std::min;

// ---- nvcuda::wmma, m16n16k16 only -------------------------------------------------------------
#define FUSEDATTN_TENSOR_CORES 1

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows m16n16k16 only");
  float element[16][16];  // (row, column) of the A, B or C tile
};

inline float value_of(float x) { return x; }
inline float value_of(__half x) { return __half2float(x); }
inline float value_of(__nv_bfloat16 x) { return __bfloat162float(x); }

// The wmma operations are warp-collective: every lane's load happens before any lane's
// store. Fibers run one at a time, so each load and store ends with a warp barrier.

// The rules of the CUDA programming guide: 256-bit aligned pointers, ldm a multiple of 16 bytes.
template <typename T>
void check_operand(const T* pointer, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    std::fprintf(stderr, "fusedattn CUDA emulation: wmma %s with a misaligned pointer or ldm %u\n", what, ldm);
    std::abort();
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& tile, const T* pointer, unsigned ldm) {
  check_operand(pointer, ldm, "load");
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int row = 0; row < 16; ++row)
    for (int column = 0; column < 16; ++column)
      tile.element[row][column] = value_of(kRowMajor ? pointer[row * ldm + column] : pointer[column * ldm + row]);
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& tile, const float* pointer, unsigned ldm,
                             layout_t layout) {
  check_operand(pointer, ldm, "accumulator load");
  for (int row = 0; row < 16; ++row)
    for (int column = 0; column < 16; ++column)
      tile.element[row][column] = layout == mem_row_major ? pointer[row * ldm + column] : pointer[column * ldm + row];
  __syncwarp();
}

inline void store_matrix_sync(float* pointer, const fragment<accumulator, 16, 16, 16, float>& tile, unsigned ldm,
                              layout_t layout) {
  check_operand(pointer, ldm, "store");
  for (int row = 0; row < 16; ++row)
    for (int column = 0; column < 16; ++column)
      (layout == mem_row_major ? pointer[row * ldm + column] : pointer[column * ldm + row]) = tile.element[row][column];
  __syncwarp();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& tile, float value) {
  for (auto& row : tile.element)
    for (float& element : row) element = value;
}

template <typename T, typename ALayout, typename BLayout>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, ALayout>& a,
              const fragment<matrix_b, 16, 16, 16, T, BLayout>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> result;
  for (int row = 0; row < 16; ++row)
    for (int column = 0; column < 16; ++column) {
      float sum = c.element[row][column];
      for (int k = 0; k < 16; ++k) sum += a.element[row][k] * b.element[k][column];
      result.element[row][column] = sum;
    }
  d = result;
}
}  // namespace nvcuda::wmma
