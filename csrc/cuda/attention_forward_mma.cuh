// Flash attention forward for fp16/bf16 in FlashAttention 2's structure (fp32 keeps the FMA
// kernel of attention_forward.cuh). One block of kWarps warps per (query tile, query head,
// sequence), flattened onto grid.x (grid_block); each warp owns 16 query rows.
//
// Per key tile:
//   * K and V of the next tile are already in flight (cp.async, two shared-memory stages);
//   * S = Q K^T in registers: Q and K fragments by ldmatrix from shared memory, mma.sync
//     m16n8k16 with f32 accumulators (warp_mma.cuh);
//   * the score rule and the online softmax on the accumulator fragments: each row lives in
//     the 4 lanes of one quad, so row max and sum need two __shfl_xor_sync;
//   * O += P V with P straight from registers: the C fragment of two adjacent m16n8 score
//     tiles (keys 16 s .. 16 s + 15) holds, lane for lane, the elements of the A fragment of
//     m16n8k16 (row g: keys 2t, 2t+1 then 2t+8, 2t+9; row g + 8 likewise), so converting
//     the floats to fp16/bf16 pairs is the whole hand-over; V fragments by ldmatrix.trans.
// O stays in registers and is written once at the end, with lse. Key tiles no row of the
// block can see (causal, window, key length) are skipped; rows and keys past the sequence
// are zero-filled by cp.async (src-size 0), so padded products are exact.
#pragma once

#include "attention_common.cuh"
#include "warp_mma.cuh"

namespace fusedattn::cuda {

// Block shape per head-dim bucket. 128 query rows over 8 warps; 64 keys per tile up to
// D 128 (Q 34 KB + K, V two stages 68 KB: two blocks per SM on sm_90 and sm_80), 32 keys
// up to D 224 (119 KB at D 224), 16 at D 256 (101 KB): the registers of a 16 x 256 O
// accumulator leave room for no more scores without spilling (nvcc 13, sm_90).
template <typename Element, int kHeadDim>
struct MmaForwardConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = mma_forward_block_n(kHeadDim);
  static constexpr int kStages = 2;
  // Registers decide: a cap of 128 per thread (__launch_bounds__(256, 2), two blocks per SM)
  // spills 8-344 bytes of stack at every head dim on sm_90 and all but D 64 on sm_80
  // (measured with nvcc 13), so no minimum is asked: one block of 8 warps per SM.
  static constexpr int kMinBlocksPerSM = 1;
  // 16 bytes of padding per row: the 8 rows of an ldmatrix matrix (and of a cp.async wave)
  // start 4 banks apart, so they hit all 32 banks once.
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kRowBytes = kPitch * static_cast<int>(sizeof(Element));
  static constexpr int kQueryOffset = 0;
  static constexpr int kKeyOffset = kQueryOffset + kBlockM * kRowBytes;
  static constexpr int kValueOffset = kKeyOffset + kStages * kBlockN * kRowBytes;
  static constexpr int kSharedBytes = kValueOffset + kStages * kBlockN * kRowBytes;

  static_assert(sizeof(Element) == 2, "the mma kernel is for fp16 and bf16");
  static_assert(kBlockM == kMmaForwardBlockM && kBlockN == mma_forward_block_n(kHeadDim),
                "forward_split_count (attention_params.h) sizes splits by these tiles");
  static_assert(kHeadDim % 32 == 0 && kBlockN % 16 == 0, "fragments come in pairs of 8-column tiles");
  static_assert(kRowBytes % 16 == 0, "ldmatrix rows and cp.async chunks are 16-byte aligned");
  static_assert(kSharedBytes <= kMaxSharedBytes, "forward tile does not fit sm_80 shared memory");
};

