// Flash attention forward: one block per (query tile, query head, sequence), flattened onto
// grid.x (grid_block), streaming key/value tiles with an online softmax. Writes out (Dv
// columns) and lse (natural log).
//
// Per key tile:  S = Q K^T (warp tiles)  ->  softmax update by rows (one warp per row):
// mask, new running max, P = exp(S - max), dropout on P, rescale the output row  ->
// O += P V (warp tiles). Key tiles no query row of the block can see (causal, window,
// key length) are skipped entirely.
#pragma once

#include "attention_common.cuh"

namespace fusedattn::cuda {

// Tile sizes per head-dim bucket of this float32 kernel (fp16/bf16 take the mma kernel of
// attention_forward_mma.cuh), chosen so one block fits the sm_80 shared-memory limit
// (asserted below) and, at D <= 128, two blocks an sm_90 SM (checked by
// scripts/cuda_resource_report.py).
template <typename Element, int kHeadDim>
struct ForwardConfig {
  static_assert(kIsFloat32<Element>, "fp16/bf16 forwards use MmaForwardConfig");
  static constexpr int kBlockM = kHeadDim > 96 ? 32 : 64;  // query rows
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;  // keys
  static constexpr int kInputPitch = padded_pitch<Element>(kHeadDim);  // Q, K, V tiles
  static constexpr int kScorePitch = padded_pitch<float>(kBlockN);
  static constexpr int kProbabilityPitch = padded_pitch<Element>(kBlockN);
  static constexpr int kOutputPitch = padded_pitch<float>(kHeadDim);

  static constexpr int kQueryOffset = 0;
  static constexpr int kKeyOffset = kQueryOffset + region_bytes<Element>(kBlockM, kInputPitch);
  static constexpr int kValueOffset = kKeyOffset + region_bytes<Element>(kBlockN, kInputPitch);
  static constexpr int kScoreOffset = kValueOffset + region_bytes<Element>(kBlockN, kInputPitch);
  static constexpr int kProbabilityOffset = kScoreOffset + region_bytes<float>(kBlockM, kScorePitch);
  static constexpr int kOutputOffset = kProbabilityOffset + region_bytes<Element>(kBlockM, kProbabilityPitch);
  static constexpr int kRowMaxOffset = kOutputOffset + region_bytes<float>(kBlockM, kOutputPitch);
  static constexpr int kRowSumOffset = kRowMaxOffset + region_bytes<float>(kBlockM, 1);
  static constexpr int kSharedBytes = kRowSumOffset + region_bytes<float>(kBlockM, 1);

