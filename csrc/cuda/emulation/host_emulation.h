// Just enough of CUDA to run csrc/cuda's kernels on the CPU, for tests on machines with no GPU.
//
// Each CUDA block runs as kThreads cooperative fibers (ucontext) on the calling thread:
// a fiber runs until it reaches __syncthreads, __syncwarp or a warp shuffle, which are
// barriers that switch to the next runnable fiber. Blocks run one after another, sharing
// one shared-memory buffer. fp16 is emulated with _Float16, bf16 with round-to-nearest-even
// bit arithmetic. The primitives of warp_mma.cuh (the fp16/bf16 forward and backward) are
// emulated instruction by instruction, at the end of this file: mma.sync
// m16n8k16 and ldmatrix compute each lane's registers from the fragment layouts of the PTX
// ISA, and cp.async writes shared memory only at the cp.async.wait_group that retires it,
// reporting a read of bytes still in flight (report_error: the launch then fails).
// Only the launchers and the real hardware remain untested by the emulation.
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
#include <deque>
#include <functional>
#include <string>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
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

// Errors the emulation finds in a kernel (a read of shared memory that a cp.async still
// owns, a misaligned ldmatrix row, ...): the first one is kept, the block runs on, and the
// launcher (emulated_ops.cpp) turns it into a failed launch.
inline std::string first_error;
inline void report_error(const std::string& message) {
  if (first_error.empty()) first_error = message;
}

// The block's shared memory (set by the launcher), for the checks of ldmatrix and cp.async.
inline unsigned char* shared_begin = nullptr;
inline size_t shared_size = 0;
inline void set_shared_region(unsigned char* begin, size_t bytes) {
  shared_begin = begin;
  shared_size = bytes;
}

// cp.async: a copy is queued per thread, its 16 source bytes taken when it is issued, and
// written to shared memory only when a cp.async.wait_group of its thread retires its group.
// Until then its 16 destination bytes count as pending, and reading them is an error.
struct PendingCopy {
  unsigned char* destination;
  unsigned char bytes[16];
};
struct CopyQueue {
  std::vector<PendingCopy> open;                   // issued, not yet committed
  std::deque<std::vector<PendingCopy>> committed;  // groups, oldest first
};
inline std::vector<CopyQueue> copy_queues;      // per thread of the block
inline std::vector<unsigned> pending_chunks;    // per 16-byte chunk of shared memory

inline void reset_async_copies(unsigned threads) {
  copy_queues.assign(threads, CopyQueue{});
  pending_chunks.assign(shared_size / 16 + 1, 0u);
}

inline void check_no_copy_left_pending() {
  for (const CopyQueue& queue : copy_queues)
    if (!queue.open.empty() || !queue.committed.empty()) {
      report_error("a thread ended with cp.async copies it never waited for (cp.async.wait_group)");
      return;
    }
}

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
  reset_async_copies(threads);
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
  check_no_copy_left_pending();
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
inline float __fdividef(float x, float y) { return x / y; }
inline float atomicAdd(float* address, float value) {  // fibers never interleave inside it
  const float old = *address;
  *address = old + value;
  return old;
}
using std::max;
using std::min;

// ---- mma.sync m16n8k16, ldmatrix, cp.async (csrc/cuda/warp_mma.cuh) ----------------------------
// Warp-collective like the instructions: every lane deposits its registers (or its row
// address) in a slot, the warp meets at a barrier, and each lane computes its own result
// from all the slots by the fragment layouts of the PTX ISA, spelled out below element by
// element. Slots are double-buffered by the lane's collective count (as the shuffles are).
namespace fusedattn_emulation {

inline uint32_t exchange_words[2][1024][6];
inline const unsigned char* exchange_rows[2][1024];

inline float half_bits_to_float(uint16_t bits, bool bfloat16) {
  if (bfloat16) return __bfloat162float(__nv_bfloat16{bits});
  __half value;
  std::memcpy(&value, &bits, 2);
  return __half2float(value);
}

// Element i (0 = low half of register i / 2) of a 16-bit fragment register file.
inline uint16_t fragment_element(const uint32_t* registers, int i) {
  return static_cast<uint16_t>(registers[i / 2] >> (16 * (i % 2)));
}

// d += a b: A 16x16 row-major, B 16x8 column-major, D 16x8 float (PTX ISA, mma.m16n8k16).
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bfloat16) {
  const unsigned self = threadIdx.x;
  const unsigned phase = shuffle_phase[self]++ & 1u;
  for (int i = 0; i < 4; ++i) exchange_words[phase][self][i] = a[i];
  for (int i = 0; i < 2; ++i) exchange_words[phase][self][4 + i] = b[i];
  __syncwarp();
  const unsigned warp_base = self & ~31u;
  double a_matrix[16][16];
  double b_matrix[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2;
    const int thread_in_group = lane % 4;
    const uint32_t* words = exchange_words[phase][warp_base + lane];
    for (int i = 0; i < 8; ++i) {  // a0..a7
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int column = thread_in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      a_matrix[row][column] = half_bits_to_float(fragment_element(words, i), bfloat16);
    }
    for (int i = 0; i < 4; ++i) {  // b0..b3
      const int row = thread_in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      b_matrix[row][group] = half_bits_to_float(fragment_element(words + 4, i), bfloat16);
    }
  }
  const int lane = static_cast<int>(self % 32);
  for (int i = 0; i < 4; ++i) {  // c0..c3 / d0..d3
    const int row = i < 2 ? lane >> 2 : (lane >> 2) + 8;
    const int column = (lane % 4) * 2 + (i & 1);
    // fp16/bf16 products are exact in double; one rounding of the sum to float.
    double sum = d[i];
    for (int k = 0; k < 16; ++k) sum += a_matrix[row][k] * b_matrix[k][column];
    d[i] = static_cast<float>(sum);
  }
}

