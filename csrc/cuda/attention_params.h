// The interface between the torch binding (bindings.cpp) and the CUDA kernels.
//
// Plain C++ only: no torch and no CUDA headers, so the kernel sources compile on their
// own (scripts/cuda_check.sh) and the binding needs nothing from the kernels but this.
// Every tensor is described by a pointer and strides counted in elements; the last
// (head) dimension of q, k, v, out, grad_out, dq, dk, dv is contiguous.
#pragma once

#include <cstdint>

namespace fusedattn::cuda {

enum class ElementType : int { Float16 = 0, BFloat16 = 1, Float32 = 2 };
enum class MaskKind : int { None = 0, Bool = 1, Additive = 2 };

// The most rows the kernels address (as int): dense Sq and Sk, packed token counts (the
// offsets are int32 anyway). attention_ops.h refuses larger tensors.
constexpr int64_t kMaxRows = 2147483647;

// Strides of a tensor addressed as (batch, head, row[, column]).
// Dense (B, H, S, D) tensors use all three; packed varlen (T, H, D) tensors set batch = 0
// and the kernel adds the sequence's first token (cu_seqlens[b]) to the row.
struct RowStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

// One forward call. The same struct carries the options of a backward call.
struct AttentionParams {
  ElementType element_type = ElementType::Float16;

  const void* q = nullptr;  // (B, Hq, Sq, D) or (Tq, Hq, D)
  const void* k = nullptr;  // (B, Hkv, Sk, D) or (Tk, Hkv, D)
  const void* v = nullptr;  // (B, Hkv, Sk, Dv) or (Tk, Hkv, Dv)
  RowStrides q_strides, k_strides, v_strides;
  void* out = nullptr;  // like q with Dv columns
  RowStrides out_strides;
  float* lse = nullptr;  // (B, Hq, Sq) or (Hq, Tq), natural log
  RowStrides lse_strides;

  int batch = 0;     // B, or the number of packed sequences N
  int heads_q = 0;   // Hq
  int heads_kv = 0;  // Hkv, divides Hq
  int seqlen_q = 0;  // Sq, or max_seqlen_q clamped to [0, total_q] for varlen (sizes the grid)
  int seqlen_k = 0;  // Sk, or max_seqlen_k clamped to [0, total_k] for varlen
  int head_dim = 0;  // D
  int head_dim_v = 0;  // Dv

  // Metadata the host may not have checked (torch.compile, CUDA graph capture): the kernels
  // clamp every value read from these into the tensors (sequence_view in attention_common.cuh).
  const int32_t* cu_seqlens_q = nullptr;  // (N + 1,) for varlen, else null
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* key_lengths = nullptr;  // (B,) or null
  int64_t total_q = 0;  // varlen: q.size(0) and k.size(0), the bounds of every clamped offset
  int64_t total_k = 0;

  float scale = 1.0f;
  bool causal = false;
  bool bottom_right = true;  // query i sits at key position i + Sk - Sq (else i)
  int window_left = -1;      // -1: unbounded
  int window_right = -1;
  float softcap = 0.0f;  // 0: off

  const float* alibi_slopes = nullptr;  // (Hq,) or (B, Hq)
  const float* sinks = nullptr;         // (Hq,) logits in every row's softmax denominator, or null
  int64_t alibi_batch_stride = 0;
  int64_t alibi_head_stride = 0;

  MaskKind mask_kind = MaskKind::None;
  const void* mask = nullptr;  // bool (1 byte) or the element type, read through strides
  int64_t mask_strides[4] = {0, 0, 0, 0};  // (batch, head, query, key)

  uint64_t dropout_threshold = 0;  // drop when hash < floor(p * 2^32); may equal 2^32; 0: no dropout
  uint32_t dropout_seed_key = 0;   // semantics.dropout_seed_key(seed)
  float dropout_keep_scale = 1.0f;  // 1 / (1 - p), 0 when p == 1

  // True when every row start of q/k/v/out/grad_out is 16-byte aligned and the head dims
  // are multiples of 16 bytes: tiles are then copied with 16-byte vector loads.
  bool vector_loads = false;