// Copy kRows x kColumns elements from global rows `source` into a shared tile (row pitch
// kPitch). Rows >= valid_rows and columns >= valid_columns are zero. With vector loads
// (16-byte aligned rows, valid_columns a multiple of 8) by cp.async in 16-byte chunks, which
// the caller commits and waits for; else by plain loads and stores.
template <typename Element, int kRows, int kColumns, int kPitch, int kThreadCount>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* source, int64_t row_stride,
                                                int valid_rows, int valid_columns, bool vector_loads) {
  if (vector_loads) {
    constexpr int kChunk = 8;  // 16 bytes
    constexpr int kChunks = kRows * (kColumns / kChunk);
#pragma unroll
    for (int round = 0; round < (kChunks + kThreadCount - 1) / kThreadCount; ++round) {
      const int index = round * kThreadCount + static_cast<int>(threadIdx.x);
      if (kChunks % kThreadCount != 0 && index >= kChunks) break;
      const int row = index / (kColumns / kChunk);
      const int column = index % (kColumns / kChunk) * kChunk;
      const bool in_bounds = row < valid_rows && column < valid_columns;
      // Out of bounds nothing is read; the address stays a valid one all the same.
      const Element* from = in_bounds ? source + row * row_stride + column : source;
      warp::cp_async_16(tile + row * kPitch + column, from, in_bounds);
    }
    return;
  }
  // Rolled: unrolled, the element loads in flight took the registers the backward's
  // accumulators need (this path serves only rows that are not 16-byte aligned).
#pragma unroll 1
  for (int index = threadIdx.x; index < kRows * kColumns; index += kThreadCount) {
    const int row = index / kColumns;
    const int column = index % kColumns;
    Element value = from_float<Element>(0.0f);
    if (row < valid_rows && column < valid_columns) value = source[row * row_stride + column];
    tile[row * kPitch + column] = value;
  }
}

__device__ __forceinline__ float quad_max(float value) {
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}