  static_assert(kBlockM % kTile == 0 && kBlockN % kTile == 0, "tiles are made of 16x16 warp tiles");
  static_assert(kHeadDim % 32 == 0, "head-dim buckets are multiples of 32");
  static_assert(kSharedBytes <= kMaxSharedBytes, "forward tile does not fit sm_80 shared memory");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const AttentionParams p) {
  using Config = ForwardConfig<Element, kHeadDim>;
  constexpr int kBlockM = Config::kBlockM;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kInputPitch = Config::kInputPitch;
  constexpr int kScorePitch = Config::kScorePitch;
  constexpr int kProbabilityPitch = Config::kProbabilityPitch;
  constexpr int kOutputPitch = Config::kOutputPitch;
  constexpr int kColumnsPerLane = (kBlockN + 31) / 32;

  extern __shared__ __align__(128) unsigned char shared[];
  Element* query_tile = reinterpret_cast<Element*>(shared + Config::kQueryOffset);
  Element* key_tile = reinterpret_cast<Element*>(shared + Config::kKeyOffset);
  Element* value_tile = reinterpret_cast<Element*>(shared + Config::kValueOffset);
  float* scores = reinterpret_cast<float*>(shared + Config::kScoreOffset);
  Element* probabilities = reinterpret_cast<Element*>(shared + Config::kProbabilityOffset);
  float* output = reinterpret_cast<float*>(shared + Config::kOutputOffset);
  float* row_max = reinterpret_cast<float*>(shared + Config::kRowMaxOffset);
  float* row_sum = reinterpret_cast<float*>(shared + Config::kRowSumOffset);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Within each (sequence, head), launch the last query tiles first: under causal masking
  // they have the most keys.
  const int query_tiles = tile_count(p.seqlen_q, kBlockM);
  const GridBlock block = grid_block(query_tiles, p.heads_q);
  const int query_block = query_tiles - 1 - block.tile;
  const int head = block.head;
  const int batch = block.batch;
  const SequenceView view = sequence_view(p, batch);
  const int first_row = query_block * kBlockM;
  if (first_row >= view.seqlen_q) return;
  const int valid_rows = min(kBlockM, view.seqlen_q - first_row);
  const int kv_head = head / (p.heads_q / p.heads_kv);
  const ScoreRule<Element> rule(p, view, batch, head);
  const bool dropout = p.dropout_threshold != 0;

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

  const int qk_steps = tiles_of(p.head_dim);
  const int value_tiles = tiles_of(p.head_dim_v);

  load_tile(query_tile, kInputPitch, q, p.q_strides.row, kBlockM, kHeadDim, valid_rows, p.head_dim, p.vector_loads);
  fill_shared(output, kBlockM * kOutputPitch, 0.0f);
  fill_shared(row_max, kBlockM, -INFINITY);
  fill_shared(row_sum, kBlockM, 0.0f);

  for (int64_t tile_start = key_begin; tile_start < key_end; tile_start += kBlockN) {  // int64: no overflow at 2^31
    const int key_start = static_cast<int>(tile_start);
    __syncthreads();  // the previous tile's products are done with K, V and P
    // Keys past key_limit are storage past key_lengths: never read, zero-filled.
    const int valid_keys = min(kBlockN, view.key_limit - key_start);
    load_tile(key_tile, kInputPitch, k + static_cast<int64_t>(key_start) * p.k_strides.row, p.k_strides.row, kBlockN,
              kHeadDim, valid_keys, p.head_dim, p.vector_loads);
    load_tile(value_tile, kInputPitch, v + static_cast<int64_t>(key_start) * p.v_strides.row, p.v_strides.row,
              kBlockN, kHeadDim, valid_keys, p.head_dim_v, p.vector_loads);
    __syncthreads();

    // S = Q K^T: K is stored (key, dim), i.e. K^T column-major.
    constexpr int kScoreTilesN = kBlockN / kTile;
    for (int tile = warp; tile < (kBlockM / kTile) * kScoreTilesN; tile += kWarps) {
      const int tile_m = tile / kScoreTilesN;
      const int tile_n = tile % kScoreTilesN;
      tile_product<Element, true, false, TileOutput::Overwrite>(
          query_tile + tile_m * kTile * kInputPitch, kInputPitch, key_tile + tile_n * kTile * kInputPitch,
          kInputPitch, qk_steps, {scores + tile_m * kTile * kScorePitch + tile_n * kTile, kScorePitch, 0, 0});
    }
    __syncthreads();

    // Online softmax, one warp per row. A trip count known at compile time keeps the warp
    // shuffles in code the compiler sees as convergent (else it calls a shuffle subroutine,
    // and the call spills).
    for (int step = 0; step < kBlockM / kWarps; ++step) {
      const int r = warp + step * kWarps;
      const int row = first_row + r;
      float logits[kColumnsPerLane];
      float tile_max = -INFINITY;
#pragma unroll
      for (int t = 0; t < kColumnsPerLane; ++t) {
        const int column = lane + 32 * t;
        float logit = -INFINITY;
        if (column < kBlockN) {
          const int key = key_start + column;
          float unused_tanh;
          if (view.visible(row, key) &&
              !rule.score(scores[r * kScorePitch + column], row, key, &logit, &unused_tanh))
            logit = -INFINITY;
        }
        logits[t] = logit;
        tile_max = fmaxf(tile_max, logit);
      }
      tile_max = warp_max(tile_max);
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      // A row that has seen no visible key keeps max -inf; subtract 0 so exp gives 0, not NaN.
      const float reference = new_max == -INFINITY ? 0.0f : new_max;
      const float correction = __expf(old_max - reference);
      const uint32_t row_hash = dropout ? dropout_row_hash(p.dropout_seed_key, batch, head, row) : 0u;
      float tile_sum = 0.0f;
#pragma unroll
      for (int t = 0; t < kColumnsPerLane; ++t) {
        const int column = lane + 32 * t;
        if (column < kBlockN) {
          const float probability = __expf(logits[t] - reference);
          tile_sum += probability;
          // Dropped probabilities are zeroed here; 1 / (1 - p) is applied to the finished row
          // (P / (1 - p) passes fp16's range for p near 1).
          float kept = probability;
          if (dropout && !dropout_keeps(row_hash, key_start + column, p.dropout_threshold)) kept = 0.0f;
          probabilities[r * kProbabilityPitch + column] = from_float<Element>(kept);
        }
      }
      tile_sum = warp_sum(tile_sum);
      __syncwarp();  // every lane has read row_max[r] before lane 0 replaces it
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * correction + tile_sum;
      }
      for (int column = lane; column < value_tiles * kTile; column += 32)
        output[r * kOutputPitch + column] *= correction;
    }
    __syncthreads();

    // O += P V: V is stored (key, dim), row-major.
    for (int tile = warp; tile < (kBlockM / kTile) * value_tiles; tile += kWarps) {
      const int tile_m = tile / value_tiles;
      const int tile_n = tile % value_tiles;
      tile_product<Element, true, true, TileOutput::Accumulate>(
          probabilities + tile_m * kTile * kProbabilityPitch, kProbabilityPitch, value_tile + tile_n * kTile,
          kInputPitch, kBlockN / kTile, {output + tile_m * kTile * kOutputPitch + tile_n * kTile, kOutputPitch, 0, 0});
    }
  }
  __syncthreads();

