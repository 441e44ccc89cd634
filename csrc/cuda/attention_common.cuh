// Building blocks shared by the forward and backward kernels: element conversions,
// tile configurations, tile loads, the score rule of docs/semantics.md, the dropout hash,
// and the 16x16 warp tile products (FMA) of the fp32 kernels.
//
// The fp16/bf16 kernels (attention_forward_mma.cuh, attention_backward_mma.cuh) keep their
// tiles in registers and use only the element, grid, sequence, score-rule and dropout pieces
// of this file. For the fp32 forward and backward:
// Design: every tile lives in shared memory. Matrix products are split into 16x16 output
// tiles handed to warps round-robin; each tile is computed by one warp (FMA) and written
// back to shared memory as float. All elementwise work (masking, softmax, dropout, gradients
// of the score rule) then reads and writes plain shared-memory arrays with a known (row,
// column) layout.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
// Without nvcc, the includer supplies the CUDA vocabulary (tests/cuda_emulation/ runs these
// kernels on the CPU, one std::thread per CUDA thread, to test them where no GPU exists).

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_params.h"

namespace fusedattn::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 16;  // warp tile edge of the fp32 kernels
// Largest dynamic shared memory one block may opt into on sm_80 (A100: 163 KB); sm_90 allows more.
constexpr int kMaxSharedBytes = 163 * 1024;