__device__ __forceinline__ float quad_sum(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

// The end of a row, by the rules of attention_forward.cuh: out = O * scale, lse. A row that
// saw no key (sum 0 before the sink) is 0 even beside NaN values it did not see, with lse
// -inf or the sink; a NaN sum stays NaN; a sink joins the sum only.
struct FinishedRow {
  float scale;
  bool zero;
  float lse;
};

__device__ __forceinline__ FinishedRow finish_row(const AttentionParams& p, int head, float row_total,
                                                  float maximum) {
  float sum = row_total;
  float rescale = 1.0f;
  if (p.sinks != nullptr) {
    const float sink = p.sinks[head];
    const float combined = maximum > sink ? maximum : sink;
    if (combined != -INFINITY) {
      rescale = maximum == -INFINITY ? 0.0f : expf(maximum - combined);  // NaN stays NaN
      sum = sum * rescale + expf(sink - combined);
      maximum = combined;
    }
  }
  const bool empty = sum == 0.0f;
  FinishedRow finished;
  finished.zero = row_total == 0.0f;
  // __fdividef (sum >= 1 here): IEEE division calls a slow-path subroutine.
  finished.scale = empty ? 0.0f : __fdividef((p.dropout_threshold != 0 ? p.dropout_keep_scale : 1.0f) * rescale, sum);
  finished.lse = empty ? -INFINITY : maximum + logf(sum);
  return finished;
}

// The row of a split-KV partial (AttentionParams::split_out, split_stats).
__device__ __forceinline__ int64_t split_row_index(const AttentionParams& p, const SequenceView& view, int batch,
                                                   int head, int row) {
  if (p.cu_seqlens_q != nullptr) return int64_t{head} * p.total_q + view.q_row_base + row;
  return (int64_t{batch} * p.heads_q + head) * p.seqlen_q + row;
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(MmaForwardConfig<Element, kHeadDim>::kThreads,
                                  MmaForwardConfig<Element, kHeadDim>::kMinBlocksPerSM)
    attention_forward_mma_kernel(const AttentionParams p) {
  using Config = MmaForwardConfig<Element, kHeadDim>;
  constexpr int kBlockM = Config::kBlockM;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kPitch = Config::kPitch;
  constexpr int kThreadCount = Config::kThreads;
  constexpr int kScoreTiles = kBlockN / 8;     // m16n8 tiles of S per warp
  constexpr int kDimSteps = kHeadDim / 16;     // k steps of Q K^T
  constexpr int kOutputTiles = kHeadDim / 8;   // m16n8 tiles of O per warp
  constexpr int kKeySteps = kBlockN / 16;      // k steps of P V

  extern __shared__ __align__(128) unsigned char shared[];
  Element* query_tile = reinterpret_cast<Element*>(shared + Config::kQueryOffset);
  Element* key_stages = reinterpret_cast<Element*>(shared + Config::kKeyOffset);
  Element* value_stages = reinterpret_cast<Element*>(shared + Config::kValueOffset);

  const int warp_index = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane >> 2;           // the row (and row + 8) of this lane's fragments
  const int thread_in_group = lane % 4;  // its column pair
  const int query_tiles = tile_count(p.seqlen_q, kBlockM);
  const int splits = p.num_splits;
  const GridBlock block = grid_block(query_tiles * splits, p.heads_q);
  const int split = block.tile % splits;
  const int query_block = query_tiles - 1 - block.tile / splits;  // the last tiles (most keys) first
  const int head = block.head;
  const int batch = block.batch;
  const SequenceView view = sequence_view(p, batch);
  const int first_row = query_block * kBlockM;
  if (first_row >= view.seqlen_q) return;
  const int valid_rows = min(kBlockM, view.seqlen_q - first_row);
  const int kv_head = head / (p.heads_q / p.heads_kv);
  const ScoreRule<Element> rule(p, view, batch, head);
  const bool dropout = p.dropout_threshold != 0;
  const bool plain_rule = p.mask_kind == MaskKind::None && p.softcap == 0.0f && rule.alibi_slope == 0.0f;

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch + head * p.q_strides.head +
                     (int64_t{view.q_row_base} + first_row) * p.q_strides.row;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch + kv_head * p.k_strides.head +
                     static_cast<int64_t>(view.k_row_base) * p.k_strides.row;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch + kv_head * p.v_strides.head +
                     static_cast<int64_t>(view.k_row_base) * p.v_strides.row;

  // Keys any row of this block can see: [key_begin, key_end), key_end <= key_limit.
  const int64_t last_row = first_row + valid_rows - 1;
  int key_begin = static_cast<int>(clamp_int64(int64_t{first_row} + view.lowest, 0, kMaxRows));
  const int key_end = static_cast<int>(clamp_int64(last_row + view.highest + 1, 0, view.key_limit));
  key_begin = key_begin / kBlockN * kBlockN;
  const int key_tiles = key_end > key_begin ? tile_count(key_end - key_begin, kBlockN) : 0;
  // This split's tiles: [tile_begin, tile_end) of [0, key_tiles).
  const int tiles_per_split = tile_count(key_tiles, splits);
  const int tile_begin = min(key_tiles, split * tiles_per_split);
  const int tile_end = min(key_tiles, tile_begin + tiles_per_split);

  auto load_key_value_tile = [&](int tile, int stage) {
    const int key_start = key_begin + tile * kBlockN;  // < key_end: no overflow
    // Keys past key_limit are storage past key_lengths: never read, zero-filled.
    const int valid_keys = min(kBlockN, view.key_limit - key_start);
    load_tile_async<Element, kBlockN, kHeadDim, kPitch, kThreadCount>(
        key_stages + stage * kBlockN * kPitch, k + static_cast<int64_t>(key_start) * p.k_strides.row,
        p.k_strides.row, valid_keys, p.head_dim, p.vector_loads);
    load_tile_async<Element, kBlockN, kHeadDim, kPitch, kThreadCount>(
        value_stages + stage * kBlockN * kPitch, v + static_cast<int64_t>(key_start) * p.v_strides.row,
        p.v_strides.row, valid_keys, p.head_dim_v, p.vector_loads);
  };

  // Group 0: Q and the first key tile.
  load_tile_async<Element, kBlockM, kHeadDim, kPitch, kThreadCount>(query_tile, q, p.q_strides.row, valid_rows,
                                                                    p.head_dim, p.vector_loads);
  if (tile_begin < tile_end) load_key_value_tile(tile_begin, tile_begin % Config::kStages);
  warp::cp_async_commit();

  // This lane's rows (h = 0: row g, h = 1: row g + 8 of the warp's 16), their running max and
  // their partial sum over this lane's columns (the quad's four are added at the end).
  int rows[2];
  float row_max[2], row_sum[2];
  uint32_t row_hash[2] = {0u, 0u};
  for (int h = 0; h < 2; ++h) {
    rows[h] = first_row + warp_index * 16 + group + 8 * h;
    row_max[h] = -INFINITY;
    row_sum[h] = 0.0f;
    if (dropout) row_hash[h] = dropout_row_hash(p.dropout_seed_key, batch, head, rows[h]);
  }
  float output[kOutputTiles][4];
#pragma unroll
  for (int n = 0; n < kOutputTiles; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) output[n][i] = 0.0f;

  // ldmatrix row addresses of this lane, relative to a fragment's origin (warp_mma.cuh):
  // A (Q): matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15), row-halves first;
  // B (K, plain): (keys 0-7, dims 0-7 | 8-15), then keys 8-15: two n-tiles per load;
  // B (V, .trans): (keys 0-7 | 8-15, dims 0-7), then dims 8-15: two n-tiles per load.
  const int matrix = lane / 8;
  const int query_offset = (warp_index * 16 + lane % 8 + 8 * (matrix % 2)) * kPitch + 8 * (matrix / 2);
  const int key_offset = (8 * (matrix / 2) + lane % 8) * kPitch + 8 * (matrix % 2);
  const int value_offset = (8 * (matrix % 2) + lane % 8) * kPitch + 8 * (matrix / 2);

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = tile % Config::kStages;
    __syncthreads();  // every warp is done with the stage the next tile goes to
    if (tile + 1 < tile_end) {
      load_key_value_tile(tile + 1, (tile + 1) % Config::kStages);
      warp::cp_async_commit();
      warp::cp_async_wait<1>();  // this tile's group has landed; the next one may still fly
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();  // ... for every thread's copies
    const int key_start = key_begin + tile * kBlockN;
    const Element* key_tile = key_stages + stage * kBlockN * kPitch;
    const Element* value_tile = value_stages + stage * kBlockN * kPitch;

    // S = Q K^T for the warp's 16 rows.
    float scores[kScoreTiles][4];
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) scores[n][i] = 0.0f;
#pragma unroll
    for (int step = 0; step < kDimSteps; ++step) {
      uint32_t a[4];
      warp::ldmatrix_x4<false>(a, query_tile + query_offset + step * 16);
#pragma unroll
      for (int n = 0; n < kScoreTiles; n += 2) {
        uint32_t b[4];
        warp::ldmatrix_x4<false>(b, key_tile + key_offset + n * 8 * kPitch + step * 16);
        const uint32_t b_low[2] = {b[0], b[1]};
        const uint32_t b_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(scores[n], a, b_low);
        warp::mma_m16n8k16<Element>(scores[n + 1], a, b_high);
      }
    }

    // The score rule and the online softmax; scores[n][i] is (row rows[i / 2],
    // key key_start + 8 n + 2 thread_in_group + i % 2).
    // Inside the band, the key length and the rows, with no mask, softcap or ALiBi, the rule
    // is the scale alone: the usual case, taken per warp (the test is warp-uniform).
    float tile_max[2] = {-INFINITY, -INFINITY};
    const int64_t warp_first_row = first_row + warp_index * 16;  // int64: no overflow near 2^31
    const int64_t tile_last_key = int64_t{key_start} + kBlockN - 1;
    const bool scale_only = plain_rule && warp_first_row + 15 < view.seqlen_q && tile_last_key < view.key_limit &&
                            key_start - (warp_first_row + 15) >= view.lowest &&
                            tile_last_key - warp_first_row <= view.highest;
    if (scale_only) {
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          scores[n][i] *= p.scale;
          tile_max[i / 2] = fmaxf(tile_max[i / 2], scores[n][i]);
        }
    } else {
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = rows[i / 2];
          const int key = key_start + 8 * n + 2 * thread_in_group + i % 2;
          float logit = -INFINITY;
          float unused_tanh;
          if (view.visible(row, key) && !rule.score(scores[n][i], row, key, &logit, &unused_tanh))
            logit = -INFINITY;
          scores[n][i] = logit;
          tile_max[i / 2] = fmaxf(tile_max[i / 2], logit);
        }
    }
    float reference[2], correction[2], tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float new_max = fmaxf(row_max[h], quad_max(tile_max[h]));
      // A row that has seen no visible key keeps max -inf; subtract 0 so exp gives 0, not NaN.
      reference[h] = new_max == -INFINITY ? 0.0f : new_max;
      correction[h] = __expf(row_max[h] - reference[h]);
      row_max[h] = new_max;
    }
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float probability = __expf(scores[n][i] - reference[i / 2]);
        tile_sum[i / 2] += probability;
        // Dropped probabilities are zeroed here; 1 / (1 - p) is applied to the finished row.
        const int key = key_start + 8 * n + 2 * thread_in_group + i % 2;
        const bool dropped = dropout && !dropout_keeps(row_hash[i / 2], key, p.dropout_threshold);
        scores[n][i] = dropped ? 0.0f : probability;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * correction[h] + tile_sum[h];
