// The warp-level instructions of the FlashAttention-2-structured kernels, one function each:
//
//   mma_m16n8k16        mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   ldmatrix_x{1,2,4}   ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16
//   cp_async_16         cp.async.cg.shared.global, 16 bytes, src-size 0 or 16 (zero fill)
//   cp_async_commit     cp.async.commit_group
//   cp_async_wait<N>    cp.async.wait_group N
//
// With nvcc these are inline PTX. Without it, emulation/host_emulation.h (included first)
// supplies the same functions as warp-collective operations over the fibers of a warp, which
// compute from the fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16" and
// "Warp-level matrix load instruction: ldmatrix") and check cp.async's wait rules.
//
// Fragments (PTX ISA; groupID = lane >> 2, threadID_in_group = lane % 4, two 16-bit elements
// per 32-bit register, the lower column/row index in the low half):
//   A (16x16, row):  reg 0 = (row g,     cols 2t, 2t+1)   reg 1 = (row g + 8, cols 2t, 2t+1)
//                    reg 2 = (row g, cols 2t+8, 2t+9)      reg 3 = (row g + 8, cols 2t+8, 2t+9)
//   B (16x8, col):   reg 0 = (rows 2t, 2t+1, col g)        reg 1 = (rows 2t+8, 2t+9, col g)
//   C/D (16x8, f32): c0, c1 = (row g, cols 2t, 2t+1)       c2, c3 = (row g + 8, cols 2t, 2t+1)
// ldmatrix: lane 8 m + r gives the address of row r of matrix m; lane l receives (row l / 4,
// cols 2 (l % 4), +1) of each matrix, or with .trans (rows 2 (l % 4), +1, col l / 4).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedattn::cuda::warp {

// Two 16-bit elements packed into one register (first in the low half), as mma expects.
template <typename Element>
__device__ __forceinline__ uint32_t pack_pair(Element low, Element high) {
  static_assert(sizeof(Element) == 2, "mma operands are 16-bit");
  uint16_t low_bits, high_bits;
  std::memcpy(&low_bits, &low, 2);
  std::memcpy(&high_bits, &high, 2);
  return static_cast<uint32_t>(low_bits) | (static_cast<uint32_t>(high_bits) << 16);
}

#if defined(__CUDACC__)

// d += a * b for one 16x8 tile (f32 accumulators, fp16 or bf16 operands).
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<Element, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)d, (void)a, (void)b;
  __trap();  // the launchers never run these kernels below sm_80 (the backend refuses such GPUs)
#endif
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

template <bool kTranspose>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if constexpr (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  }
}

template <bool kTranspose>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  if constexpr (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
  }
}

template <bool kTranspose>
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  if constexpr (kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)));
  }
}

// 16 bytes from global to shared, asynchronously; with in_bounds false nothing is read and
// the 16 bytes are zero-filled (src-size 0). `source` must still be a valid address.
__device__ __forceinline__ void cp_async_16(void* destination, const void* source, bool in_bounds) {
  const int source_bytes = in_bounds ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(destination)), "l"(source),
               "r"(source_bytes)
               : "memory");
}

// The "memory" clobbers keep the compiler from moving shared-memory accesses across the
// points where copies are issued and retired.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

#else  // the CPU emulation: host_emulation.h defines the fusedattn_emulation:: operations

template <typename Element>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  fusedattn_emulation::mma_m16n8k16(d, a, b, std::is_same<Element, __nv_bfloat16>::value);
}
template <bool kTranspose>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  fusedattn_emulation::ldmatrix(r, 4, row, kTranspose);
}
template <bool kTranspose>
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  fusedattn_emulation::ldmatrix(r, 2, row, kTranspose);
}
template <bool kTranspose>
inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  fusedattn_emulation::ldmatrix(r, 1, row, kTranspose);
}
inline void cp_async_16(void* destination, const void* source, bool in_bounds) {
  fusedattn_emulation::cp_async_16(destination, source, in_bounds);
}
inline void cp_async_commit() { fusedattn_emulation::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  fusedattn_emulation::cp_async_wait(kPending);
}

#endif

}  // namespace fusedattn::cuda::warp
