// The torch-facing side of the CPU attention backend: the fusedattn_native::cpu_forward /
// cpu_backward operators, which describe the call as a plain AttentionProblem and run the
// kernel variant for the widest instruction set this CPU supports.
//
// Outputs are allocated by the Python backend (python/fusedattn/backends/cpu.py) and
// passed in; the options arrive already validated (python/fusedattn/validation.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

#include "cpu/attention_problem.h"

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
      TORCH_CHECK(false, "fusedattn cpu: unsupported dtype ", tensor.scalar_type());
  }
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

AttentionProblem describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths,
                          const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                          const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k,
                          double scale, bool causal, bool bottom_right, int64_t window_left, int64_t window_right,
                          double softcap, int64_t dropout_threshold, double dropout_keep_scale,
                          int64_t dropout_seed_key) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "fusedattn cpu: CPU tensors only");
  AttentionProblem problem;
  problem.element_type = element_type_of(q);
  const bool varlen = cu_seqlens_q.has_value();
  problem.q = token_view(q);
  problem.k = token_view(k);
  problem.v = token_view(v);
  problem.head_dim = q.size(-1);
  problem.head_dim_v = v.size(-1);
  if (varlen) {
    TORCH_CHECK(cu_seqlens_k.has_value(), "fusedattn cpu: cu_seqlens_k is required with cu_seqlens_q");
    TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_q->is_contiguous() &&
                    cu_seqlens_k->scalar_type() == at::kInt && cu_seqlens_k->is_contiguous(),
                "fusedattn cpu: cu_seqlens must be contiguous int32");
    problem.batch = cu_seqlens_q->size(0) - 1;
    problem.heads_q = q.size(1);
    problem.heads_kv = k.size(1);
    problem.seqlen_q = max_seqlen_q;
    problem.seqlen_k = max_seqlen_k;
    problem.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    problem.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  } else {
    problem.batch = q.size(0);
    problem.heads_q = q.size(1);
    problem.heads_kv = k.size(1);
    problem.seqlen_q = q.size(2);
    problem.seqlen_k = k.size(2);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.dim() == 4, "fusedattn cpu: attn_mask must be a 4-D (B, Hq, Sq, Sk) view");
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type(),
                "fusedattn cpu: attn_mask must be bool or q's dtype");
    problem.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::boolean : MaskKind::additive;
    problem.mask.data = mask.data_ptr();
    problem.mask.stride_batch = mask.stride(0);
    problem.mask.stride_head = mask.stride(1);
    problem.mask.stride_position = mask.stride(2);
    problem.mask.stride_feature = mask.stride(3);
  }
  if (key_lengths.has_value()) {
    TORCH_CHECK(key_lengths->scalar_type() == at::kInt && key_lengths->is_contiguous(),
                "fusedattn cpu: key_lengths must be contiguous int32");
    problem.key_lengths = key_lengths->data_ptr<int32_t>();
  }
  if (alibi_slopes.has_value()) {
    TORCH_CHECK(alibi_slopes->scalar_type() == at::kFloat && alibi_slopes->is_contiguous(),
                "fusedattn cpu: alibi_slopes must be contiguous float32");
    problem.alibi_slopes = alibi_slopes->data_ptr<float>();
    problem.alibi_batch_stride = alibi_slopes->dim() == 2 ? alibi_slopes->size(1) : 0;
  }
  problem.scale = static_cast<float>(scale);
  problem.causal = causal;
  problem.bottom_right = bottom_right;
  problem.window_left = window_left;
  problem.window_right = window_right;
  problem.softcap = static_cast<float>(softcap);
  TORCH_CHECK(dropout_threshold >= 0 && dropout_threshold <= (int64_t(1) << 32),
              "fusedattn cpu: dropout_threshold must be in [0, 2**32]");
  problem.dropout_threshold = static_cast<uint64_t>(dropout_threshold);
  problem.dropout_keep_scale = static_cast<float>(dropout_keep_scale);
  problem.dropout_seed_key = static_cast<uint32_t>(dropout_seed_key & 0xffffffff);
  problem.num_threads = at::get_num_threads();
  return problem;
}

void cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_lengths,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k,
                 double scale, bool causal, bool bottom_right, int64_t window_left, int64_t window_right,
                 double softcap, int64_t dropout_threshold, double dropout_keep_scale, int64_t dropout_seed_key) {
  AttentionProblem problem =
      describe(q, k, v, attn_mask, key_lengths, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
               scale, causal, bottom_right, window_left, window_right, softcap, dropout_threshold,
               dropout_keep_scale, dropout_seed_key);
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "fusedattn cpu: out must have q's dtype");
  problem.out = token_view(out);
  problem.lse = lse_view(lse);
  select_variant().forward(problem);
}

void cpu_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                  at::Tensor& grad_v, const std::optional<at::Tensor>& attn_mask,
                  const std::optional<at::Tensor>& key_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
                  const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& alibi_slopes,
                  int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, bool bottom_right,
                  int64_t window_left, int64_t window_right, double softcap, int64_t dropout_threshold,
                  double dropout_keep_scale, int64_t dropout_seed_key) {
  AttentionProblem problem =
      describe(q, k, v, attn_mask, key_lengths, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
               scale, causal, bottom_right, window_left, window_right, softcap, dropout_threshold,
               dropout_keep_scale, dropout_seed_key);
  for (const at::Tensor* tensor : std::initializer_list<const at::Tensor*>{&grad_out, &out, &grad_q, &grad_k, &grad_v})
    TORCH_CHECK(tensor->scalar_type() == q.scalar_type(), "fusedattn cpu: gradients and out must have q's dtype");
  problem.grad_out = token_view(grad_out);
  problem.out = token_view(out);
  problem.lse = lse_view(lse);
  problem.grad_q = token_view(grad_q);
  problem.grad_k = token_view(grad_k);
  problem.grad_v = token_view(grad_v);
  select_variant().backward(problem);
}

std::string cpu_isa() { return select_variant().name; }

}  // namespace
}  // namespace fusedattn::cpu

#define FUSEDATTN_CPU_OPTIONS                                                                              \
  "Tensor? attn_mask, Tensor? key_lengths, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, " \
  "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, bool bottom_right, int window_left, "          \
  "int window_right, float softcap, int dropout_threshold, float dropout_keep_scale, int dropout_seed_key"

TORCH_LIBRARY_FRAGMENT(fusedattn_native, m) {
  m.def("cpu_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, " FUSEDATTN_CPU_OPTIONS ") -> ()");
  m.def("cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) grad_q, "
        "Tensor(b!) grad_k, Tensor(c!) grad_v, " FUSEDATTN_CPU_OPTIONS ") -> ()");
  m.def("cpu_isa() -> str", &fusedattn::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(fusedattn_native, CPU, m) {
  m.impl("cpu_forward", &fusedattn::cpu::cpu_forward);
  m.impl("cpu_backward", &fusedattn::cpu::cpu_backward);
}