#pragma unroll
    for (int n = 0; n < kOutputTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) output[n][i] *= correction[i / 2];

    // O += P V, P from registers (see the header comment).
#pragma unroll
    for (int step = 0; step < kKeySteps; ++step) {
      const float* low = scores[2 * step];
      const float* high = scores[2 * step + 1];
      const uint32_t a[4] = {
          warp::pack_pair(from_float<Element>(low[0]), from_float<Element>(low[1])),
          warp::pack_pair(from_float<Element>(low[2]), from_float<Element>(low[3])),
          warp::pack_pair(from_float<Element>(high[0]), from_float<Element>(high[1])),
          warp::pack_pair(from_float<Element>(high[2]), from_float<Element>(high[3])),
      };
#pragma unroll
      for (int n = 0; n < kOutputTiles; n += 2) {
        uint32_t b[4];
        warp::ldmatrix_x4<true>(b, value_tile + value_offset + step * 16 * kPitch + n * 8);
        const uint32_t b_low[2] = {b[0], b[1]};
        const uint32_t b_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(output[n], a, b_low);
        warp::mma_m16n8k16<Element>(output[n + 1], a, b_high);
      }
    }
  }
  warp::cp_async_wait<0>();  // no key tile: Q's group is still to be retired

  // One split: O (unnormalized), max and sum go to the partials for the combine kernel.
  // Otherwise out = O / l and lse = max + log(l) (finish_row).
  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch + head * p.out_strides.head;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float row_total = quad_sum(row_sum[h]);
    const int row = rows[h];
    if (row - first_row >= valid_rows) continue;
    if (splits > 1) {
      const int64_t index = split * p.split_rows + split_row_index(p, view, batch, head, row);
      float* partial = p.split_out + index * p.head_dim_v;
#pragma unroll
      for (int n = 0; n < kOutputTiles; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int column = 8 * n + 2 * thread_in_group + j;
          if (column < p.head_dim_v) partial[column] = output[n][2 * h + j];
        }
      if (thread_in_group == 0) {
        p.split_stats[2 * index] = row_max[h];
        p.split_stats[2 * index + 1] = row_total;
      }
      continue;
    }
    const FinishedRow finished = finish_row(p, head, row_total, row_max[h]);
    Element* out_row = out + (int64_t{view.q_row_base} + row) * p.out_strides.row;
