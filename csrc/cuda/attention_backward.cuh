// Flash attention backward for fp32 (attention_backward_mma.cuh has the fp16/bf16 kernel,
// which shares this file's grid, delta and group-sum pieces): one block per (key tile, query head, sequence),
// flattened onto grid.x (grid_block). The block keeps its K and V tiles and the dK, dV accumulators in
// shared memory and walks every query tile that can see its keys:
//
//   S = Q K^T, dP = dO V^T                     (warp tiles)
//   P = exp(score(S) - lse), dropout on P and dP, dS = P (dP - delta) [softcap'] scale
//                                              (one warp per row)
//   dV += P_dropped^T dO, dK += dS^T Q          (warp tiles, shared accumulators)
//   dQ += dS K                                  (warp tiles, atomicAdd into float32 dq_accum)
//
// delta = rowsum(dO * out) comes from attention_backward_delta_kernel (launched first), the
// zero-filled float32 dq_accum buffer from the caller. Without GQA the
// block writes dK, dV. With GQA (group > 1) the query heads of a group run in parallel
// blocks and write their float dK, dV to per-query-head buffers (dk_partial, dv_partial);
// attention_backward_group_sum_kernel then adds the group's heads in a fixed order (no
// atomics, the same result on every run) and writes dK, dV.
#pragma once

#include "attention_common.cuh"

namespace fusedattn::cuda {

// Tiles: at D <= 128, small enough for two blocks per sm_90 SM (scripts/cuda_resource_report.py).
template <typename Element, int kHeadDim>
struct BackwardConfig {
  static constexpr int kBlockM = kHeadDim <= 96 ? 32 : 16;   // queries
  static constexpr int kBlockN = kHeadDim <= 128 ? 32 : 16;  // keys
  static constexpr int kInputPitch = padded_pitch<Element>(kHeadDim);  // K, V, Q, dO tiles
  static constexpr int kScorePitch = padded_pitch<float>(kBlockN);
  static constexpr int kProbabilityPitch = padded_pitch<Element>(kBlockN);
  static constexpr int kGradientPitch = padded_pitch<float>(kHeadDim);  // dK, dV accumulators

  static constexpr int kKeyOffset = 0;
  static constexpr int kValueOffset = kKeyOffset + region_bytes<Element>(kBlockN, kInputPitch);
  static constexpr int kQueryOffset = kValueOffset + region_bytes<Element>(kBlockN, kInputPitch);
  static constexpr int kGradOutOffset = kQueryOffset + region_bytes<Element>(kBlockM, kInputPitch);
  static constexpr int kScoreOffset = kGradOutOffset + region_bytes<Element>(kBlockM, kInputPitch);
  static constexpr int kGradProbabilityOffset = kScoreOffset + region_bytes<float>(kBlockM, kScorePitch);
  static constexpr int kProbabilityOffset = kGradProbabilityOffset + region_bytes<float>(kBlockM, kScorePitch);
  static constexpr int kGradScoreOffset = kProbabilityOffset + region_bytes<Element>(kBlockM, kProbabilityPitch);
  static constexpr int kGradKeyOffset = kGradScoreOffset + region_bytes<Element>(kBlockM, kProbabilityPitch);
  static constexpr int kGradValueOffset = kGradKeyOffset + region_bytes<float>(kBlockN, kGradientPitch);
  static constexpr int kRowLseOffset = kGradValueOffset + region_bytes<float>(kBlockN, kGradientPitch);
  static constexpr int kRowDeltaOffset = kRowLseOffset + region_bytes<float>(kBlockM, 1);
  static constexpr int kSharedBytes = kRowDeltaOffset + region_bytes<float>(kBlockM, 1);

