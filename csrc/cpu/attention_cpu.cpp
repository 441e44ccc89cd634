// The torch-facing side of the CPU attention backend: the fusedattn_native::cpu_forward /
// cpu_backward operators, which describe the call as a plain AttentionProblem and run the
// kernel variant for the widest instruction set this CPU supports.
//
// Outputs are allocated by the Python backend (python/fusedattn/backends/cpu.py) and
// passed in; the options arrive already validated (python/fusedattn/validation.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <initializer_list>
#include <string>
#include <vector>

#include "cpu/attention_entry.h"
#include "cpu/attention_problem.h"
#include "native_options.h"

namespace fusedattn::cpu {
namespace {

// Compiled variants, widest first. A variant is usable when the CPU (and the OS) supports
// its instructions; FUSEDATTN_CPU_ISA=<name> picks a narrower one (tests use it).
struct Candidate {
  const KernelVariant* variant;
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__) || defined(__i386__)
#if defined(FUSEDATTN_CPU_HAS_AVX2)
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
#if defined(FUSEDATTN_CPU_HAS_AVX512)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}
#endif
#if defined(FUSEDATTN_CPU_HAS_AVX512BF16)
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
#endif

std::vector<Candidate> candidates() {
  std::vector<Candidate> list;
#if defined(FUSEDATTN_CPU_HAS_AVX512BF16)
  list.push_back({&avx512bf16::kVariant, &has_avx512bf16});
#endif
#if defined(FUSEDATTN_CPU_HAS_AVX512)
  list.push_back({&avx512::kVariant, &has_avx512});
#endif
#if defined(FUSEDATTN_CPU_HAS_AVX2)
  list.push_back({&avx2::kVariant, &has_avx2});
#endif
  list.push_back({&generic::kVariant, &always});
  return list;
}

const KernelVariant& select_variant() {
  static const std::vector<Candidate> list = candidates();
  const char* requested = std::getenv("FUSEDATTN_CPU_ISA");
  if (requested != nullptr && *requested != '\0') {
    for (const Candidate& candidate : list)
      if (std::string(candidate.variant->name) == requested) {
        TORCH_CHECK(candidate.supported(), "FUSEDATTN_CPU_ISA=", requested, ": this CPU lacks its instructions");
        return *candidate.variant;
      }
    TORCH_CHECK(false, "FUSEDATTN_CPU_ISA=", requested, " is not a compiled variant");
  }
  for (const Candidate& candidate : list)
    if (candidate.supported()) return *candidate.variant;
  return generic::kVariant;
}

ElementType element_type_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return ElementType::float32;
    case at::kBFloat16:
      return ElementType::bfloat16;
    case at::kHalf:
      return ElementType::float16;
    default:
      TORCH_CHECK_TYPE(false, "q: expected dtype float32, bfloat16 or float16, got ", tensor.scalar_type());
  }
}

KeyValueType key_value_type_of(const at::Tensor& k) {
  if (k.scalar_type() == at::kChar) return KeyValueType::int8;
  if (k.scalar_type() == at::kFloat8_e4m3fn) return KeyValueType::float8_e4m3;
  return KeyValueType::like_queries;
}

// q/k/v/out-like tensors: dense (B, H, S, D) or packed (T, H, D).
TensorView token_view(const at::Tensor& tensor) {
  TensorView view;
  view.data = tensor.data_ptr();
  if (tensor.dim() == 4) {
    view.stride_batch = tensor.stride(0);
    view.stride_head = tensor.stride(1);
    view.stride_position = tensor.stride(2);
    view.stride_feature = tensor.stride(3);
  } else {
    view.stride_head = tensor.stride(1);
    view.stride_position = tensor.stride(0);
    view.stride_feature = tensor.stride(2);
  }
  return view;
}

// lse: dense (B, H, S) or packed (H, T).
TensorView lse_view(const at::Tensor& lse) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "fusedattn cpu: lse must be float32");
  TensorView view;
  view.data = lse.data_ptr();
  if (lse.dim() == 3) {
    view.stride_batch = lse.stride(0);
    view.stride_head = lse.stride(1);
    view.stride_position = lse.stride(2);
  } else {
    view.stride_head = lse.stride(0);
    view.stride_position = lse.stride(1);
  }
  return view;
}