#pragma unroll
    for (int n = 0; n < kOutputTiles; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int column = 8 * n + 2 * thread_in_group + j;
        if (column < p.head_dim_v)
          out_row[column] = from_float<Element>(finished.zero ? 0.0f : output[n][2 * h + j] * finished.scale);
      }
    if (thread_in_group == 0) {
      p.lse[batch * p.lse_strides.batch + head * p.lse_strides.head +
            (int64_t{view.q_row_base} + row) * p.lse_strides.row] = finished.lse;
    }
  }
}

// Split-KV combine: one block per (query tile, head, sequence) of the unsplit grid, one warp
// per row at a time. Merges the splits' partials by their maxima, skipping splits in which
// the row saw no key (their O may hold 0 * NaN from values it did not see), then finishes
// the row as the unsplit kernel does.
template <typename Element>
__global__ void __launch_bounds__(kThreads) attention_forward_combine_kernel(const AttentionParams p) {
  const int warp_index = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int query_tiles = tile_count(p.seqlen_q, kMmaForwardBlockM);
  const GridBlock block = grid_block(query_tiles, p.heads_q);
  const int head = block.head;
  const int batch = block.batch;
  const SequenceView view = sequence_view(p, batch);
  const int first_row = (query_tiles - 1 - block.tile) * kMmaForwardBlockM;
  if (first_row >= view.seqlen_q) return;
  const int valid_rows = min(kMmaForwardBlockM, view.seqlen_q - first_row);
  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch + head * p.out_strides.head;
  for (int r = warp_index; r < valid_rows; r += kWarps) {
    const int row = first_row + r;
    const int64_t index = split_row_index(p, view, batch, head, row);
    float maximum = -INFINITY;
    for (int split = 0; split < p.num_splits; ++split)
      maximum = fmaxf(maximum, p.split_stats[2 * (split * p.split_rows + index)]);
    const float reference = maximum == -INFINITY ? 0.0f : maximum;
    float sum = 0.0f;
    for (int split = 0; split < p.num_splits; ++split) {
      const int64_t at = split * p.split_rows + index;
      const float split_sum = p.split_stats[2 * at + 1];
      if (split_sum != 0.0f) sum += split_sum * __expf(p.split_stats[2 * at] - reference);
    }
    const FinishedRow finished = finish_row(p, head, sum, maximum);
    Element* out_row = out + (int64_t{view.q_row_base} + row) * p.out_strides.row;
    for (int column = lane; column < p.head_dim_v; column += 32) {
      float value = 0.0f;
      for (int split = 0; split < p.num_splits; ++split) {
        const int64_t at = split * p.split_rows + index;
        if (p.split_stats[2 * at + 1] != 0.0f)
          value += p.split_out[at * p.head_dim_v + column] * __expf(p.split_stats[2 * at] - reference);
      }
      out_row[column] = from_float<Element>(finished.zero ? 0.0f : value * finished.scale);
    }
    if (lane == 0) {
      p.lse[batch * p.lse_strides.batch + head * p.lse_strides.head +
            (int64_t{view.q_row_base} + row) * p.lse_strides.row] = finished.lse;
    }
  }
}