  static_assert(kIsFloat32<Element>, "fp16/bf16 take attention_backward_mma.cuh");
  static_assert(kBlockM % kTile == 0 && kBlockN % kTile == 0, "tiles are made of 16x16 warp tiles");
  static_assert(kHeadDim % 32 == 0, "head-dim buckets are multiples of 32");
  static_assert(kSharedBytes <= kMaxSharedBytes, "backward tile does not fit sm_80 shared memory");
};

// Which keys, head and sequence a block of the backward grid owns.
struct BackwardKeyBlock {
  GridBlock block;
  SequenceView view;
  int key_start;
  int valid_keys;   // may be <= 0: the block is past its sequence's keys
  int loaded_keys;  // of those, the ones before key_limit: K and V past key_lengths are never read
  int group;        // query heads per KV head
  int kv_head;
  int64_t k_row;  // the first key's row in k, v (and the partials)
};

__device__ __forceinline__ BackwardKeyBlock backward_key_block(const AttentionParams& p, int block_n,
                                                               int block_index) {
  BackwardKeyBlock owned;
  owned.block = grid_block(tile_count(p.seqlen_k, block_n), p.heads_q, block_index);
  owned.view = sequence_view(p, owned.block.batch);
  owned.key_start = owned.block.tile * block_n;
  owned.valid_keys = min(block_n, owned.view.seqlen_k - owned.key_start);
  owned.loaded_keys = max(0, min(owned.valid_keys, owned.view.key_limit - owned.key_start));
  owned.group = p.heads_q / p.heads_kv;
  owned.kv_head = owned.block.head / owned.group;
  owned.k_row = int64_t{owned.view.k_row_base} + owned.key_start;
  return owned;
}

template <typename Element, int kHeadDim>
__device__ __forceinline__ void backward_epilogue(const AttentionBackwardParams& bp, const float* grad_key,
                                                  const float* grad_value);

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attention_backward_kernel(const AttentionBackwardParams bp) {
  using Config = BackwardConfig<Element, kHeadDim>;
  constexpr int kBlockM = Config::kBlockM;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kInputPitch = Config::kInputPitch;
  constexpr int kScorePitch = Config::kScorePitch;
  constexpr int kProbabilityPitch = Config::kProbabilityPitch;
  constexpr int kGradientPitch = Config::kGradientPitch;
  const AttentionParams& p = bp.forward;

  extern __shared__ __align__(128) unsigned char shared[];
  Element* key_tile = reinterpret_cast<Element*>(shared + Config::kKeyOffset);
  Element* value_tile = reinterpret_cast<Element*>(shared + Config::kValueOffset);
  Element* query_tile = reinterpret_cast<Element*>(shared + Config::kQueryOffset);
  Element* grad_out_tile = reinterpret_cast<Element*>(shared + Config::kGradOutOffset);
  float* scores = reinterpret_cast<float*>(shared + Config::kScoreOffset);
  float* grad_probabilities = reinterpret_cast<float*>(shared + Config::kGradProbabilityOffset);
  Element* probabilities = reinterpret_cast<Element*>(shared + Config::kProbabilityOffset);  // dropout mask, unscaled
  Element* grad_scores = reinterpret_cast<Element*>(shared + Config::kGradScoreOffset);
  float* grad_key = reinterpret_cast<float*>(shared + Config::kGradKeyOffset);
  float* grad_value = reinterpret_cast<float*>(shared + Config::kGradValueOffset);
  float* row_lse = reinterpret_cast<float*>(shared + Config::kRowLseOffset);
  float* row_delta = reinterpret_cast<float*>(shared + Config::kRowDeltaOffset);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const BackwardKeyBlock owned = backward_key_block(p, kBlockN, static_cast<int>(blockIdx.x));
  const int head = owned.block.head;
  const int batch = owned.block.batch;
  const SequenceView& view = owned.view;
  const int key_start = owned.key_start;
  if (owned.valid_keys <= 0) return;
  const int kv_head = owned.kv_head;
  const bool dropout = p.dropout_threshold != 0;
  const int qk_tiles = tiles_of(p.head_dim);
  const int value_tiles = tiles_of(p.head_dim_v);

  const int64_t k_row = owned.k_row;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch + kv_head * p.k_strides.head +
                     k_row * p.k_strides.row;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch + kv_head * p.v_strides.head +
                     k_row * p.v_strides.row;
  load_tile(key_tile, kInputPitch, k, p.k_strides.row, kBlockN, kHeadDim, owned.loaded_keys, p.head_dim,
            p.vector_loads);
  load_tile(value_tile, kInputPitch, v, p.v_strides.row, kBlockN, kHeadDim, owned.loaded_keys, p.head_dim_v,
            p.vector_loads);
  fill_shared(grad_key, kBlockN * kGradientPitch, 0.0f);
  fill_shared(grad_value, kBlockN * kGradientPitch, 0.0f);

  // Query rows that can see some key of [key_start, last_key]: [row_begin, row_end),
  // row_end <= seqlen_q (row i sees key j when lowest <= j - i <= highest).
  const int last_key = key_start + min(kBlockN, view.key_limit - key_start) - 1;
  int row_begin = static_cast<int>(clamp_int64(int64_t{key_start} - view.highest, 0, kMaxRows));
  const int row_end =
      last_key >= key_start ? static_cast<int>(clamp_int64(int64_t{last_key} - view.lowest + 1, 0, view.seqlen_q)) : 0;
  row_begin = row_begin / kBlockM * kBlockM;

  {
    const ScoreRule<Element> rule(p, view, batch, head);
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch + head * p.q_strides.head;
    const Element* grad_out = static_cast<const Element*>(bp.grad_out) + batch * bp.grad_out_strides.batch +
                              head * bp.grad_out_strides.head;
    float* dq_accum = bp.dq_accum + batch * bp.dq_accum_strides.batch + head * bp.dq_accum_strides.head;

    for (int64_t tile_start = row_begin; tile_start < row_end; tile_start += kBlockM) {  // int64: no overflow
      const int first_row = static_cast<int>(tile_start);
      const int valid_rows = min(kBlockM, view.seqlen_q - first_row);
      const int64_t q_row = int64_t{view.q_row_base} + first_row;
      __syncthreads();  // the previous tile's products are done with Q, dO, P and dS
      load_tile(query_tile, kInputPitch, q + q_row * p.q_strides.row, p.q_strides.row, kBlockM, kHeadDim,
                valid_rows, p.head_dim, p.vector_loads);
      load_tile(grad_out_tile, kInputPitch, grad_out + q_row * bp.grad_out_strides.row, bp.grad_out_strides.row,
                kBlockM, kHeadDim, valid_rows, p.head_dim_v, p.vector_loads);
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        float lse = -INFINITY;
        float delta = 0.0f;
        if (r < valid_rows) {
          lse = p.lse[batch * p.lse_strides.batch + head * p.lse_strides.head + (q_row + r) * p.lse_strides.row];
          delta = bp.delta[batch * bp.delta_strides.batch + head * bp.delta_strides.head +
                           (q_row + r) * bp.delta_strides.row];
        }
        row_lse[r] = lse;
        row_delta[r] = delta;
      }
      __syncthreads();

      // S = Q K^T and dP = dO V^T (K and V stored (key, dim): column-major transposes).
      constexpr int kScoreTiles = (kBlockM / kTile) * (kBlockN / kTile);
      for (int tile = warp; tile < 2 * kScoreTiles; tile += kWarps) {
        const bool is_grad = tile >= kScoreTiles;
        const int index = is_grad ? tile - kScoreTiles : tile;
        const int tile_m = index / (kBlockN / kTile);
        const int tile_n = index % (kBlockN / kTile);
        const int offset_a = tile_m * kTile * kInputPitch;
        const int offset_b = tile_n * kTile * kInputPitch;
        const int offset_c = tile_m * kTile * kScorePitch + tile_n * kTile;
        if (!is_grad) {
          tile_product<Element, true, false, TileOutput::Overwrite>(query_tile + offset_a, kInputPitch,
                                                                    key_tile + offset_b, kInputPitch, qk_tiles,
                                                                    {scores + offset_c, kScorePitch, 0, 0});
        } else {
          tile_product<Element, true, false, TileOutput::Overwrite>(
              grad_out_tile + offset_a, kInputPitch, value_tile + offset_b, kInputPitch, value_tiles,
              {grad_probabilities + offset_c, kScorePitch, 0, 0});
        }
      }
      __syncthreads();

      // Probabilities and score gradients, one warp per row.
      for (int r = warp; r < kBlockM; r += kWarps) {
        const int row = first_row + r;
        const float lse = row_lse[r];
        const float delta = row_delta[r];
        const uint32_t row_hash = dropout ? dropout_row_hash(p.dropout_seed_key, batch, head, row) : 0u;
        for (int column = lane; column < kBlockN; column += 32) {
          const int key = key_start + column;
          float kept_probability = 0.0f;
          float grad_score = 0.0f;
          float logit;
          float capped_tanh;
          // lse == -inf: the row saw no key in the forward pass; its gradients are 0.
          if (lse != -INFINITY && view.visible(row, key) &&
              rule.score(scores[r * kScorePitch + column], row, key, &logit, &capped_tanh)) {
            const float probability = __expf(logit - lse);
            float grad_probability = grad_probabilities[r * kScorePitch + column];
            kept_probability = probability;
            if (dropout) {
              const bool keep = dropout_keeps(row_hash, key, p.dropout_threshold);
              kept_probability = keep ? probability : 0.0f;  // dV is scaled by 1 / (1 - p) at the end
              grad_probability = keep ? grad_probability * p.dropout_keep_scale : 0.0f;
            }
            grad_score = probability * (grad_probability - delta);
            if (rule.softcap > 0.0f) grad_score *= 1.0f - capped_tanh * capped_tanh;
            grad_score *= p.scale;  // gradient with respect to the raw dot product q . k
          }
          probabilities[r * kProbabilityPitch + column] = from_float<Element>(kept_probability);
          grad_scores[r * kProbabilityPitch + column] = from_float<Element>(grad_score);
        }
      }
      __syncthreads();

      // dV += P^T dO, dK += dS^T Q (accumulated in shared), dQ += dS K (atomics).
      const int value_grad_tiles = (kBlockN / kTile) * value_tiles;
      const int key_grad_tiles = (kBlockN / kTile) * qk_tiles;
      const int query_grad_tiles = (kBlockM / kTile) * qk_tiles;
      for (int tile = warp; tile < value_grad_tiles + key_grad_tiles + query_grad_tiles; tile += kWarps) {
        if (tile < value_grad_tiles) {
          const int tile_n = tile / value_tiles;  // key tile
          const int tile_d = tile % value_tiles;
          tile_product<Element, false, true, TileOutput::Accumulate>(
              probabilities + tile_n * kTile, kProbabilityPitch, grad_out_tile + tile_d * kTile, kInputPitch,
              kBlockM / kTile, {grad_value + tile_n * kTile * kGradientPitch + tile_d * kTile, kGradientPitch, 0, 0});
        } else if (tile < value_grad_tiles + key_grad_tiles) {
          const int index = tile - value_grad_tiles;
          const int tile_n = index / qk_tiles;
          const int tile_d = index % qk_tiles;
          tile_product<Element, false, true, TileOutput::Accumulate>(
              grad_scores + tile_n * kTile, kProbabilityPitch, query_tile + tile_d * kTile, kInputPitch,
              kBlockM / kTile, {grad_key + tile_n * kTile * kGradientPitch + tile_d * kTile, kGradientPitch, 0, 0});
        } else {
          const int index = tile - value_grad_tiles - key_grad_tiles;
          const int tile_m = index / qk_tiles;
          const int tile_d = index % qk_tiles;
          const int tile_row = tile_m * kTile;
          TileDestination destination{dq_accum + (q_row + tile_row) * bp.dq_accum_strides.row + tile_d * kTile,
                                      bp.dq_accum_strides.row, valid_rows - tile_row, p.head_dim - tile_d * kTile};
          if (destination.valid_rows > 0)
            tile_product<Element, true, true, TileOutput::AtomicGlobal>(
                grad_scores + tile_row * kProbabilityPitch, kProbabilityPitch, key_tile + tile_d * kTile, kInputPitch,
                kBlockN / kTile, destination);
        }
      }
    }
  }
  __syncthreads();
  backward_epilogue<Element, kHeadDim>(bp, grad_key, grad_value);
}

