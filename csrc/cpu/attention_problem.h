// The plain description of one attention call that the CPU kernels receive.
//
// This header includes no torch header on purpose: the kernel translation units are
// compiled once per instruction set (generic, AVX2, AVX-512, ...) with their own flags,
// and any inline function shared with the rest of the build could be merged by the
// linker into a variant the running CPU lacks. The torch-facing code in
// attention_cpu.cpp fills these structs; the kernels only read them.
#pragma once

#include <cstdint>

namespace fusedattn::cpu {

enum class ElementType : int32_t { float32 = 0, bfloat16 = 1, float16 = 2 };
// How K and V are stored: like q, or 8 bits with a float32 scale per row (k_descale).
enum class KeyValueType : int32_t { like_queries = 0, int8 = 1, float8_e4m3 = 2 };

// A tensor read as [sequence, head, position, feature] through element strides.
// Dense tensors (B, H, S, D) use all four strides. Packed varlen tensors (T, H, D) use
// stride_batch = 0 and add the sequence's token offset to the position. Paged caches
// (num_blocks, block_size, H, D) use stride_batch as the block stride and stride_position
// as the row stride within a block (see AttentionProblem::block_table).
struct TensorView {
  void* data = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_head = 0;
  int64_t stride_position = 0;
  int64_t stride_feature = 1;
};

enum class MaskKind : int32_t { none = 0, boolean = 1, additive = 2 };

struct AttentionProblem {
  ElementType element_type = ElementType::float32;
  int64_t batch = 0;  // B, or the number of packed sequences for varlen
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t head_dim = 0;
  int64_t head_dim_v = 0;
  int64_t seqlen_q = 0;  // dense Sq (varlen: per-sequence lengths come from cu_seqlens)
  int64_t seqlen_k = 0;
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1,) token offsets; null for dense calls
  const int32_t* cu_seqlens_k = nullptr;
  // Paged K/V (null otherwise): sequence n's key j is row j % block_size of block
  // block_table[n * table_width + j / block_size]; it has cache_lengths[n] keys. The kernels
  // clamp every block number into [0, num_blocks) and every length into the table's room.
  const int32_t* block_table = nullptr;
  const int32_t* cache_lengths = nullptr;
  int64_t table_width = 0;
  int64_t block_size = 1;
  int64_t num_blocks = 0;

  TensorView q, k, v;
  TensorView out;  // forward output (also the saved output read by the backward)
  TensorView lse;  // float32; stride_feature unused
  TensorView grad_out, grad_q, grad_k, grad_v;

  MaskKind mask_kind = MaskKind::none;
  TensorView mask;  // (B, Hq, Sq, Sk) view: stride_feature is the key stride
  const int32_t* key_lengths = nullptr;  // (B,) or null
  const float* alibi_slopes = nullptr;   // (Hq,) or (B, Hq) float32, or null
  int64_t alibi_batch_stride = 0;
  const float* sinks = nullptr;  // (Hq,) float32 logits in every row's denominator, or null

  float scale = 1.0f;
  bool causal = false;
  bool bottom_right = true;
  int64_t window_left = -1;  // -1: unbounded
  int64_t window_right = -1;
  // Global index of query row 0 and key 0 (a block of a longer sequence, dense calls):
  // positions and the dropout hash use query_start + i and key_start + j.
  int64_t query_start = 0;
  int64_t key_start = 0;
  // 8-bit K / V: values times these scales, one per row of K / V, read through views shaped
  // like K's and V's without the feature dim (data null: scale 1).
  KeyValueType kv_type = KeyValueType::like_queries;
  TensorView k_descale;
  TensorView v_descale;
  float softcap = 0.0f;  // 0: off

  uint64_t dropout_threshold = 0;  // drop when hash < threshold; 0: no dropout
  float dropout_keep_scale = 1.0f;
  uint32_t dropout_seed_key = 0;

  int num_threads = 1;
};

// One instruction-set variant of the kernels. Every variant computes the same function.
struct KernelVariant {
  const char* name;
  void (*forward)(const AttentionProblem&);
  void (*backward)(const AttentionProblem&);
};

// Each kernel translation unit defines one of these (see attention_kernel.inc).
namespace generic {
extern const KernelVariant kVariant;
}
namespace avx2 {
extern const KernelVariant kVariant;
}
namespace avx512 {
extern const KernelVariant kVariant;
}
namespace avx512bf16 {
extern const KernelVariant kVariant;
}

}  // namespace fusedattn::cpu
