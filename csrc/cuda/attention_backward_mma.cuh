// Flash attention backward for fp16/bf16 in FlashAttention 2's structure, every head-dim
// bucket (fp32 keeps the FMA kernel of attention_backward.cuh). One block per (key tile of 64,
// query head, sequence), flattened onto grid.x like the fp32 backward (backward_key_block);
// each warp owns 16 keys, whose dK and dV accumulate in registers for the whole call. Above
// D 128 (kDimSplit 2) two warps share each 16 keys, one per half of the head dim: dK and dV
// of 16 keys x 256 dims are 256 floats per thread, too many for one warp; each warp of the
// pair then computes S^T and dP^T over its half of the dims, and the pair adds its two
// partial products through shared memory (both warps get the same sums, float addition being
// commutative) before the score step. The block walks the query tiles that can see its keys:
//
//   * Q and dO of the next tile are in flight (cp.async, two shared-memory stages); lse,
//     delta = rowsum(dO * out) and the dropout row hash of the next tile wait in registers;
//   * S^T = K Q^T and dP^T = V dO^T in registers (mma.sync m16n8k16, ldmatrix): keys are the
//     rows of the warp's fragments, queries the columns;
//   * P^T = exp(score(S^T) - lse), dropout, dS^T = P^T (dP^T - delta) [softcap'] scale, on the
//     fragments (the score rule of attention_common.cuh, element by element);
//   * dV += P^T dO and dK += dS^T Q with P^T, dS^T straight from registers (the C fragments of
//     two m16n8 tiles are the A fragment of one m16n8k16, as in the forward);
//   * dS^T goes to shared memory once; after a barrier each warp computes dQ = dS K for 16
//     queries of the tile (dS by ldmatrix.trans) and adds it into the float32 dq_accum with
//     atomicAdd (every key block of the sequence adds into the same rows).
// GQA: as in the fp32 backward, a block per query head; with Hq > Hkv the float dK, dV go
// to per-query-head partials which attention_backward_group_sum_kernel adds in head order
// (deterministic; (B, Hq, Sk, max(D, Dv)) floats written and read once each, 2 x 4 bytes per
// element of dK and dV per query head, against atomics' nondeterministic order).
#pragma once

#include "attention_backward.cuh"
#include "attention_forward_mma.cuh"
#include "warp_mma.cuh"

namespace fusedattn::cuda {

constexpr int kMmaBackwardLargestHeadDim = 256;

// 64 keys over 4 warps up to D 128, 8 warps above (kDimSplit: two per 16 keys, one per half of
// the head dim). Queries per step: the most that leave no spill at 255 registers (nvcc 13.0,
// sm_80 and sm_90; scripts/cuda_resource_report.py fails on any): 64 at D 32, 32 at D 64 and
// 96, 16 at D 128 and above (the dK, dV accumulators alone are D / kDimSplit registers per
// thread). Up to D 128 shared memory stays under 66 KB per block and registers allow two
// blocks per SM; above, one block of 8 warps per SM (256 threads x 255 registers), about
// 121 KB of shared memory at D 256 (sm_80 allows 163 KB).
template <typename Element, int kHeadDim>
struct MmaBackwardConfig {
  static constexpr int kDimSplit = kHeadDim > 128 ? 2 : 1;
  static constexpr int kSplitHeadDim = kHeadDim / kDimSplit;  // dims of dK, dV per warp
  static constexpr int kKeyWarps = 4;
  static constexpr int kWarps = kKeyWarps * kDimSplit;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kKeyWarps;  // keys
  static constexpr int kBlockM = kHeadDim <= 32 ? 64 : kHeadDim <= 96 ? 32 : 16;  // queries per step
  static constexpr int kStages = 2;
  static constexpr int kMinBlocksPerSM = kDimSplit == 1 ? 2 : 1;
  static constexpr int kPitch = kHeadDim + 8;  // 16 bytes of padding: conflict-free ldmatrix rows
  static constexpr int kRowBytes = kPitch * static_cast<int>(sizeof(Element));
  static constexpr int kGradScorePitch = kBlockM + 8;
  static constexpr int kKeyOffset = 0;
  static constexpr int kValueOffset = kKeyOffset + kBlockN * kRowBytes;
  static constexpr int kQueryOffset = kValueOffset + kBlockN * kRowBytes;
  static constexpr int kGradOutOffset = kQueryOffset + kStages * kBlockM * kRowBytes;
  static constexpr int kGradScoreOffset = kGradOutOffset + kStages * kBlockM * kRowBytes;
  static constexpr int kRowLseOffset =
      kGradScoreOffset + kBlockN * kGradScorePitch * static_cast<int>(sizeof(Element));
  static constexpr int kRowDeltaOffset = kRowLseOffset + kStages * kBlockM * 4;
  static constexpr int kRowHashOffset = kRowDeltaOffset + kStages * kBlockM * 4;
  // kDimSplit 2: each warp's partial S^T and dP^T in fragment order (float, lane-minor).
  static constexpr int kPartialOffset = kRowHashOffset + kStages * kBlockM * 4;
  static constexpr int kPartialFloatsPerWarp = 2 * (kBlockM / 8) * 4 * 32;
  static constexpr int kSharedBytes = kPartialOffset + (kDimSplit > 1 ? kWarps * kPartialFloatsPerWarp * 4 : 0);