// Every key row of the block gets its dK and dV, zero when no query saw it: in dk, dv
// without GQA, in this query head's partials with it. The block's indices are recomputed
// here (a few integer operations) rather than kept live across the query loop. Loops stride
// by the constant kThreads: with blockDim.x, ptxas (nvcc 13) built call-based loop exits and
// spilled 16-32 bytes in the fp32 kernels.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void backward_epilogue(const AttentionBackwardParams& bp, const float* grad_key,
                                                  const float* grad_value) {
  constexpr int kGradientPitch = BackwardConfig<Element, kHeadDim>::kGradientPitch;
  const AttentionParams& p = bp.forward;
  const BackwardKeyBlock owned =
      backward_key_block(p, BackwardConfig<Element, kHeadDim>::kBlockN, static_cast<int>(blockIdx.x));
  const int head = owned.block.head;
  const int batch = owned.block.batch;
  const int valid_keys = owned.valid_keys;
  const int kv_head = owned.kv_head;
  const int64_t k_row = owned.k_row;
  const float value_scale = p.dropout_threshold != 0 ? p.dropout_keep_scale : 1.0f;  // P was stored unscaled
  if (owned.group > 1) {
    float* dk_partial = bp.dk_partial + batch * bp.partial_strides.batch + head * bp.partial_strides.head +
                        k_row * bp.partial_strides.row;
    float* dv_partial = bp.dv_partial + batch * bp.partial_strides.batch + head * bp.partial_strides.head +
                        k_row * bp.partial_strides.row;
    const int columns = max(p.head_dim, p.head_dim_v);  // the partials' width
    for (int index = threadIdx.x; index < valid_keys * columns; index += kThreads) {
      const int r = index / columns;
      const int column = index % columns;
      dk_partial[r * bp.partial_strides.row + column] = grad_key[r * kGradientPitch + column];
      dv_partial[r * bp.partial_strides.row + column] = grad_value[r * kGradientPitch + column] * value_scale;
    }
    return;
  }
  Element* dk = static_cast<Element*>(bp.dk) + batch * bp.dk_strides.batch + kv_head * bp.dk_strides.head +
                k_row * bp.dk_strides.row;
  Element* dv = static_cast<Element*>(bp.dv) + batch * bp.dv_strides.batch + kv_head * bp.dv_strides.head +
                k_row * bp.dv_strides.row;
  for (int index = threadIdx.x; index < valid_keys * kHeadDim; index += kThreads) {
    const int r = index / kHeadDim;
    const int column = index % kHeadDim;
    if (column < p.head_dim)
      dk[r * bp.dk_strides.row + column] = from_float<Element>(grad_key[r * kGradientPitch + column]);
    if (column < p.head_dim_v)
      dv[r * bp.dv_strides.row + column] = from_float<Element>(grad_value[r * kGradientPitch + column] * value_scale);
  }
}