  // Split-KV (fp16/bf16 forward only): num_splits > 1 cuts each block's key tiles into that
  // many parts, run by separate blocks, which write unnormalized float partials here; a
  // combine kernel then merges them by their maxima (the lse combine) and writes out and lse.
  int num_splits = 1;
  float* split_out = nullptr;    // (num_splits, split_rows, head_dim_v)
  float* split_stats = nullptr;  // (num_splits, split_rows, 2): row max, row sum
  int64_t split_rows = 0;        // Hq * B * Sq dense, Hq * Tq packed (split_row_index)
};

// Tile sizes of the fp16/bf16 forward (attention_forward_mma.cuh asserts they match), for the
// split-KV choice, which the op layer makes without CUDA headers.
constexpr int kMmaForwardBlockM = 128;
constexpr int mma_forward_block_n(int largest_head_dim) {
  return largest_head_dim <= 128 ? 64 : (largest_head_dim <= 224 ? 32 : 16);
}

// Split-KV is chosen when the grid would leave most of the GPU idle and every split still
// gets several key tiles: blocks = query tiles x heads x sequences below 80% of the SMs, then
// splits = the fewest that fill the SMs once, at most one per 2 key tiles and at most
// kMaxForwardSplits (the combine reads every split of a row). Decode (Sq 1, long keys) is the
// case it is for; prefill grids fill the GPU already and stay unsplit.
constexpr int kMaxForwardSplits = 16;
constexpr int kMinKeyTilesPerSplit = 2;
inline int forward_split_count(const AttentionParams& p, int multiprocessors) {
  if (p.element_type == ElementType::Float32 || multiprocessors <= 0) return 1;
  if (p.seqlen_q <= 0 || p.seqlen_k <= 0 || p.batch <= 0) return 1;
  const int64_t query_tiles = (int64_t{p.seqlen_q} + kMmaForwardBlockM - 1) / kMmaForwardBlockM;
  const int64_t blocks = query_tiles * p.heads_q * p.batch;
  if (blocks * 5 >= int64_t{multiprocessors} * 4) return 1;
  const int block_n = mma_forward_block_n(p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v);
  const int64_t key_tiles = (int64_t{p.seqlen_k} + block_n - 1) / block_n;
  int64_t splits = (multiprocessors + blocks - 1) / blocks;
  if (splits > key_tiles / kMinKeyTilesPerSplit) splits = key_tiles / kMinKeyTilesPerSplit;
  if (splits > kMaxForwardSplits) splits = kMaxForwardSplits;
  return splits < 2 ? 1 : static_cast<int>(splits);
}

struct AttentionBackwardParams {
  AttentionParams forward;  // q, k, v, out, lse and every option

  const void* grad_out = nullptr;  // like out
  RowStrides grad_out_strides;
  float* delta = nullptr;  // rowsum(grad_out * out) in float32, indexed like lse; written by the launch
  RowStrides delta_strides;
  float* dq_accum = nullptr;  // float32 like q, zero-filled; the kernels add into it
  RowStrides dq_accum_strides;
  void* dk = nullptr;  // like k
  RowStrides dk_strides;
  void* dv = nullptr;  // like v
  RowStrides dv_strides;
  // GQA only (Hq > Hkv): float32 dK and dV per query head, (B, Hq, Sk, max(D, Dv)) or
  // (Tk, Hq, max(D, Dv)), written by the backward kernel, summed over each group by
  // attention_backward_group_sum_kernel.
  float* dk_partial = nullptr;
  float* dv_partial = nullptr;
  RowStrides partial_strides;
};

// Launch on `stream` (a cudaStream_t). Return nullptr on success, else a static message.
const char* attention_forward(const AttentionParams& params, void* stream);
const char* attention_backward(const AttentionBackwardParams& params, void* stream);

// Per element type, used by the two functions above (one source file each, compiled in parallel).
const char* attention_forward_float16(const AttentionParams& params, void* stream);
const char* attention_forward_bfloat16(const AttentionParams& params, void* stream);
const char* attention_forward_float32(const AttentionParams& params, void* stream);
const char* attention_backward_float16(const AttentionBackwardParams& params, void* stream);
const char* attention_backward_bfloat16(const AttentionBackwardParams& params, void* stream);
const char* attention_backward_float32(const AttentionBackwardParams& params, void* stream);

}  // namespace fusedattn::cuda