  static_assert(sizeof(Element) == 2, "the mma backward is for fp16 and bf16");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= kMmaBackwardLargestHeadDim, "head-dim buckets up to 256");
  static_assert(kSplitHeadDim % 16 == 0, "each warp's dims are whole k steps and pairs of m16n8 tiles");
  static_assert(kThreads >= kBlockM, "one thread per query row reads the row statistics");
  static_assert(kRowBytes % 16 == 0 && (kGradScorePitch * 2) % 16 == 0, "ldmatrix rows are 16-byte aligned");
  static_assert(kSharedBytes <= kMaxSharedBytes, "backward tile does not fit sm_80 shared memory");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(MmaBackwardConfig<Element, kHeadDim>::kThreads,
                                  MmaBackwardConfig<Element, kHeadDim>::kMinBlocksPerSM)
    attention_backward_mma_kernel(const AttentionBackwardParams bp) {
  using Config = MmaBackwardConfig<Element, kHeadDim>;
  constexpr int kBlockM = Config::kBlockM;
  constexpr int kBlockN = Config::kBlockN;
  constexpr int kPitch = Config::kPitch;
  constexpr int kGradScorePitch = Config::kGradScorePitch;
  constexpr int kThreadCount = Config::kThreads;
  constexpr int kScoreTiles = kBlockM / 8;    // m16n8 tiles of S^T, dP^T per warp (queries)
  constexpr int kDimSteps = Config::kSplitHeadDim / 16;  // k steps of K Q^T and V dO^T per warp
  constexpr int kGradTiles = Config::kSplitHeadDim / 8;  // m16n8 tiles of dK, dV per warp (dims)
  constexpr int kQueryGradTiles = kHeadDim / 8;          // m16n8 tiles of a dQ row block (dims)
  constexpr int kQuerySteps = kBlockM / 16;   // k steps of P^T dO and dS^T Q
  constexpr int kKeySteps = kBlockN / 16;     // k steps of dS K
  const AttentionParams& p = bp.forward;

  extern __shared__ __align__(128) unsigned char shared[];
  Element* key_tile = reinterpret_cast<Element*>(shared + Config::kKeyOffset);
  Element* value_tile = reinterpret_cast<Element*>(shared + Config::kValueOffset);
  Element* query_stages = reinterpret_cast<Element*>(shared + Config::kQueryOffset);
  Element* grad_out_stages = reinterpret_cast<Element*>(shared + Config::kGradOutOffset);
  Element* grad_scores = reinterpret_cast<Element*>(shared + Config::kGradScoreOffset);  // dS^T (key, query)
  float* lse_stages = reinterpret_cast<float*>(shared + Config::kRowLseOffset);
  float* delta_stages = reinterpret_cast<float*>(shared + Config::kRowDeltaOffset);
  uint32_t* hash_stages = reinterpret_cast<uint32_t*>(shared + Config::kRowHashOffset);
  float* partial_products = reinterpret_cast<float*>(shared + Config::kPartialOffset);

  const int warp_index = threadIdx.x / 32;
  // Which 16 keys of the block, and which dims of dK, dV (kDimSplit 2; constants without it).
  const int key_warp = Config::kDimSplit == 1 ? warp_index : warp_index % Config::kKeyWarps;
  const int dim_half = Config::kDimSplit == 1 ? 0 : warp_index / Config::kKeyWarps;
  const int first_dim = dim_half * Config::kSplitHeadDim;
  const int lane = threadIdx.x % 32;
  const int group = lane >> 2;           // the row (and row + 8) of this lane's fragments
  const int thread_in_group = lane % 4;  // its column pair
  const BackwardKeyBlock owned = backward_key_block(p, kBlockN, static_cast<int>(blockIdx.x));
  if (owned.valid_keys <= 0) return;
  const int head = owned.block.head;
  const int batch = owned.block.batch;
  const SequenceView& view = owned.view;
  const int key_start = owned.key_start;
  const bool dropout = p.dropout_threshold != 0;
  const ScoreRule<Element> rule(p, view, batch, head);
  const bool plain_rule = p.mask_kind == MaskKind::None && p.softcap == 0.0f && rule.alibi_slope == 0.0f;
  // The interior path is a second copy of the score loop: at D 128 its registers spill
  // (8-16 bytes, nvcc 13.0), so D 128 takes the general path on every tile.
  constexpr bool kInteriorPath = kHeadDim <= 96;

  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch +
                     owned.kv_head * p.k_strides.head + owned.k_row * p.k_strides.row;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch +
                     owned.kv_head * p.v_strides.head + owned.k_row * p.v_strides.row;
  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch + head * p.q_strides.head +
                     static_cast<int64_t>(view.q_row_base) * p.q_strides.row;
  const Element* grad_out = static_cast<const Element*>(bp.grad_out) + batch * bp.grad_out_strides.batch +
                            head * bp.grad_out_strides.head +
                            static_cast<int64_t>(view.q_row_base) * bp.grad_out_strides.row;
  float* dq_accum = bp.dq_accum + batch * bp.dq_accum_strides.batch + head * bp.dq_accum_strides.head +
                    static_cast<int64_t>(view.q_row_base) * bp.dq_accum_strides.row;

  // Query rows that can see some key of [key_start, last_key]: [row_begin, row_end),
  // row_end <= seqlen_q (row i sees key j when lowest <= j - i <= highest).
  const int last_key = key_start + min(kBlockN, view.key_limit - key_start) - 1;
  int row_begin = static_cast<int>(clamp_int64(int64_t{key_start} - view.highest, 0, kMaxRows));
  const int row_end =
      last_key >= key_start ? static_cast<int>(clamp_int64(int64_t{last_key} - view.lowest + 1, 0, view.seqlen_q)) : 0;
  row_begin = row_begin / kBlockM * kBlockM;
  const int query_tiles = row_end > row_begin ? tile_count(row_end - row_begin, kBlockM) : 0;

  auto load_query_tile = [&](int tile, int stage) {
    const int first_row = row_begin + tile * kBlockM;  // < row_end: no overflow
    const int valid_rows = min(kBlockM, view.seqlen_q - first_row);
    load_tile_async<Element, kBlockM, kHeadDim, kPitch, kThreadCount>(
        query_stages + stage * kBlockM * kPitch, q + static_cast<int64_t>(first_row) * p.q_strides.row,
        p.q_strides.row, valid_rows, p.head_dim, p.vector_loads);
    load_tile_async<Element, kBlockM, kHeadDim, kPitch, kThreadCount>(
        grad_out_stages + stage * kBlockM * kPitch,
        grad_out + static_cast<int64_t>(first_row) * bp.grad_out_strides.row, bp.grad_out_strides.row, valid_rows,
        p.head_dim_v, p.vector_loads);
  };
  // Thread r < kBlockM: lse, delta and dropout hash of row r of a tile (lse -inf past the
  // sequence: such rows get no gradient).
  struct RowStatistics {
    float lse = -INFINITY;
    float delta = 0.0f;
    uint32_t hash = 0u;
  };
  auto read_row_statistics = [&](int tile) {
    RowStatistics statistics;
    const int row = row_begin + tile * kBlockM + static_cast<int>(threadIdx.x);
    if (threadIdx.x < kBlockM && row < view.seqlen_q) {
      const int64_t at = int64_t{view.q_row_base} + row;
      statistics.lse = p.lse[batch * p.lse_strides.batch + head * p.lse_strides.head + at * p.lse_strides.row];
      statistics.delta =
          bp.delta[batch * bp.delta_strides.batch + head * bp.delta_strides.head + at * bp.delta_strides.row];
      if (dropout) statistics.hash = dropout_row_hash(p.dropout_seed_key, batch, head, row);
    }
    return statistics;
  };
  auto write_row_statistics = [&](const RowStatistics& statistics, int stage) {
    if (threadIdx.x < kBlockM) {
      lse_stages[stage * kBlockM + threadIdx.x] = statistics.lse;
      delta_stages[stage * kBlockM + threadIdx.x] = statistics.delta;
      hash_stages[stage * kBlockM + threadIdx.x] = statistics.hash;
    }
  };

  // Group 0: K, V and the first query tile.
  load_tile_async<Element, kBlockN, kHeadDim, kPitch, kThreadCount>(key_tile, k, p.k_strides.row, owned.loaded_keys,
                                                                    p.head_dim, p.vector_loads);
  load_tile_async<Element, kBlockN, kHeadDim, kPitch, kThreadCount>(value_tile, v, p.v_strides.row,
                                                                    owned.loaded_keys, p.head_dim_v, p.vector_loads);
  if (query_tiles > 0) {
    load_query_tile(0, 0);
    write_row_statistics(read_row_statistics(0), 0);
  }
  warp::cp_async_commit();

  float grad_key[kGradTiles][4];
  float grad_value[kGradTiles][4];
#pragma unroll
  for (int n = 0; n < kGradTiles; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) grad_key[n][i] = grad_value[n][i] = 0.0f;

  // This lane's keys: h = 0 row g, h = 1 row g + 8 of the warp's 16.
  int keys[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) keys[h] = key_start + key_warp * 16 + group + 8 * h;

  // ldmatrix row addresses of this lane (warp_mma.cuh; the forward's three patterns):
  // A, plain (K, V rows of the warp's keys): (rows 0-7 | 8-15) x (cols 0-7 | 8-15);
  // B, plain (Q, dO rows as the columns of S^T, dP^T): two n-tiles of 8 queries per load;
  // B, .trans (dO, Q, K stored k x n): two n-tiles of 8 dims per load;
  // A, .trans (dS from dS^T stored key-major): (queries 0-7 | 8-15) x (keys 0-7 | 8-15),
  // relative to a unit's 16 queries.
  const int matrix = lane / 8;
  // The first three start at the warp's first dim (first_dim): they address the operands of
  // S^T, dP^T, dV and dK; dQ's K operand is addressed from transposed_operand_offset - first_dim.
  const int row_operand_offset =
      (key_warp * 16 + lane % 8 + 8 * (matrix % 2)) * kPitch + 8 * (matrix / 2) + first_dim;
  const int column_operand_offset = (8 * (matrix / 2) + lane % 8) * kPitch + 8 * (matrix % 2) + first_dim;
  const int transposed_operand_offset = (8 * (matrix % 2) + lane % 8) * kPitch + 8 * (matrix / 2) + first_dim;
  const int grad_score_offset = (8 * (matrix / 2) + lane % 8) * kGradScorePitch + 8 * (matrix % 2);

  for (int tile = 0; tile < query_tiles; ++tile) {
    const int stage = tile % Config::kStages;
    RowStatistics next_statistics;
    if (tile + 1 < query_tiles) {
      // The other stage was last read before the previous tile's second barrier.
      load_query_tile(tile + 1, stage ^ 1);
      warp::cp_async_commit();
      next_statistics = read_row_statistics(tile + 1);
      warp::cp_async_wait<1>();  // this tile's group has landed; the next one may still fly
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();  // ... for every thread's copies; dS^T of the previous tile is consumed
    const int first_row = row_begin + tile * kBlockM;
    const Element* query_tile = query_stages + stage * kBlockM * kPitch;
    const Element* grad_out_tile = grad_out_stages + stage * kBlockM * kPitch;
    const float* row_lse = lse_stages + stage * kBlockM;
    const float* row_delta = delta_stages + stage * kBlockM;
    const uint32_t* row_hash = hash_stages + stage * kBlockM;

    // When every query of the tile sees every key of the warp and there is no mask, softcap
    // or ALiBi (plain_rule), the score rule is the scale alone: the usual case, taken per
    // warp (the test is warp-uniform), decided before the products so that only the flag
    // stays live across them.
    const int64_t warp_first_key = int64_t{key_start} + key_warp * 16;
    const int64_t tile_last_row = int64_t{first_row} + kBlockM - 1;
    const bool interior = plain_rule && tile_last_row < view.seqlen_q && warp_first_key + 15 < view.key_limit &&
                          warp_first_key - tile_last_row >= view.lowest &&
                          warp_first_key + 15 - first_row <= view.highest;

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys.
    float scores[kScoreTiles][4];
    float grad_probabilities[kScoreTiles][4];
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) scores[n][i] = grad_probabilities[n][i] = 0.0f;
#pragma unroll
    for (int step = 0; step < kDimSteps; ++step) {
      uint32_t a[4];
      warp::ldmatrix_x4<false>(a, key_tile + row_operand_offset + step * 16);
#pragma unroll
      for (int n = 0; n < kScoreTiles; n += 2) {
        uint32_t b[4];
        warp::ldmatrix_x4<false>(b, query_tile + column_operand_offset + n * 8 * kPitch + step * 16);
        const uint32_t b_low[2] = {b[0], b[1]};
        const uint32_t b_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(scores[n], a, b_low);
        warp::mma_m16n8k16<Element>(scores[n + 1], a, b_high);
      }
      warp::ldmatrix_x4<false>(a, value_tile + row_operand_offset + step * 16);
#pragma unroll
      for (int n = 0; n < kScoreTiles; n += 2) {
        uint32_t b[4];
        warp::ldmatrix_x4<false>(b, grad_out_tile + column_operand_offset + n * 8 * kPitch + step * 16);
        const uint32_t b_low[2] = {b[0], b[1]};
        const uint32_t b_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(grad_probabilities[n], a, b_low);
        warp::mma_m16n8k16<Element>(grad_probabilities[n + 1], a, b_high);
      }
    }

    // The next tile's statistics go to the other stage, last read before the previous tile's
    // second barrier (the next tile's first barrier publishes them). Stored here, not at the
    // end of the tile, they are not live across the peak of the dK, dV products.
    if (tile + 1 < query_tiles) write_row_statistics(next_statistics, stage ^ 1);

    // kDimSplit 2: the pair's partial products added. The buffer was last read before the
    // previous tile's second barrier; this tile's first barrier ordered that.
    if constexpr (Config::kDimSplit > 1) {
      float* own = partial_products + warp_index * Config::kPartialFloatsPerWarp + lane;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          own[(n * 4 + i) * 32] = scores[n][i];
          own[((kScoreTiles + n) * 4 + i) * 32] = grad_probabilities[n][i];
        }
      __syncthreads();
      const int partner = (warp_index + Config::kKeyWarps) % Config::kWarps;
      const float* other = partial_products + partner * Config::kPartialFloatsPerWarp + lane;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          scores[n][i] += other[(n * 4 + i) * 32];
          grad_probabilities[n][i] += other[((kScoreTiles + n) * 4 + i) * 32];
        }
    }