// Error unless the 16 bytes at `address` lie in the block's shared memory, 16-byte aligned,
// with no cp.async to them pending.
inline bool check_shared_row(const unsigned char* address, const char* what) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(address) - reinterpret_cast<uintptr_t>(shared_begin);
  if (address < shared_begin || offset + 16 > shared_size || offset % 16 != 0) {
    report_error(std::string(what) + ": a row address outside shared memory or not 16-byte aligned");
    return false;
  }
  if (pending_chunks[offset / 16] != 0) {
    report_error(std::string(what) + ": read shared bytes [" + std::to_string(offset) + ", " +
                 std::to_string(offset + 16) + ") while a cp.async to them is pending (read before its wait_group)");
    return false;
  }
  return true;
}

// ldmatrix.sync.aligned.m8n8.x{count}{.trans}.shared.b16: lane 8 m + r gives row r of matrix m;
// lane l receives, of matrix m, (row l / 4, columns 2 (l % 4), +1), or with .trans
// (rows 2 (l % 4), +1, column l / 4), in register m.
inline void ldmatrix(uint32_t* registers, int count, const void* row, bool transpose) {
  const unsigned self = threadIdx.x;
  const unsigned phase = shuffle_phase[self]++ & 1u;
  exchange_rows[phase][self] = static_cast<const unsigned char*>(row);
  __syncwarp();
  const unsigned warp_base = self & ~31u;
  const int lane = static_cast<int>(self % 32);
  for (int matrix = 0; matrix < count; ++matrix) {
    uint16_t pair[2] = {0, 0};
    for (int j = 0; j < 2; ++j) {
      const int stored_row = transpose ? 2 * (lane % 4) + j : lane / 4;
      const int stored_column = transpose ? lane / 4 : 2 * (lane % 4) + j;
      const unsigned char* address = exchange_rows[phase][warp_base + 8 * matrix + stored_row];
      if (check_shared_row(address, "ldmatrix")) std::memcpy(&pair[j], address + 2 * stored_column, 2);
    }
    registers[matrix] = static_cast<uint32_t>(pair[0]) | (static_cast<uint32_t>(pair[1]) << 16);
  }
}

inline void cp_async_16(void* destination, const void* source, bool in_bounds) {
  unsigned char* target = static_cast<unsigned char*>(destination);
  const uintptr_t offset = reinterpret_cast<uintptr_t>(target) - reinterpret_cast<uintptr_t>(shared_begin);
  if (target < shared_begin || offset + 16 > shared_size || offset % 16 != 0) {
    report_error("cp.async: a destination outside shared memory or not 16-byte aligned");
    return;
  }
  if (in_bounds && reinterpret_cast<uintptr_t>(source) % 16 != 0) {
    report_error("cp.async: a 16-byte copy from a global address that is not 16-byte aligned");
    return;
  }
  PendingCopy copy{target, {}};
  if (in_bounds) std::memcpy(copy.bytes, source, 16);  // else src-size 0: zero fill, nothing read
  copy_queues[threadIdx.x].open.push_back(copy);
  ++pending_chunks[offset / 16];
}

inline void cp_async_commit() {
  CopyQueue& queue = copy_queues[threadIdx.x];
  queue.committed.push_back(std::move(queue.open));
  queue.open.clear();
}

inline void cp_async_wait(int pending_groups) {
  CopyQueue& queue = copy_queues[threadIdx.x];
  while (static_cast<int>(queue.committed.size()) > pending_groups) {
    for (const PendingCopy& copy : queue.committed.front()) {
      std::memcpy(copy.destination, copy.bytes, 16);
      --pending_chunks[static_cast<size_t>(copy.destination - shared_begin) / 16];
    }
    queue.committed.pop_front();
  }
}

}  // namespace fusedattn_emulation