// GQA: dK, dV of a KV head = the sum of its query heads' partials, added in head order.
// One block per (key tile, kv head, sequence) of kGroupSumKeys keys; the same clamped
// sequence bounds as the backward kernel, so it reads only rows that kernel wrote.
constexpr int kGroupSumKeys = 64;

template <typename Element>
__global__ void __launch_bounds__(kThreads) attention_backward_group_sum_kernel(const AttentionBackwardParams bp) {
  const AttentionParams& p = bp.forward;
  const GridBlock block = grid_block(tile_count(p.seqlen_k, kGroupSumKeys), p.heads_kv);
  const int kv_head = block.head;
  const int batch = block.batch;
  const SequenceView view = sequence_view(p, batch);
  const int key_start = block.tile * kGroupSumKeys;
  // The backward grid covers max_seqlen_k (p.seqlen_k) keys per sequence, rounded up to its
  // own key tile (32 or 16 in fp32, 64 in the mma kernel): a longer sequence (metadata that
  // skipped validation) has no partial rows past that, so only keys below both are summed.
  const int summed_keys = min(view.seqlen_k, p.seqlen_k);
  if (key_start >= summed_keys) return;
  const int valid_keys = min(kGroupSumKeys, summed_keys - key_start);
  const int group = p.heads_q / p.heads_kv;
  const int64_t k_row = int64_t{view.k_row_base} + key_start;
  const int columns = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  const float* dk_partial = bp.dk_partial + batch * bp.partial_strides.batch + k_row * bp.partial_strides.row;
  const float* dv_partial = bp.dv_partial + batch * bp.partial_strides.batch + k_row * bp.partial_strides.row;
  Element* dk = static_cast<Element*>(bp.dk) + batch * bp.dk_strides.batch + kv_head * bp.dk_strides.head +
                k_row * bp.dk_strides.row;
  Element* dv = static_cast<Element*>(bp.dv) + batch * bp.dv_strides.batch + kv_head * bp.dv_strides.head +
                k_row * bp.dv_strides.row;
  for (int index = threadIdx.x; index < valid_keys * columns; index += kThreads) {
    const int r = index / columns;
    const int column = index % columns;
    float key_sum = 0.0f;
    float value_sum = 0.0f;
    for (int member = 0; member < group; ++member) {
      const int64_t at = int64_t{kv_head * group + member} * bp.partial_strides.head + r * bp.partial_strides.row +
                         column;
      key_sum += dk_partial[at];
      value_sum += dv_partial[at];
    }
    if (column < p.head_dim) dk[r * bp.dk_strides.row + column] = from_float<Element>(key_sum);
    if (column < p.head_dim_v) dv[r * bp.dv_strides.row + column] = from_float<Element>(value_sum);
  }
}