    // P^T (kept by dropout, unscaled: dV is scaled once at the end) and dS^T, in place;
    // scores[n][i] is (key keys[i / 2], query first_row + 8 n + 2 thread_in_group + i % 2).
    // kInterior: the rule is the scale alone, nothing to test per element.
    auto finish_scores = [&](auto interior_tag) {
      constexpr bool kInterior = decltype(interior_tag)::value;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int column = 8 * n + 2 * thread_in_group + i % 2;
          const int row = first_row + column;
          const int key = keys[i / 2];
          const float lse = row_lse[column];
          float kept_probability = 0.0f;
          float grad_score = 0.0f;
          float logit = scores[n][i] * p.scale;
          float capped_tanh = 0.0f;
          // lse == -inf: the row saw no key in the forward pass; its gradients are 0.
          if (lse != -INFINITY &&
              (kInterior || (view.visible(row, key) && rule.score(scores[n][i], row, key, &logit, &capped_tanh)))) {
            const float probability = __expf(logit - lse);
            float grad_probability = grad_probabilities[n][i];
            kept_probability = probability;
            if (dropout) {
              const bool keep = dropout_keeps(row_hash[column], key, p.dropout_threshold);
              kept_probability = keep ? probability : 0.0f;
              grad_probability = keep ? grad_probability * p.dropout_keep_scale : 0.0f;
            }
            grad_score = probability * (grad_probability - row_delta[column]);
            if (!kInterior && rule.softcap > 0.0f) grad_score *= 1.0f - capped_tanh * capped_tanh;
            grad_score *= p.scale;  // gradient with respect to the raw dot product q . k
          }
          scores[n][i] = kept_probability;
          grad_probabilities[n][i] = grad_score;
        }
    };
    if (kInteriorPath && interior) {
      finish_scores(std::true_type{});
    } else {
      finish_scores(std::false_type{});
    }

    // P^T and dS^T as the A operands of dV += P^T dO and dK += dS^T Q (the floats die here:
    // 32 registers fewer across the products), and dS^T to shared memory for dQ (by the
    // first warp of a pair: both hold the same dS^T).
    uint32_t probability_operands[kQuerySteps][4];
    uint32_t grad_score_operands[kQuerySteps][4];