// ---- checks -----------------------------------------------------------------------------
// The native ops check every size and every metadata value they index with (O(batch)),
// with the errors of python/fusedattn/validation.py: a call that skipped Python's checks
// (a compiled graph, a direct torch.ops call) gets a ValueError, never an out-of-bounds read.

std::string shape_of(const at::Tensor& tensor) {
  std::string text = "(";
  for (int64_t dim = 0; dim < tensor.dim(); ++dim) text += (dim ? ", " : "") + std::to_string(tensor.size(dim));
  return text + (tensor.dim() == 1 ? ",)" : ")");
}

void check_shape(const char* name, const at::Tensor& tensor, std::initializer_list<int64_t> expected) {
  if (tensor.sizes() == at::IntArrayRef(expected.begin(), expected.size())) return;
  // The message is written only for a refusal: this check runs on every call.
  std::string text = "(";
  int64_t dim = 0;
  for (int64_t size : expected) text += (dim++ ? ", " : "") + std::to_string(size);
  text += expected.size() == 1 ? ",)" : ")";
  TORCH_CHECK_VALUE(false, name, ": expected shape ", text, ", got ", shape_of(tensor));
}

void check_cpu_int32(const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), name, ": expected a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kInt, name, ": expected dtype torch.int32, got ", tensor.scalar_type());
  TORCH_CHECK_VALUE(tensor.is_contiguous(), name, ": expected a contiguous tensor");
}

// cu_seqlens: N + 1 offsets from 0 to the packed length, non-decreasing, no sequence longer
// than max_seqlen.
void check_offsets(const char* name, const at::Tensor& offsets, int64_t total, const char* max_name,
                   int64_t max_seqlen) {
  check_cpu_int32(name, offsets);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, name,
                    ": expected a 1-D tensor of N + 1 offsets, got shape ", shape_of(offsets));
  const int32_t* values = offsets.data_ptr<int32_t>();
  const int64_t count = offsets.size(0);
  TORCH_CHECK_VALUE(values[0] == 0, name, ": expected the first offset to be 0, got ", values[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < count; ++i) {
    TORCH_CHECK_VALUE(values[i] >= values[i - 1], name, ": expected non-decreasing offsets, got ", values[i - 1],
                      " then ", values[i], " at index ", i);
    longest = std::max<int64_t>(longest, static_cast<int64_t>(values[i]) - values[i - 1]);
  }
  TORCH_CHECK_VALUE(values[count - 1] == total, name, ": expected the last offset to equal the packed length ", total,
                    ", got ", values[count - 1]);
  TORCH_CHECK_VALUE(max_seqlen >= longest, max_name, ": expected at least the longest sequence (", longest, "), got ",
                    max_seqlen);
}

// The scales of an 8-bit K or V: float32, shaped like the cache without its feature dim
// (dense (B, H, S), packed (T, H), paged (num_blocks, block_size, H)); any strides (the
// Python side passes expanded views). A view with null data when absent (scale 1).
TensorView descale_view(const char* name, const std::optional<at::Tensor>& descale, const at::Tensor& cache,
                        bool paged) {
  TensorView view;
  if (!descale.has_value()) return view;
  TORCH_CHECK_VALUE(key_value_type_of(cache) != KeyValueType::like_queries, name,
                    ": expected None for a cache of dtype ", cache.scalar_type());
  const at::Tensor& scales = *descale;
  TORCH_CHECK_VALUE(scales.device().is_cpu(), name, ": expected a CPU tensor, got one on ", scales.device());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, name, ": expected float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.sizes() == cache.sizes().slice(0, cache.dim() - 1), name, ": expected shape ",
                    cache.sizes().slice(0, cache.dim() - 1), " (that of the cache without its head dim), got ",
                    shape_of(scales));
  view.data = scales.data_ptr();
  view.stride_feature = 0;
  if (paged) {
    view.stride_batch = scales.stride(0);
    view.stride_position = scales.stride(1);
    view.stride_head = scales.stride(2);
  } else if (scales.dim() == 3) {
    view.stride_batch = scales.stride(0);
    view.stride_head = scales.stride(1);
    view.stride_position = scales.stride(2);
  } else {
    view.stride_position = scales.stride(0);
    view.stride_head = scales.stride(1);
  }
  return view;
}