// FlashAttention 2's preprocessing: delta = rowsum(dO * out) in float32 for every row of out
// (all of the tensor, whatever the metadata says), one warp per row. Rows are numbered
// (sequence, head, row) over B sequences of Sq rows, or one packed "sequence" of Tq rows
// (batch strides 0); warps step through them by the grid's width.
constexpr int64_t kDeltaMaxBlocks = 4096;

__host__ __device__ inline int64_t delta_rows(const AttentionParams& p) {
  const int64_t rows_per_head = p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q;
  const int64_t sequences = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  return sequences * p.heads_q * rows_per_head;
}
inline int64_t delta_grid_blocks(const AttentionParams& p) {
  const int64_t blocks = (delta_rows(p) + kWarps - 1) / kWarps;
  return blocks < kDeltaMaxBlocks ? blocks : kDeltaMaxBlocks;
}

template <typename Element>
__global__ void __launch_bounds__(kThreads) attention_backward_delta_kernel(const AttentionBackwardParams bp) {
  const AttentionParams& p = bp.forward;
  const int64_t rows_per_head = p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q;
  const int64_t rows = delta_rows(p);
  const int lane = threadIdx.x % 32;
  const int64_t stride = int64_t{gridDim.x} * kWarps;
  for (int64_t row = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; row < rows; row += stride) {
    const int64_t position = row % rows_per_head;
    const int64_t head = row / rows_per_head % p.heads_q;
    const int64_t sequence = row / rows_per_head / p.heads_q;
    const Element* out_row = static_cast<const Element*>(p.out) + sequence * p.out_strides.batch +
                             head * p.out_strides.head + position * p.out_strides.row;
    const Element* grad_out_row = static_cast<const Element*>(bp.grad_out) + sequence * bp.grad_out_strides.batch +
                                  head * bp.grad_out_strides.head + position * bp.grad_out_strides.row;
    float sum = 0.0f;
    for (int column = lane; column < p.head_dim_v; column += 32)
      sum += to_float(out_row[column]) * to_float(grad_out_row[column]);
    sum = warp_sum(sum);
    if (lane == 0)
      bp.delta[sequence * bp.delta_strides.batch + head * bp.delta_strides.head + position * bp.delta_strides.row] =
          sum;
  }
}