  // out = O / l; lse = max + log(l). Rows that saw no key (l == 0): out 0, lse -inf. A NaN
  // sum (NaN input) must stay NaN in out and lse: the backward reads lse -inf as "no key".
  // A sink joins l here (no value): a row that saw no key then gets out 0, lse = sink.
  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch + head * p.out_strides.head;
  for (int r = warp; r < valid_rows; r += kWarps) {
    const int row = first_row + r;
    float sum = row_sum[r];
    float maximum = row_max[r];
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
    // A row that saw no key (sum 0 before the sink; a NaN row's sum is NaN) is 0 even when a
    // value it did not see is NaN or Inf (the accumulator holds 0 * V for its block's tiles).
    const bool saw_no_key = row_sum[r] == 0.0f;
    // __fdividef (sum >= 1 here): IEEE division calls a slow-path subroutine whose call spills.
    const float inverse = empty ? 0.0f : __fdividef((dropout ? p.dropout_keep_scale : 1.0f) * rescale, sum);
    Element* out_row = out + (int64_t{view.q_row_base} + row) * p.out_strides.row;
    for (int column = lane; column < p.head_dim_v; column += 32)
      out_row[column] = from_float<Element>(saw_no_key ? 0.0f : output[r * kOutputPitch + column] * inverse);
    if (lane == 0) {
      p.lse[batch * p.lse_strides.batch + head * p.lse_strides.head +
            (int64_t{view.q_row_base} + row) * p.lse_strides.row] =
          empty ? -INFINITY : maximum + logf(sum);
    }
  }
}

// Blocks of the forward grid, as flat_grid_blocks (the launcher and the CPU emulation).
template <typename Element, int kHeadDim>
int64_t forward_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(tile_count(p.seqlen_q, ForwardConfig<Element, kHeadDim>::kBlockM), p.heads_q, p.batch);
}

#if defined(__CUDACC__)  // launchers: nvcc only (the CPU emulation launches kernels itself)
template <typename Element, int kHeadDim>
const char* launch_attention_forward(const AttentionParams& p, cudaStream_t stream) {
  using Config = ForwardConfig<Element, kHeadDim>;
  const int64_t blocks = forward_grid_blocks<Element, kHeadDim>(p);
  if (blocks == 0) return nullptr;
  if (blocks < 0) return "fusedattn cuda: more than 2^31 - 1 query tiles x heads x sequences";
  auto kernel = attention_forward_kernel<Element, kHeadDim>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSharedBytes);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  const dim3 grid(static_cast<unsigned>(blocks));
  kernel<<<grid, kThreads, Config::kSharedBytes, stream>>>(p);
  error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// The head-dim switch for one element type (each element type is its own source file).
template <typename Element>
const char* attention_forward_for(const AttentionParams& p, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
#define FUSEDATTN_FORWARD_CASE(HEAD_DIM) \
  case HEAD_DIM:                         \
    return launch_attention_forward<Element, HEAD_DIM>(p, cuda_stream);
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_FORWARD_CASE)
#undef FUSEDATTN_FORWARD_CASE
    default:
      return "fusedattn cuda: this build has no kernel for this head dim";
  }
}

#endif  // __CUDACC__

}  // namespace fusedattn::cuda