// A paged cache (num_blocks, block_size, H, D): blocks on stride_batch, rows on stride_position.
TensorView block_view(const at::Tensor& cache) {
  TensorView view;
  view.data = cache.data_ptr();
  view.stride_batch = cache.stride(0);
  view.stride_position = cache.stride(1);
  view.stride_head = cache.stride(2);
  view.stride_feature = cache.stride(3);
  return view;
}

// block_table (N, max_blocks) and cache_lengths (N,): every length within the table's room
// and every block a sequence uses inside the cache (entries past its last block are never read).
void describe_pages(const at::Tensor& table, const at::Tensor& lengths, const at::Tensor& cache,
                    AttentionProblem& problem) {
  check_cpu_int32("block_table", table);
  check_cpu_int32("cache_lengths", lengths);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == problem.batch, "block_table: expected shape (",
                    problem.batch, ", max_blocks), got ", shape_of(table));
  check_shape("cache_lengths", lengths, {problem.batch});
  problem.block_table = table.data_ptr<int32_t>();
  problem.cache_lengths = lengths.data_ptr<int32_t>();
  problem.table_width = table.size(1);
  problem.block_size = cache.size(1);
  problem.num_blocks = cache.size(0);
  TORCH_CHECK_VALUE(problem.block_size >= 1, "key_cache: expected a block size >= 1, got ", problem.block_size);
  const int64_t capacity = problem.table_width * problem.block_size;
  for (int64_t n = 0; n < problem.batch; ++n) {
    const int64_t length = problem.cache_lengths[n];
    TORCH_CHECK_VALUE(length >= 0 && length <= capacity, "cache_lengths: expected lengths that fit block_table's ",
                      problem.table_width, " blocks of ", problem.block_size, " keys in [0, ", capacity, "], got ",
                      length, " at index ", n);
    for (int64_t slot = 0; slot * problem.block_size < length; ++slot) {
      const int32_t block = problem.block_table[n * problem.table_width + slot];
      TORCH_CHECK_VALUE(block >= 0 && block < problem.num_blocks,
                        "block_table: expected block numbers (in the blocks in use) in [0, ", problem.num_blocks - 1,
                        "], got ", block, " at index (", n, ", ", slot, ")");
    }
  }
}