#pragma unroll
    for (int step = 0; step < kQuerySteps; ++step)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float* probability = scores[2 * step + half];
          const float* grad_score = grad_probabilities[2 * step + half];
          probability_operands[step][2 * half + h] =
              warp::pack_pair(from_float<Element>(probability[2 * h]), from_float<Element>(probability[2 * h + 1]));
          grad_score_operands[step][2 * half + h] =
              warp::pack_pair(from_float<Element>(grad_score[2 * h]), from_float<Element>(grad_score[2 * h + 1]));
          const int key_row = key_warp * 16 + group + 8 * h;
          const int query_column = 16 * step + 8 * half + 2 * thread_in_group;
          if (dim_half == 0)
            *reinterpret_cast<uint32_t*>(grad_scores + key_row * kGradScorePitch + query_column) =
                grad_score_operands[step][2 * half + h];
        }

#pragma unroll
    for (int step = 0; step < kQuerySteps; ++step) {
#pragma unroll
      for (int n = 0; n < kGradTiles; n += 2) {
        uint32_t b[4];
        warp::ldmatrix_x4<true>(b, grad_out_tile + transposed_operand_offset + step * 16 * kPitch + n * 8);
        const uint32_t b_low[2] = {b[0], b[1]};
        const uint32_t b_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(grad_value[n], probability_operands[step], b_low);
        warp::mma_m16n8k16<Element>(grad_value[n + 1], probability_operands[step], b_high);
        warp::ldmatrix_x4<true>(b, query_tile + transposed_operand_offset + step * 16 * kPitch + n * 8);
        const uint32_t q_low[2] = {b[0], b[1]};
        const uint32_t q_high[2] = {b[2], b[3]};
        warp::mma_m16n8k16<Element>(grad_key[n], grad_score_operands[step], q_low);
        warp::mma_m16n8k16<Element>(grad_key[n + 1], grad_score_operands[step], q_high);
      }
    }
    __syncthreads();  // dS^T of every warp is in shared memory

    // dQ = dS K, added into dq_accum: units of 16 queries x 32 columns (16 accumulators: dK
    // and dV hold the other registers; 16 columns with kDimSplit 2) handed to the warps
    // round-robin.
    constexpr int kQueryGroups = kBlockM / 16;
    // m16n8 tiles of dQ per unit: 2 with kDimSplit 2 (4 spilled 8 bytes at D 256 on sm_90)
    constexpr int kQueryGradChunk = Config::kDimSplit > 1 ? 2 : 4;
    constexpr int kUnits = kQueryGroups * (kQueryGradTiles / kQueryGradChunk);