// Blocks of the forward grid (with its splits) and of the combine grid, as flat_grid_blocks.
template <typename Element, int kHeadDim>
int64_t mma_forward_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(int64_t{tile_count(p.seqlen_q, kMmaForwardBlockM)} * p.num_splits, p.heads_q, p.batch);
}
inline int64_t combine_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(tile_count(p.seqlen_q, kMmaForwardBlockM), p.heads_q, p.batch);
}

#if defined(__CUDACC__)
template <typename Element, int kHeadDim>
const char* launch_attention_forward_mma(const AttentionParams& p, cudaStream_t stream) {
  using Config = MmaForwardConfig<Element, kHeadDim>;
  const int64_t blocks = mma_forward_grid_blocks<Element, kHeadDim>(p);
  if (blocks == 0) return nullptr;
  if (blocks < 0) return "fusedattn cuda: more than 2^31 - 1 query tiles x heads x sequences";
  auto kernel = attention_forward_mma_kernel<Element, kHeadDim>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSharedBytes);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  kernel<<<dim3(static_cast<unsigned>(blocks)), Config::kThreads, Config::kSharedBytes, stream>>>(p);
  error = cudaGetLastError();
  if (error != cudaSuccess || p.num_splits == 1) return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
  attention_forward_combine_kernel<Element><<<dim3(static_cast<unsigned>(combine_grid_blocks(p))), kThreads, 0,
                                              stream>>>(p);
  error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename Element>
const char* attention_forward_mma_for(const AttentionParams& p, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_FORWARD_MMA_CASE(HEAD_DIM) \
  case HEAD_DIM:                             \
    return launch_attention_forward_mma<Element, HEAD_DIM>(p, cuda_stream);
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_FORWARD_MMA_CASE)
#undef FUSEDATTN_FORWARD_MMA_CASE
    default:
      return "fusedattn cuda: this build has no kernel for this head dim";
  }
}
#endif  // __CUDACC__

}  // namespace fusedattn::cuda