AttentionProblem describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const NativeOptions& options) {
  FUSEDATTN_UNPACK_OPTIONS(options);
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    TORCH_CHECK_VALUE(tensor->device().is_cpu(), name, ": expected a CPU tensor, got one on ", tensor->device());
  AttentionProblem problem;
  problem.element_type = element_type_of(q);
  problem.kv_type = key_value_type_of(k);
  TORCH_CHECK_TYPE((problem.kv_type == KeyValueType::like_queries ? k.scalar_type() == q.scalar_type()
                                                                   : true) &&
                       v.scalar_type() == k.scalar_type(),
                   "k, v: expected the dtype of q (", q.scalar_type(), ") or both 8-bit, got k ", k.scalar_type(),
                   " and v ", v.scalar_type());
  const bool varlen = cu_seqlens_q.has_value();
  const bool paged = block_table.has_value();
  TORCH_CHECK_VALUE(paged == cache_lengths.has_value(), "cache_lengths: expected together with block_table");
  TORCH_CHECK_VALUE(!paged || (varlen && !cu_seqlens_k.has_value()),
                    "block_table: expected with cu_seqlens_q and without cu_seqlens_k");
  TORCH_CHECK_VALUE(paged || varlen == cu_seqlens_k.has_value(), "cu_seqlens_k: expected together with cu_seqlens_q");
  const int64_t rank = varlen ? 3 : 4;
  const int64_t rank_kv = paged ? 4 : rank;  // paged caches: (num_blocks, block_size, Hkv, D)
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    const int64_t expected = name[0] == 'q' ? rank : rank_kv;
    TORCH_CHECK_VALUE(tensor->dim() == expected, name, ": expected a ", expected, "-D tensor, got shape ",
                      shape_of(*tensor));
  }
  const int64_t head_dim = q.size(-1);
  const int64_t heads_q = q.size(-2 - (varlen ? 0 : 1));
  const int64_t heads_kv = paged ? k.size(2) : k.size(-2 - (varlen ? 0 : 1));
  TORCH_CHECK_VALUE(head_dim >= 1 && v.size(-1) >= 1, "q, v: expected head dims >= 1, got ", head_dim, " and ",
                    v.size(-1));
  TORCH_CHECK_VALUE(heads_kv >= 1 && heads_q % heads_kv == 0,
                    "k: expected a number of heads that divides the ", heads_q, " query heads, got ", heads_kv);
  if (paged) {
    check_shape("k", k, {k.size(0), k.size(1), heads_kv, head_dim});
    check_shape("v", v, {k.size(0), k.size(1), heads_kv, v.size(-1)});
  } else if (varlen) {
    check_shape("k", k, {k.size(0), heads_kv, head_dim});
    check_shape("v", v, {k.size(0), heads_kv, v.size(-1)});
  } else {
    check_shape("k", k, {q.size(0), heads_kv, k.size(2), head_dim});
    check_shape("v", v, {q.size(0), heads_kv, k.size(2), v.size(-1)});
  }
  problem.q = token_view(q);
  problem.k = paged ? block_view(k) : token_view(k);
  problem.v = paged ? block_view(v) : token_view(v);
  problem.k_descale = descale_view("k_descale", k_descale, k, paged);
  problem.v_descale = descale_view("v_descale", v_descale, v, paged);
  problem.head_dim = head_dim;
  problem.head_dim_v = v.size(-1);
  problem.heads_q = heads_q;
  problem.heads_kv = heads_kv;
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q, max_seqlen_k: expected values >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  if (paged) {
    check_offsets("cu_seqlens_q", *cu_seqlens_q, q.size(0), "max_seqlen_q", max_seqlen_q);
    problem.batch = cu_seqlens_q->size(0) - 1;
    problem.seqlen_q = std::min<int64_t>(max_seqlen_q, q.size(0));
    problem.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    describe_pages(*block_table, *cache_lengths, k, problem);
    problem.seqlen_k = std::min<int64_t>(max_seqlen_k, problem.table_width * problem.block_size);
  } else if (varlen) {
    check_offsets("cu_seqlens_q", *cu_seqlens_q, q.size(0), "max_seqlen_q", max_seqlen_q);
    check_offsets("cu_seqlens_k", *cu_seqlens_k, k.size(0), "max_seqlen_k", max_seqlen_k);
    TORCH_CHECK_VALUE(cu_seqlens_k->size(0) == cu_seqlens_q->size(0), "cu_seqlens_k: expected ",
                      cu_seqlens_q->size(0), " offsets (as many as cu_seqlens_q), got ", cu_seqlens_k->size(0));
    problem.batch = cu_seqlens_q->size(0) - 1;
    // The kernels size per-sequence work by these; no sequence is longer than its tensor.
    problem.seqlen_q = std::min<int64_t>(max_seqlen_q, q.size(0));
    problem.seqlen_k = std::min<int64_t>(max_seqlen_k, k.size(0));
    problem.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    problem.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  } else {
    problem.batch = q.size(0);
    problem.seqlen_q = q.size(2);
    problem.seqlen_k = k.size(2);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK_VALUE(!varlen, "attn_mask: expected None for varlen calls");
    TORCH_CHECK_VALUE(mask.device().is_cpu(), "attn_mask: expected a CPU tensor, got one on ", mask.device());
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(),
                     "attn_mask: expected dtype torch.bool or ", q.scalar_type(), " (that of q), got ",
                     mask.scalar_type());
    check_shape("attn_mask", mask, {problem.batch, heads_q, problem.seqlen_q, problem.seqlen_k});
    problem.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::boolean : MaskKind::additive;
    problem.mask.data = mask.data_ptr();
    problem.mask.stride_batch = mask.stride(0);
    problem.mask.stride_head = mask.stride(1);
    problem.mask.stride_position = mask.stride(2);
    problem.mask.stride_feature = mask.stride(3);
  }
  if (key_lengths.has_value()) {
    TORCH_CHECK_VALUE(!varlen, "key_lengths: expected None for varlen calls");
    check_cpu_int32("key_lengths", *key_lengths);
    check_shape("key_lengths", *key_lengths, {problem.batch});
    const int32_t* lengths = key_lengths->data_ptr<int32_t>();
    for (int64_t b = 0; b < problem.batch; ++b)
      TORCH_CHECK_VALUE(lengths[b] >= 0 && lengths[b] <= problem.seqlen_k, "key_lengths: expected values in [0, ",
                        problem.seqlen_k, "] (Sk), got ", lengths[b], " at index ", b);
    problem.key_lengths = lengths;
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    TORCH_CHECK_VALUE(slopes.device().is_cpu(), "alibi_slopes: expected a CPU tensor, got one on ", slopes.device());
    TORCH_CHECK_TYPE(slopes.scalar_type() == at::kFloat && slopes.is_contiguous(),
                     "alibi_slopes: expected a contiguous float32 tensor, got ", slopes.scalar_type());
    TORCH_CHECK_VALUE((slopes.dim() == 1 && slopes.size(0) == heads_q) ||
                          (slopes.dim() == 2 && slopes.size(0) == problem.batch && slopes.size(1) == heads_q),
                      "alibi_slopes: expected shape (", heads_q, ",) or (", problem.batch, ", ", heads_q, "), got ",
                      shape_of(slopes));
    problem.alibi_slopes = slopes.data_ptr<float>();
    problem.alibi_batch_stride = slopes.dim() == 2 ? slopes.size(1) : 0;
  }
  if (sinks.has_value()) {
    TORCH_CHECK_VALUE(sinks->device().is_cpu(), "sinks: expected a CPU tensor, got one on ", sinks->device());
    TORCH_CHECK_TYPE(sinks->scalar_type() == at::kFloat && sinks->is_contiguous(),
                     "sinks: expected a contiguous float32 tensor, got ", sinks->scalar_type());
    check_shape("sinks", *sinks, {heads_q});
    problem.sinks = sinks->data_ptr<float>();
  }
  problem.scale = static_cast<float>(scale);
  problem.causal = causal;
  problem.bottom_right = bottom_right;
  // Validation caps the sides at kWidestWindow (a wider side hides nothing).
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1 && window_left <= kWidestWindow &&
                        window_right <= kWidestWindow,
                    "window: expected sides in [0, 2**30] or -1 (unbounded), got (", window_left, ", ", window_right,
                    ")");
  problem.window_left = window_left;
  problem.window_right = window_right;
  // Validation keeps the starts in [0, 2**29] (validation.LATEST_SEQUENCE_START).
  TORCH_CHECK_VALUE(query_start >= 0 && key_start >= 0 && query_start <= (int64_t(1) << 29) &&
                        key_start <= (int64_t(1) << 29),
                    "query_start, key_start: expected values in [0, 2**29], got ", query_start, " and ", key_start);
  TORCH_CHECK_VALUE(!varlen || (query_start == 0 && key_start == 0),
                    "query_start, key_start: expected 0 for varlen and paged calls, got ", query_start, " and ",
                    key_start);
  problem.query_start = query_start;
  problem.key_start = key_start;
  problem.softcap = static_cast<float>(softcap);
  TORCH_CHECK_VALUE(dropout_threshold >= 0 && dropout_threshold <= (int64_t(1) << 32),
                    "dropout_threshold: expected a value in [0, 2**32], got ", dropout_threshold);
  problem.dropout_threshold = static_cast<uint64_t>(dropout_threshold);
  problem.dropout_keep_scale = static_cast<float>(dropout_keep_scale);
  problem.dropout_seed_key = static_cast<uint32_t>(dropout_seed_key & 0xffffffff);
  problem.num_threads = at::get_num_threads();
  return problem;
}

