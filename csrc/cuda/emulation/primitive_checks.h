// A one-warp test kernel for the primitives of warp_mma.cuh, run by the emulation
// (emulated_ops.cpp registers it as fusedattn_cuda_emulation::primitive_check; the tests in
// tests/test_cuda_warp_primitives.py compare it with plain matrix products).
//
// It computes d = 1 + a b for a (16x16) and b (16x8), 16-bit elements, d float, by one
// m16n8k16 mma whose operands arrive one of several ways (PrimitiveCheck), so that the
// fragment layouts of mma, ldmatrix (plain and .trans, x1/x2/x4) and the cp.async wait rules
// are each exercised by a product that only comes out right if every lane holds the right
// elements.
#pragma once

#include "../warp_mma.cuh"

namespace fusedattn::cuda {

enum class PrimitiveCheck : int {
  // Each lane builds its registers from global memory by the documented fragment layouts.
  RegistersFromLayout = 0,
  // cp.async a and b (k, n) into shared; ldmatrix.x4 for a, ldmatrix.x2.trans for b.
  LdmatrixTransposed = 1,
  // cp.async a and b^T (n, k) into shared; ldmatrix.x4 for a, two ldmatrix.x1 for b.
  LdmatrixPlain = 2,
  // As LdmatrixTransposed, but ldmatrix reads before cp.async.wait_group: must be reported.
  ReadBeforeWait = 3,
  // As LdmatrixTransposed, plus one more committed copy that is never waited for: must be
  // reported when the thread ends.
  NeverWaited = 4,
};

struct PrimitiveCheckParams {
  const void* a;  // 16 x 16 row-major
  const void* b;  // 16 x 8 row-major (k, n)
  float* d;       // 16 x 8 row-major
  PrimitiveCheck check;
  int valid_rows;  // rows of a at or past this are zero-filled by cp.async (src-size 0)
};

// Shared layout: a at 0 (16 rows, pitch 24 elements), b or b^T at 1024, the copy that
// NeverWaited leaves pending at 2048.
constexpr int kPrimitiveCheckSharedBytes = 2560;

template <typename Element>
__device__ void primitive_check_kernel(const PrimitiveCheckParams p) {
  extern __shared__ __align__(128) unsigned char shared[];
  const int lane = threadIdx.x % 32;
  const int group = lane >> 2;
  const int thread_in_group = lane % 4;
  const Element* a = static_cast<const Element*>(p.a);
  const Element* b = static_cast<const Element*>(p.b);
  uint32_t a_registers[4];
  uint32_t b_registers[2];
  if (p.check == PrimitiveCheck::RegistersFromLayout) {
    for (int r = 0; r < 4; ++r) {  // register r holds elements 2 r, 2 r + 1
      const int row = group + 8 * (r % 2);
      const int column = thread_in_group * 2 + 8 * (r / 2);
      a_registers[r] = warp::pack_pair(a[row * 16 + column], a[row * 16 + column + 1]);
    }
    for (int r = 0; r < 2; ++r) {
      const int row = thread_in_group * 2 + 8 * r;
      b_registers[r] = warp::pack_pair(b[row * 8 + group], b[(row + 1) * 8 + group]);
    }
  } else {
    constexpr int kPitch = 24;  // elements: 48-byte rows, 16-byte aligned
    Element* a_tile = reinterpret_cast<Element*>(shared);
    Element* b_tile = reinterpret_cast<Element*>(shared + 1024);
    // a: 16 rows x 2 chunks of 8 elements, one chunk per lane.
    const int a_row = lane / 2;
    const int a_column = (lane % 2) * 8;
    warp::cp_async_16(a_tile + a_row * kPitch + a_column, a + a_row * 16 + a_column, a_row < p.valid_rows);
    if (p.check == PrimitiveCheck::LdmatrixPlain) {
      // b^T (n, k) from b: 8 rows of 16; built with plain stores (b is (k, n) in global).
      for (int index = lane; index < 8 * 16; index += 32) {
        const int n = index / 16;
        const int k = index % 16;
        b_tile[n * kPitch + k] = b[k * 8 + n];
      }
    } else if (lane < 16) {  // b (k, n): 16 rows of one chunk
      warp::cp_async_16(b_tile + lane * kPitch, b + lane * 8, true);
    }
    warp::cp_async_commit();
    if (p.check != PrimitiveCheck::ReadBeforeWait) warp::cp_async_wait<0>();
    __syncwarp();
    // a: matrix m = lane / 8 is (rows 8 (m % 2).., columns 8 (m / 2)..): registers 0..3.
    const int matrix = lane / 8;
    warp::ldmatrix_x4<false>(a_registers, a_tile + (lane % 8 + 8 * (matrix % 2)) * kPitch + 8 * (matrix / 2));
    if (p.check == PrimitiveCheck::LdmatrixPlain) {
      // b^T rows n = 0..7, columns k 0..7 then 8..15: plain loads give (row g = n, cols 2t = k).
      uint32_t low[1], high[1];
      warp::ldmatrix_x1<false>(low, b_tile + (lane % 8) * kPitch);
      warp::ldmatrix_x1<false>(high, b_tile + (lane % 8) * kPitch + 8);
      b_registers[0] = low[0];
      b_registers[1] = high[0];
    } else {
      // b rows k = 0..7 then 8..15 (lanes 0..15 give the addresses): transposed loads.
      warp::ldmatrix_x2<true>(b_registers, b_tile + (lane % 16) * kPitch);
    }
    if (p.check == PrimitiveCheck::ReadBeforeWait) warp::cp_async_wait<0>();
  }
  if (p.check == PrimitiveCheck::NeverWaited) {
    warp::cp_async_16(shared + 2048 + 16 * lane, p.a, true);
    warp::cp_async_commit();
  }
  float d[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  warp::mma_m16n8k16<Element>(d, a_registers, b_registers);
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i / 2);
    const int column = thread_in_group * 2 + (i % 2);
    p.d[row * 8 + column] = d[i];
  }
}

}  // namespace fusedattn::cuda