// Blocks of the backward grid, as flat_grid_blocks (the launcher and the CPU emulation).
template <typename Element, int kHeadDim>
int64_t backward_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(tile_count(p.seqlen_k, BackwardConfig<Element, kHeadDim>::kBlockN), p.heads_q, p.batch);
}
inline int64_t group_sum_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(tile_count(p.seqlen_k, kGroupSumKeys), p.heads_kv, p.batch);
}

#if defined(__CUDACC__)  // launchers: nvcc only (the CPU emulation launches kernels itself)
// delta for the backward kernels (attention_backward_delta_kernel), first on the stream.
template <typename Element>
const char* launch_attention_backward_delta(const AttentionBackwardParams& bp, cudaStream_t stream) {
  const int64_t blocks = delta_grid_blocks(bp.forward);
  if (blocks == 0) return nullptr;
  attention_backward_delta_kernel<Element><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(bp);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// One backward launch, whichever kernel: delta first, then the kernel's grid of `blocks`
// blocks, then (GQA) the group sum of the per-query-head partials.
template <typename Element, typename Kernel>
const char* launch_backward_grid(Kernel kernel, int64_t blocks, int threads, int shared_bytes,
                                 const AttentionBackwardParams& bp, cudaStream_t stream) {
  if (blocks == 0) return nullptr;
  if (blocks < 0) return "fusedattn cuda: more than 2^31 - 1 key tiles x query heads x sequences";
  if (const char* delta_error = launch_attention_backward_delta<Element>(bp, stream)) return delta_error;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  kernel<<<dim3(static_cast<unsigned>(blocks)), threads, shared_bytes, stream>>>(bp);
  error = cudaGetLastError();
  if (error != cudaSuccess || bp.forward.heads_q == bp.forward.heads_kv)
    return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
  attention_backward_group_sum_kernel<Element>
      <<<dim3(static_cast<unsigned>(group_sum_grid_blocks(bp.forward))), kThreads, 0, stream>>>(bp);
  error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename Element, int kHeadDim>
const char* launch_attention_backward(const AttentionBackwardParams& bp, cudaStream_t stream) {
  using Config = BackwardConfig<Element, kHeadDim>;
  return launch_backward_grid<Element>(attention_backward_kernel<Element, kHeadDim>,
                                       backward_grid_blocks<Element, kHeadDim>(bp.forward), kThreads,
                                       Config::kSharedBytes, bp, stream);
}

// The head-dim switch for one element type (each element type is its own source file).
template <typename Element>
const char* attention_backward_for(const AttentionBackwardParams& bp, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  switch (head_dim_bucket(bp.forward.head_dim, bp.forward.head_dim_v)) {
#define FUSEDATTN_BACKWARD_CASE(HEAD_DIM) \
  case HEAD_DIM:                          \
    return launch_attention_backward<Element, HEAD_DIM>(bp, cuda_stream);
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_BACKWARD_CASE)
#undef FUSEDATTN_BACKWARD_CASE
    default:
      return "fusedattn cuda: this build has no kernel for this head dim";
  }
}

#endif  // __CUDACC__

}  // namespace fusedattn::cuda