// ---- elements ----------------------------------------------------------------------------
template <typename Element>
__device__ __forceinline__ float to_float(Element x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename Element>
__device__ __forceinline__ Element from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename Element>
constexpr bool kIsFloat32 = std::is_same<Element, float>::value;

// ---- shared-memory layout helpers --------------------------------------------------------
constexpr int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

// Row pitch (elements) of a shared tile of `columns` elements: 16 extra bytes keep every row
// 16-byte aligned (vector copies) and shift consecutive rows across banks.
template <typename Element>
constexpr int padded_pitch(int columns) {
  return columns + 16 / static_cast<int>(sizeof(Element));
}

// Bytes of one shared region, rounded so the next region starts 128-byte aligned.
template <typename Element>
constexpr int region_bytes(int rows, int pitch) {
  return round_up(rows * pitch * static_cast<int>(sizeof(Element)), 128);
}

// ---- reductions ----------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// ---- dropout: the counter-based hash of semantics.py -----------------------------------------
// lowbias32; all arithmetic modulo 2^32.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// mix32(mix32(mix32(seed_key ^ sequence) ^ head) ^ row): the part shared by a query row.
__device__ __forceinline__ uint32_t dropout_row_hash(uint32_t seed_key, int sequence, int head, int row) {
  uint32_t h = mix32(seed_key ^ static_cast<uint32_t>(sequence));
  h = mix32(h ^ static_cast<uint32_t>(head));
  return mix32(h ^ static_cast<uint32_t>(row));
}

__device__ __forceinline__ bool dropout_keeps(uint32_t row_hash, int key, uint64_t threshold) {
  return static_cast<uint64_t>(mix32(row_hash ^ static_cast<uint32_t>(key))) >= threshold;
}

// ---- the grid ------------------------------------------------------------------------------
// One block per (tile, head, sequence), flattened onto grid.x, whose limit is 2^31 - 1 (grid.y
// and grid.z stop at 65535): block index = (batch * heads + head) * tiles + tile. The tile
// index runs fastest, so the blocks of one (sequence, head) are launched together.
constexpr int64_t kMaxGridBlocks = 2147483647;

__host__ __device__ constexpr int tile_count(int rows, int tile) { return rows <= 0 ? 0 : (rows - 1) / tile + 1; }

// Blocks of the flattened grid (host side): 0 when there is nothing to launch, -1 when the
// count passes kMaxGridBlocks (unreachable for tensors that fit in memory, still refused).
inline int64_t flat_grid_blocks(int64_t tiles, int64_t heads, int64_t batch) {
  if (tiles <= 0 || heads <= 0 || batch <= 0) return 0;
  if (tiles > kMaxGridBlocks / heads) return -1;
  const int64_t per_sequence = tiles * heads;
  if (per_sequence > kMaxGridBlocks / batch) return -1;
  return per_sequence * batch;
}

struct GridBlock {
  int tile;
  int head;
  int batch;
};

// This block's (tile, head, sequence) in a grid of flat_grid_blocks(tiles, heads, batch).
__device__ __forceinline__ GridBlock grid_block(int tiles, int heads, int index) {
  const int rest = index / tiles;
  GridBlock block;
  block.tile = index - rest * tiles;
  block.head = rest % heads;
  block.batch = rest / heads;
  return block;
}
__device__ __forceinline__ GridBlock grid_block(int tiles, int heads) {
  return grid_block(tiles, heads, static_cast<int>(blockIdx.x));
}

// ---- one sequence of a (dense or packed) batch ----------------------------------------------
__host__ __device__ constexpr int64_t clamp_int64(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}

// Rows [start, start + length) of a packed sequence: the one rule by which the kernels read
// cu_seqlens (docs/semantics.md, "Invalid metadata"). The host may not have checked the
// offsets (torch.compile, CUDA graph capture), so they are clamped into the tensor:
// start = clamp(cu[i], 0, total), end = clamp(cu[i + 1], start, total). Valid offsets pass
// unchanged; invalid ones give some range inside [0, total] (the op layer poisons the output).
struct SequenceRows {
  int start;
  int length;
};

__device__ __forceinline__ SequenceRows sequence_rows(const int32_t* cu_seqlens, int sequence, int64_t total) {
  const int64_t start = clamp_int64(cu_seqlens[sequence], 0, total);
  const int64_t end = clamp_int64(cu_seqlens[sequence + 1], start, total);
  return {static_cast<int>(start), static_cast<int>(end - start)};  // total <= kMaxRows
}

struct SequenceView {
  int q_row_base;    // first token of this sequence in the packed layout (0 when dense)
  int k_row_base;
  int seqlen_q;      // this sequence's Sq and Sk: its rows lie inside q and k
  int seqlen_k;
  int key_limit;     // keys j >= key_limit are masked (key_lengths), in [0, seqlen_k]
  int query_offset;  // key position of query row 0: Sk - Sq (bottom-right) or 0 (top-left)
  // Causal and window as a band: row i sees key j when lowest <= j - i <= highest. Computed
  // in int64 and clamped to +-(2^31 - 1), which changes no answer (|j - i| < 2^31) and keeps
  // the sums of positions and window sides out of int overflow.
  int lowest;
  int highest;

  // Causal, window, key length and row range rules (not the boolean mask).
  __device__ __forceinline__ bool visible(int row, int key) const {
    if (row >= seqlen_q || key >= key_limit) return false;
    const int distance = key - row;  // both in [0, 2^31): no overflow
    return distance >= lowest && distance <= highest;
  }
};

__device__ __forceinline__ SequenceView sequence_view(const AttentionParams& p, int batch) {
  SequenceView view;
  if (p.cu_seqlens_q != nullptr) {
    const SequenceRows rows_q = sequence_rows(p.cu_seqlens_q, batch, p.total_q);
    const SequenceRows rows_k = sequence_rows(p.cu_seqlens_k, batch, p.total_k);
    view.q_row_base = rows_q.start;
    view.k_row_base = rows_k.start;
    view.seqlen_q = rows_q.length;
    view.seqlen_k = rows_k.length;
  } else {
    view.q_row_base = 0;
    view.k_row_base = 0;
    view.seqlen_q = p.seqlen_q;
    view.seqlen_k = p.seqlen_k;
  }
  view.key_limit = view.seqlen_k;
  if (p.key_lengths != nullptr) view.key_limit = static_cast<int>(clamp_int64(p.key_lengths[batch], 0, view.seqlen_k));
  view.query_offset = p.bottom_right ? view.seqlen_k - view.seqlen_q : 0;
  constexpr int64_t kUnbounded = 2147483647;
  // Windows are >= 0, so causal (right side 0) is always the tighter right bound.
  const int64_t right = p.causal ? 0 : (p.window_right >= 0 ? p.window_right : kUnbounded);
  const int64_t left = p.window_left >= 0 ? p.window_left : kUnbounded;
  view.lowest = static_cast<int>(clamp_int64(int64_t{view.query_offset} - left, -kUnbounded, kUnbounded));
  view.highest = static_cast<int>(clamp_int64(int64_t{view.query_offset} + right, -kUnbounded, kUnbounded));
  return view;
}

// ---- the score rule: scale, softcap, ALiBi, masks ---------------------------------------------
// One per (sequence, query head). score() turns the raw dot product q_i . k_j into the
// final logit and says whether the pair is visible at all.
template <typename Element>
struct ScoreRule {
  float scale;
  float softcap;      // 0: off
  float alibi_slope;  // 0: off
  int query_offset;
  MaskKind mask_kind;
  const unsigned char* mask;  // already offset to (batch, head); byte address
  int64_t mask_row_stride;    // in elements
  int64_t mask_key_stride;

  __device__ __forceinline__ ScoreRule(const AttentionParams& p, const SequenceView& view, int batch, int head) {
    scale = p.scale;
    softcap = p.softcap;
    alibi_slope = 0.0f;
    if (p.alibi_slopes != nullptr)
      alibi_slope = p.alibi_slopes[batch * p.alibi_batch_stride + head * p.alibi_head_stride];
    query_offset = view.query_offset;
    mask_kind = p.mask_kind;
    mask = nullptr;
    mask_row_stride = p.mask_strides[2];
    mask_key_stride = p.mask_strides[3];
    if (mask_kind != MaskKind::None) {
      const int64_t element_bytes = mask_kind == MaskKind::Bool ? 1 : static_cast<int64_t>(sizeof(Element));
      mask = static_cast<const unsigned char*>(p.mask) +
             (batch * p.mask_strides[0] + head * p.mask_strides[1]) * element_bytes;
    }
  }

  // Returns false when the boolean mask hides (row, key). Otherwise writes the logit to
  // *logit and tanh(scaled / softcap) to *capped_tanh (for the softcap gradient).
  __device__ __forceinline__ bool score(float dot, int row, int key, float* logit, float* capped_tanh) const {
    const int64_t mask_index = row * mask_row_stride + key * mask_key_stride;
    if (mask_kind == MaskKind::Bool && mask[mask_index] == 0) return false;
    float s = dot * scale;
    float t = 0.0f;
    if (softcap > 0.0f) {
      // __fdividef (2 ulp): IEEE division calls a slow-path subroutine whose call spills.
      t = tanhf(__fdividef(s, softcap));
      s = softcap * t;
    }
    if (alibi_slope != 0.0f) s -= alibi_slope * fabsf(static_cast<float>(int64_t{row} - key + query_offset));
    if (mask_kind == MaskKind::Additive) s += to_float(reinterpret_cast<const Element*>(mask)[mask_index]);
    *logit = s;
    *capped_tanh = t;
    return true;
  }
};

// ---- tile loads ------------------------------------------------------------------------------
// For blocks of kThreads threads (the fp32 forward and the backward): a stride known at
// compile time keeps these loops free of the call-based loop exits that made ptxas spill.
// Copy `rows` x `columns` (columns a multiple of 16) from global rows `source` (row stride
// in elements) into a shared tile with pitch `pitch`; rows >= valid_rows and columns >=
// valid_columns are zero-filled, so padded products are exact.
template <typename Element>
__device__ __forceinline__ void load_tile(Element* tile, int pitch, const Element* source, int64_t row_stride,
                                          int rows, int columns, int valid_rows, int valid_columns,
                                          bool vector_loads) {
  if (vector_loads) {
    // 16-byte chunks; valid_columns is a multiple of the chunk, so chunks are all in or all out.
    constexpr int kChunk = 16 / static_cast<int>(sizeof(Element));
    const int chunks_per_row = columns / kChunk;
    for (int index = threadIdx.x; index < rows * chunks_per_row; index += kThreads) {
      const int row = index / chunks_per_row;
      const int column = (index % chunks_per_row) * kChunk;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (row < valid_rows && column < valid_columns)
        value = *reinterpret_cast<const uint4*>(source + row * row_stride + column);
      *reinterpret_cast<uint4*>(tile + row * pitch + column) = value;
    }
    return;
  }
  for (int index = threadIdx.x; index < rows * columns; index += kThreads) {
    const int row = index / columns;
    const int column = index % columns;
    Element value = from_float<Element>(0.0f);
    if (row < valid_rows && column < valid_columns) value = source[row * row_stride + column];
    tile[row * pitch + column] = value;
  }
}

template <typename T>
__device__ __forceinline__ void fill_shared(T* data, int count, T value) {
  for (int index = threadIdx.x; index < count; index += kThreads) data[index] = value;
}

// ---- 16x16 warp tile products -----------------------------------------------------------------
// C(16x16) = A(16 x 16*k_steps) * B(16*k_steps x 16), computed by one warp.
// A is row-major (A[m * lda + k]) or column-major (A[k * lda + m]); B likewise
// (row-major B[k * ldb + n], column-major B[n * ldb + k]). Pointers are at the tile origin.
enum class TileOutput {
  Overwrite,     // shared float tile c = A B
  Accumulate,    // shared float tile c += A B
  AtomicGlobal,  // global float rows: atomicAdd of A B (bounded by valid rows/columns)
};

struct TileDestination {
  float* data;       // shared tile origin, or global row 0 / column 0 of the tile
  int64_t pitch;     // elements between rows
  int valid_rows;    // AtomicGlobal only
  int valid_columns;
};

template <bool kRowMajor>
__device__ __forceinline__ int64_t a_index(int m, int k, int lda) {
  return kRowMajor ? static_cast<int64_t>(m) * lda + k : static_cast<int64_t>(k) * lda + m;
}
template <bool kRowMajor>
__device__ __forceinline__ int64_t b_index(int k, int n, int ldb) {
  return kRowMajor ? static_cast<int64_t>(k) * ldb + n : static_cast<int64_t>(n) * ldb + k;
}

// Lane owns column lane % 16 and rows lane / 16 + 2 t, t = 0..7 (FMA: only fp32 uses these).
template <typename Element, bool kARowMajor, bool kBRowMajor, TileOutput kOutput>
__device__ __forceinline__ void tile_product(const Element* a, int lda, const Element* b, int ldb, int k_steps,
                                             const TileDestination& destination) {
  const int lane = threadIdx.x % 32;
  const int column = lane % 16;
  const int first_row = lane / 16;
  float accumulator[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    accumulator[t] = 0.0f;
    if (kOutput == TileOutput::Accumulate)
      accumulator[t] = destination.data[(first_row + 2 * t) * destination.pitch + column];
  }
  const int depth = k_steps * kTile;
  for (int k = 0; k < depth; ++k) {
    const float b_value = to_float(b[b_index<kBRowMajor>(k, column, ldb)]);
#pragma unroll
    for (int t = 0; t < 8; ++t)
      accumulator[t] = fmaf(to_float(a[a_index<kARowMajor>(first_row + 2 * t, k, lda)]), b_value, accumulator[t]);
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const int row = first_row + 2 * t;
    if (kOutput == TileOutput::AtomicGlobal) {
      if (row < destination.valid_rows && column < destination.valid_columns)
        atomicAdd(destination.data + row * destination.pitch + column, accumulator[t]);
    } else {
      destination.data[row * destination.pitch + column] = accumulator[t];
    }
  }
}

// Head-dim buckets: one kernel per bucket, the smallest multiple of 32 holding max(D, Dv).
#define FUSEDATTN_FOR_EACH_HEAD_DIM(MACRO) \
  MACRO(32) MACRO(64) MACRO(96) MACRO(128) MACRO(160) MACRO(192) MACRO(224) MACRO(256)

inline int head_dim_bucket(int head_dim, int head_dim_v) {
  const int largest = head_dim > head_dim_v ? head_dim : head_dim_v;
  return (largest + 31) / 32 * 32;
}

// Round a head dim up to the 16-column tiles the products run over.
__device__ __forceinline__ int tiles_of(int columns) { return (columns + kTile - 1) / kTile; }

}  // namespace fusedattn::cuda