#pragma unroll 1
    for (int unit = warp_index; unit < kUnits; unit += Config::kWarps) {
      const int query_group = unit % kQueryGroups;
      const int first_column = unit / kQueryGroups * kQueryGradChunk * 8;
      float grad_query[kQueryGradChunk][4];
#pragma unroll
      for (int n = 0; n < kQueryGradChunk; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) grad_query[n][i] = 0.0f;
#pragma unroll
      for (int step = 0; step < kKeySteps; ++step) {
        uint32_t a[4];
        warp::ldmatrix_x4<true>(
            a, grad_scores + grad_score_offset + query_group * 16 + step * 16 * kGradScorePitch);
#pragma unroll
        for (int n = 0; n < kQueryGradChunk; n += 2) {
          uint32_t b[4];
          warp::ldmatrix_x4<true>(
              b, key_tile + transposed_operand_offset - first_dim + step * 16 * kPitch + first_column + n * 8);
          const uint32_t b_low[2] = {b[0], b[1]};
          const uint32_t b_high[2] = {b[2], b[3]};
          warp::mma_m16n8k16<Element>(grad_query[n], a, b_low);
          warp::mma_m16n8k16<Element>(grad_query[n + 1], a, b_high);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = first_row + query_group * 16 + group + 8 * h;
        if (row >= view.seqlen_q) continue;
        float* dq_row = dq_accum + static_cast<int64_t>(row) * bp.dq_accum_strides.row;
#pragma unroll
        for (int n = 0; n < kQueryGradChunk; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int column = first_column + 8 * n + 2 * thread_in_group + j;
            if (column < p.head_dim) atomicAdd(dq_row + column, grad_query[n][2 * h + j]);
          }
      }
    }
  }
  warp::cp_async_wait<0>();  // no query tile: K and V's group is still to be retired

  // Every key row of the block gets its dK and dV, zero when no query saw it: in dk, dv
  // without GQA, in this query head's partials with it (the partials' max(D, Dv) columns;
  // columns past a head dim are exact zeros, their operands zero-filled).
  const float value_scale = dropout ? p.dropout_keep_scale : 1.0f;  // P was kept unscaled
  const int columns = max(p.head_dim, p.head_dim_v);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key_row = key_warp * 16 + group + 8 * h;
    if (key_row >= owned.valid_keys) continue;
    const int64_t row = owned.k_row + key_row;
    if (owned.group > 1) {
      const int64_t at = batch * bp.partial_strides.batch + head * bp.partial_strides.head +
                         row * bp.partial_strides.row;
#pragma unroll
      for (int n = 0; n < kGradTiles; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int column = first_dim + 8 * n + 2 * thread_in_group + j;
          if (column < columns) {
            bp.dk_partial[at + column] = grad_key[n][2 * h + j];
            bp.dv_partial[at + column] = grad_value[n][2 * h + j] * value_scale;
          }
        }
      continue;
    }
    Element* dk = static_cast<Element*>(bp.dk) + batch * bp.dk_strides.batch +
                  owned.kv_head * bp.dk_strides.head + row * bp.dk_strides.row;
    Element* dv = static_cast<Element*>(bp.dv) + batch * bp.dv_strides.batch +
                  owned.kv_head * bp.dv_strides.head + row * bp.dv_strides.row;