// out-like tensors (out, grad_out, grad_q/k/v) have the shape and dtype of what they mirror.
void check_like(const char* name, const at::Tensor& tensor, const at::Tensor& like, int64_t last_dim) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), name, ": expected a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
                   tensor.scalar_type());
  const at::IntArrayRef sizes = tensor.sizes(), like_sizes = like.sizes();
  const bool same = sizes.size() == like_sizes.size() && !sizes.empty() && sizes.back() == last_dim &&
                    sizes.slice(0, sizes.size() - 1) == like_sizes.slice(0, like_sizes.size() - 1);
  if (same) return;
  std::vector<int64_t> expected(like_sizes.begin(), like_sizes.end());
  if (!expected.empty()) expected.back() = last_dim;
  TORCH_CHECK_VALUE(false, name, ": expected shape ", at::IntArrayRef(expected), ", got ", sizes);
}

void check_lse(const at::Tensor& lse, const at::Tensor& q, bool varlen) {
  TORCH_CHECK_VALUE(lse.device().is_cpu(), "lse: expected a CPU tensor, got one on ", lse.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype torch.float32, got ", lse.scalar_type());
  if (varlen)
    check_shape("lse", lse, {q.size(1), q.size(0)});
  else
    check_shape("lse", lse, {q.size(0), q.size(1), q.size(2)});
}

std::string cpu_isa() { return select_variant().name; }

}  // namespace

void cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse FUSEDATTN_OPTION_PARAMETERS) {
  FUSEDATTN_COLLECT_OPTIONS();
  cpu_forward_with_options(q, k, v, out, lse, options);
}

void cpu_forward_with_options(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const NativeOptions& options) {
  const bool varlen = options.cu_seqlens_q.has_value();
  AttentionProblem problem = describe(q, k, v, options);
  check_like("out", out, q, v.size(-1));
  check_lse(lse, q, varlen);
  problem.out = token_view(out);
  problem.lse = lse_view(lse);
  select_variant().forward(problem);
}

void cpu_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                  at::Tensor& grad_v FUSEDATTN_OPTION_PARAMETERS) {
  FUSEDATTN_COLLECT_OPTIONS();
  TORCH_CHECK_VALUE(!block_table.has_value(), "block_table: the CPU backward does not read paged KV caches");
  TORCH_CHECK_VALUE(key_value_type_of(k) == KeyValueType::like_queries,
                    "k, v: the CPU backward does not read 8-bit caches (inference only)");
  AttentionProblem problem = describe(q, k, v, options);
  check_like("grad_out", grad_out, q, v.size(-1));
  check_like("out", out, q, v.size(-1));
  check_lse(lse, q, cu_seqlens_q.has_value());
  check_like("grad_q", grad_q, q, q.size(-1));
  check_like("grad_k", grad_k, k, k.size(-1));
  check_like("grad_v", grad_v, v, v.size(-1));
  problem.grad_out = token_view(grad_out);
  problem.out = token_view(out);
  problem.lse = lse_view(lse);
  problem.grad_q = token_view(grad_q);
  problem.grad_k = token_view(grad_k);
  problem.grad_v = token_view(grad_v);
  select_variant().backward(problem);
}

}  // namespace fusedattn::cpu

TORCH_LIBRARY_FRAGMENT(fusedattn_native, m) {
  m.def("cpu_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse" FUSEDATTN_OPTIONS_SCHEMA ") -> ()");
  m.def("cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) grad_q, "
        "Tensor(b!) grad_k, Tensor(c!) grad_v" FUSEDATTN_OPTIONS_SCHEMA ") -> ()");
  m.def("cpu_isa() -> str", &fusedattn::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(fusedattn_native, CPU, m) {
  m.impl("cpu_forward", &fusedattn::cpu::cpu_forward);
  m.impl("cpu_backward", &fusedattn::cpu::cpu_backward);
}