#pragma unroll
    for (int n = 0; n < kGradTiles; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int column = first_dim + 8 * n + 2 * thread_in_group + j;
        if (column < p.head_dim) dk[column] = from_float<Element>(grad_key[n][2 * h + j]);
        if (column < p.head_dim_v) dv[column] = from_float<Element>(grad_value[n][2 * h + j] * value_scale);
      }
  }
}

// Blocks of the mma backward grid, as flat_grid_blocks.
template <typename Element, int kHeadDim>
int64_t mma_backward_grid_blocks(const AttentionParams& p) {
  return flat_grid_blocks(tile_count(p.seqlen_k, MmaBackwardConfig<Element, kHeadDim>::kBlockN), p.heads_q,
                          p.batch);
}

#if defined(__CUDACC__)
template <typename Element, int kHeadDim>
const char* launch_attention_backward_mma(const AttentionBackwardParams& bp, cudaStream_t stream) {
  using Config = MmaBackwardConfig<Element, kHeadDim>;
  return launch_backward_grid<Element>(attention_backward_mma_kernel<Element, kHeadDim>,
                                       mma_backward_grid_blocks<Element, kHeadDim>(bp.forward), Config::kThreads,
                                       Config::kSharedBytes, bp, stream);
}

// The head-dim switch of the fp16/bf16 backward: the mma kernel in every bucket.
template <typename Element>
const char* attention_backward_mma_for(const AttentionBackwardParams& bp, void* stream) {
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  switch (head_dim_bucket(bp.forward.head_dim, bp.forward.head_dim_v)) {
#define FUSEDATTN_BACKWARD_MMA_CASE(HEAD_DIM) \
  case HEAD_DIM:                              \
    return launch_attention_backward_mma<Element, HEAD_DIM>(bp, cuda_stream);
    FUSEDATTN_FOR_EACH_HEAD_DIM(FUSEDATTN_BACKWARD_MMA_CASE)
#undef FUSEDATTN_BACKWARD_MMA_CASE
    default:
      return "fusedattn cuda: this build has no kernel for this head dim";
  }
}
#endif  // __CUDACC__

}  // namespace fusedattn::cuda
