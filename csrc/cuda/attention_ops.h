// The torch side of the CUDA backend's operators, without any CUDA header: tensors in,
// AttentionParams filled, kernels launched through attention_params.h. bindings.cpp
// instantiates these bodies for CUDA tensors; the CPU emulation used by the tests
// (csrc/cuda/emulation) instantiates the same bodies for CPU tensors.
//
// Arguments were validated by python/fusedattn/validation.py; outputs are allocated by
// python/fusedattn/backends/cuda.py (through allocate_output) and written in place.
// Shapes, dtypes and devices are checked again here (they cost no synchronization), so the
// kernels can trust every size; metadata VALUES (cu_seqlens, key_lengths, max_seqlen) may be
// unchecked (torch.compile, CUDA graph capture) and are clamped, here and in the kernels,
// so that every access stays inside the tensors (docs/semantics.md, "Invalid metadata").
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../native_options.h"
#include "attention_params.h"

namespace fusedattn::cuda {
namespace detail {

inline ElementType element_type_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kHalf:
      return ElementType::Float16;
    case at::kBFloat16:
      return ElementType::BFloat16;
    case at::kFloat:
      return ElementType::Float32;
    default:
      break;
  }
  TORCH_CHECK(false, "fusedattn cuda: unsupported dtype ", tensor.scalar_type());
}

// (batch, head, row) strides of a dense (B, H, S, ...) or packed (T, H, ...) tensor.
inline RowStrides row_strides(const at::Tensor& tensor, bool varlen) {
  if (varlen) return {0, tensor.stride(1), tensor.stride(0)};
  return {tensor.stride(0), tensor.stride(1), tensor.stride(2)};
}

// lse is (B, Hq, Sq) dense and (Hq, Tq) packed.
inline RowStrides lse_strides(const at::Tensor& lse, bool varlen) {
  if (varlen) return {0, lse.stride(0), lse.stride(1)};
  return {lse.stride(0), lse.stride(1), lse.stride(2)};
}

inline at::Tensor with_contiguous_rows(const at::Tensor& tensor) {
  return tensor.size(-1) <= 1 || tensor.stride(-1) == 1 ? tensor : tensor.contiguous();
}

inline bool rows_are_vector_aligned(const at::Tensor& tensor, int64_t chunk) {
  if (reinterpret_cast<uintptr_t>(tensor.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < tensor.dim(); ++dim)
    if (tensor.size(dim) > 1 && tensor.stride(dim) % chunk != 0) return false;
  return tensor.size(-1) % chunk == 0;
}

inline void require_output(const at::Tensor& output, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(output.device() == like.device() && output.scalar_type() == dtype, "fusedattn cuda: ", name,
              " must be a ", dtype, " tensor on ", like.device());
  TORCH_CHECK(output.size(-1) <= 1 || output.stride(-1) == 1, "fusedattn cuda: ", name,
              " must be contiguous in its last dim");
}

inline void require_shape(const at::Tensor& tensor, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(tensor.sizes() == shape, "fusedattn cuda: ", name, " must have shape ", shape, ", got ",
              tensor.sizes());
}

inline void require_device(const std::optional<at::Tensor>& tensor, const at::Tensor& q, const char* name) {
  TORCH_CHECK(!tensor.has_value() || tensor->device() == q.device(), "fusedattn cuda: ", name, " must be on ",
              q.device());
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> result(sizes.begin(), sizes.end());
  result.back() = last;
  return result;
}

// lse's shape: (B, Hq, Sq) dense, (Hq, Tq) packed.
inline std::vector<int64_t> lse_shape(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}

// The shapes the kernels index by, whatever called the operator (the Python validation
// checks them too). Rows are limited to kMaxRows (2^31 - 1) so that row arithmetic fits int.
inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  const int64_t rank = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.dim() == rank, "fusedattn cuda: q, k, v must be ", rank,
              "-D tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fusedattn cuda: k, v must be on ", q.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fusedattn cuda: k, v must have q's dtype");
  // Heads are dim 1 in both layouts.
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "fusedattn cuda: k and v need the same number of heads, which divides q's");
  TORCH_CHECK(k.size(-1) == q.size(-1), "fusedattn cuda: k must have q's head dim");
  TORCH_CHECK(k.size(0) == v.size(0) && (varlen || (k.size(0) == q.size(0) && k.size(2) == v.size(2))),
              "fusedattn cuda: q, k, v must agree on the batch, and k, v on the number of keys");
  const int64_t rows_q = varlen ? q.size(0) : q.size(2);
  const int64_t rows_k = varlen ? k.size(0) : k.size(2);
  TORCH_CHECK(rows_q <= kMaxRows && rows_k <= kMaxRows, "fusedattn cuda: at most 2^31 - 1 query or key rows per ",
              varlen ? "call (packed tokens)" : "sequence");
  TORCH_CHECK(q.size(0) <= INT32_MAX && q.size(1) <= INT32_MAX, "fusedattn cuda: too many sequences or heads");
}

using Options = ::fusedattn::NativeOptions;  // csrc/native_options.h

// Fill p from q, k, v and the options. `keep_alive` holds converted tensors until the launch.
inline AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const Options& options, std::vector<at::Tensor>& keep_alive) {
  AttentionParams p;
  // Paged KV caches are not read by these kernels: the Python backend does not declare the
  // feature, so the dispatcher never sends one; a direct op call gets this error.
  TORCH_CHECK_VALUE(!options.block_table.has_value() && !options.cache_lengths.has_value(),
                    "block_table, cache_lengths: the cuda backend does not read paged KV caches");
  const bool varlen = options.cu_seqlens_q.has_value();
  check_inputs(q, k, v, varlen);
  require_device(options.attn_mask, q, "attn_mask");
  require_device(options.key_lengths, q, "key_lengths");
  require_device(options.cu_seqlens_q, q, "cu_seqlens_q");
  require_device(options.cu_seqlens_k, q, "cu_seqlens_k");
  require_device(options.alibi_slopes, q, "alibi_slopes");
  require_device(options.sinks, q, "sinks");
  p.element_type = element_type_of(q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = row_strides(q, varlen);
  p.k_strides = row_strides(k, varlen);
  p.v_strides = row_strides(v, varlen);
  p.heads_q = static_cast<int>(q.size(-2 - (varlen ? 0 : 1)));
  p.heads_kv = static_cast<int>(k.size(-2 - (varlen ? 0 : 1)));
  p.head_dim = static_cast<int>(q.size(-1));
  p.head_dim_v = static_cast<int>(v.size(-1));
  if (varlen) {
    TORCH_CHECK(options.cu_seqlens_k.has_value(), "fusedattn cuda: cu_seqlens_k must come with cu_seqlens_q");
    const at::Tensor cu_q = options.cu_seqlens_q->to(at::kInt).contiguous();
    const at::Tensor cu_k = options.cu_seqlens_k->to(at::kInt).contiguous();
    TORCH_CHECK(cu_q.dim() == 1 && cu_q.size(0) >= 1 && cu_q.size(0) - 1 <= INT32_MAX && cu_k.sizes() == cu_q.sizes(),
                "fusedattn cuda: cu_seqlens_q and cu_seqlens_k must have the same shape (N + 1,)");
    TORCH_CHECK(!options.attn_mask.has_value(), "fusedattn cuda: attn_mask is not supported with cu_seqlens");
    keep_alive.push_back(cu_q);
    keep_alive.push_back(cu_k);
    p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
    p.batch = static_cast<int>(cu_q.size(0) - 1);
    p.total_q = q.size(0);
    p.total_k = k.size(0);
    // No valid sequence is longer than the packed tokens; the bound sizes the grid only.
    p.seqlen_q = static_cast<int>(std::clamp<int64_t>(options.max_seqlen_q, 0, p.total_q));
    p.seqlen_k = static_cast<int>(std::clamp<int64_t>(options.max_seqlen_k, 0, p.total_k));
  } else {
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(2));
    p.seqlen_k = static_cast<int>(k.size(2));
  }
  if (options.key_lengths.has_value()) {
    const at::Tensor lengths = options.key_lengths->to(at::kInt).contiguous();
    TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == p.batch, "fusedattn cuda: key_lengths must have shape (",
                p.batch, ",)");
    keep_alive.push_back(lengths);
    p.key_lengths = lengths.data_ptr<int32_t>();
  }
  if (options.sinks.has_value()) {
    const at::Tensor sinks = options.sinks->to(at::kFloat).contiguous();
    TORCH_CHECK(sinks.dim() == 1 && sinks.size(0) == p.heads_q, "fusedattn cuda: sinks must have shape (Hq,)");
    keep_alive.push_back(sinks);
    p.sinks = sinks.data_ptr<float>();
  }
  p.scale = static_cast<float>(options.scale);
  p.causal = options.causal;
  p.bottom_right = options.bottom_right;
  // Validation caps the sides at kWidestWindow (fusedattn.validation.WIDEST_WINDOW).
  for (const int64_t side : {options.window_left, options.window_right})
    TORCH_CHECK(side >= -1 && side <= kWidestWindow, "fusedattn cuda: window sides must be -1 or in [0, 2**30], got ",
                side);
  p.window_left = static_cast<int>(options.window_left);
  p.window_right = static_cast<int>(options.window_right);
  // The CUDA kernels compute whole sequences (the backend does not declare sequence_block).
  TORCH_CHECK_VALUE(options.query_start == 0 && options.key_start == 0,
                    "fusedattn cuda: query_start, key_start: expected 0 (blocks of a longer sequence are not "
                    "supported by this backend), got ",
                    options.query_start, " and ", options.key_start);
  p.softcap = static_cast<float>(options.softcap);
  if (options.alibi_slopes.has_value()) {
    const at::Tensor slopes = options.alibi_slopes->to(at::kFloat);
    TORCH_CHECK((slopes.dim() == 1 && slopes.size(0) == p.heads_q) ||
                    (slopes.dim() == 2 && slopes.size(0) == p.batch && slopes.size(1) == p.heads_q),
                "fusedattn cuda: alibi_slopes must have shape (Hq,) or (B, Hq)");
    keep_alive.push_back(slopes);
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? slopes.stride(0) : 0;
    p.alibi_head_stride = slopes.stride(-1);
  }
  if (options.attn_mask.has_value()) {
    const at::Tensor& mask = *options.attn_mask;
    const std::vector<int64_t> mask_shape{p.batch, p.heads_q, p.seqlen_q, p.seqlen_k};
    TORCH_CHECK(mask.sizes() == at::IntArrayRef(mask_shape),
                "fusedattn cuda: attn_mask must arrive as a 4-D (B, Hq, Sq, Sk) view");
    p.mask_kind = mask.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    TORCH_CHECK(p.mask_kind == MaskKind::Bool || mask.scalar_type() == q.scalar_type(),
                "fusedattn cuda: an additive attn_mask must have q's dtype");
    p.mask = mask.data_ptr();
    for (int dim = 0; dim < 4; ++dim) p.mask_strides[dim] = mask.stride(dim);
  }
  TORCH_CHECK(options.dropout_threshold >= 0 && options.dropout_threshold <= (int64_t(1) << 32),
              "fusedattn cuda: dropout_threshold must be in [0, 2**32], got ", options.dropout_threshold);
  p.dropout_threshold = static_cast<uint64_t>(options.dropout_threshold);
  p.dropout_seed_key = static_cast<uint32_t>(options.dropout_seed_key & 0xFFFFFFFF);
  p.dropout_keep_scale = static_cast<float>(options.dropout_keep_scale);
  return p;
}

// q, k, v with contiguous rows and the parameters every launch shares.
struct PreparedCall {
  at::Tensor q, k, v;
  bool varlen;
  std::vector<at::Tensor> keep_alive;  // converted option tensors, alive until the launch
  AttentionParams params;

  PreparedCall(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const Options& options)
      : q(with_contiguous_rows(q_in)),
        k(with_contiguous_rows(k_in)),
        v(with_contiguous_rows(v_in)),
        varlen(options.cu_seqlens_q.has_value()) {
    params = make_params(q, k, v, options, keep_alive);
    const int64_t chunk = 16 / q.element_size();
    params.vector_loads =
        rows_are_vector_aligned(q, chunk) && rows_are_vector_aligned(k, chunk) && rows_are_vector_aligned(v, chunk);
  }
};

}  // namespace detail

// The operator bodies, for a Device policy: Device::check(q) rejects other devices,
// Device::guard(q) makes q's device current for the scope, Device::stream() is the
// stream to launch on, Device::multiprocessors(q) the SM count the split-KV choice fills
// (bindings.cpp: CUDA; the CPU emulation of the tests: none, and a fixed count).
template <typename Device>
void attention_forward_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& out,
                          at::Tensor& lse FUSEDATTN_OPTION_PARAMETERS) {
  Device::check(q_in);
  [[maybe_unused]] const auto device_guard = Device::guard(q_in);
  FUSEDATTN_COLLECT_OPTIONS();
  detail::PreparedCall call(q_in, k_in, v_in, options);
  detail::require_output(out, call.q, call.q.scalar_type(), "out");
  detail::require_output(lse, call.q, at::kFloat, "lse");
  detail::require_shape(out, detail::with_last(call.q.sizes(), call.v.size(-1)), "out");
  detail::require_shape(lse, detail::lse_shape(call.q, call.varlen), "lse");
  AttentionParams& p = call.params;
  p.out = out.data_ptr();
  p.out_strides = detail::row_strides(out, call.varlen);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = detail::lse_strides(lse, call.varlen);
  // Split-KV (attention_params.h, forward_split_count): float partials for the combine.
  at::Tensor split_out, split_stats;
  p.num_splits = forward_split_count(p, Device::multiprocessors(call.q));
  if (p.num_splits > 1) {
    p.split_rows = int64_t{p.heads_q} * (call.varlen ? p.total_q : int64_t{p.batch} * p.seqlen_q);
    const auto float_options = call.q.options().dtype(at::kFloat);
    split_out = at::empty({p.num_splits, p.split_rows, p.head_dim_v}, float_options);
    split_stats = at::empty({p.num_splits, p.split_rows, 2}, float_options);
    p.split_out = split_out.data_ptr<float>();
    p.split_stats = split_stats.data_ptr<float>();
  }
  const char* error = attention_forward(p, Device::stream());
  TORCH_CHECK(error == nullptr, "fusedattn cuda forward: ", error);
}

template <typename Device>
void attention_backward_op(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                           const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                           at::Tensor& dk, at::Tensor& dv FUSEDATTN_OPTION_PARAMETERS) {
  using namespace detail;
  Device::check(q_in);
  [[maybe_unused]] const auto device_guard = Device::guard(q_in);
  FUSEDATTN_COLLECT_OPTIONS();
  PreparedCall call(q_in, k_in, v_in, options);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in);
  const at::Tensor& q = call.q;
  const bool varlen = call.varlen;
  require_output(dq, q, q.scalar_type(), "dq");
  require_output(dk, q, q.scalar_type(), "dk");
  require_output(dv, q, q.scalar_type(), "dv");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(),
              "fusedattn cuda: lse must be float32 on ", q.device());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type() &&
                  out.device() == q.device() && grad_out.device() == q.device(),
              "fusedattn cuda: out and grad_out must be ", q.scalar_type(), " tensors on ", q.device());
  const std::vector<int64_t> out_shape = with_last(q.sizes(), call.v.size(-1));
  require_shape(out, out_shape, "out");
  require_shape(grad_out, out_shape, "grad_out");
  require_shape(lse, lse_shape(q, varlen), "lse");
  require_shape(dq, q.sizes(), "dq");
  require_shape(dk, call.k.sizes(), "dk");
  require_shape(dv, call.v.sizes(), "dv");
  AttentionBackwardParams bp;
  bp.forward = call.params;
  const at::Tensor out_rows = with_contiguous_rows(out);  // read by the delta kernel
  bp.forward.out = const_cast<void*>(out_rows.data_ptr());
  bp.forward.out_strides = row_strides(out_rows, varlen);
  bp.forward.lse = const_cast<float*>(lse.data_ptr<float>());
  bp.forward.lse_strides = lse_strides(lse, varlen);
  bp.forward.vector_loads = call.params.vector_loads && rows_are_vector_aligned(grad_out, 16 / q.element_size());

  // delta_i = sum_c dO_ic out_ic in float32, (B, Hq, Sq) dense, (Tq, Hq) packed: written for
  // every row of out by the launch's first kernel (attention_backward_delta_kernel). delta and
  // dq_accum are sized by the tensors, never by metadata (the kernels index them by rows
  // inside the clamped sequences).
  const at::Tensor delta = at::empty(with_last(out.sizes(), 1), q.options().dtype(at::kFloat)).squeeze(-1);
  const at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  bp.grad_out = grad_out.data_ptr();
  bp.grad_out_strides = row_strides(grad_out, varlen);
  bp.delta = delta.data_ptr<float>();
  bp.delta_strides = varlen ? RowStrides{0, delta.stride(1), delta.stride(0)}
                            : RowStrides{delta.stride(0), delta.stride(1), delta.stride(2)};
  bp.dq_accum = dq_accum.data_ptr<float>();
  bp.dq_accum_strides = row_strides(dq_accum, varlen);
  bp.dk = dk.data_ptr();
  bp.dk_strides = row_strides(dk, varlen);
  bp.dv = dv.data_ptr();
  bp.dv_strides = row_strides(dv, varlen);
  // GQA: float dK, dV per query head, summed over each group by the kernels
  // (attention_backward.cuh). Sized by the tensors, like dq_accum.
  at::Tensor dk_partial, dv_partial;
  if (bp.forward.heads_q != bp.forward.heads_kv) {
    const int64_t columns = std::max(q.size(-1), call.v.size(-1));
    std::vector<int64_t> shape = varlen ? std::vector<int64_t>{call.k.size(0), q.size(1), columns}
                                        : std::vector<int64_t>{q.size(0), q.size(1), call.k.size(2), columns};
    dk_partial = at::empty(shape, q.options().dtype(at::kFloat));
    dv_partial = at::empty(shape, q.options().dtype(at::kFloat));
    bp.dk_partial = dk_partial.data_ptr<float>();
    bp.dv_partial = dv_partial.data_ptr<float>();
    bp.partial_strides = row_strides(dk_partial, varlen);
  }
  const char* error = attention_backward(bp, Device::stream());
  TORCH_CHECK(error == nullptr, "fusedattn cuda backward: ", error);
  dq.copy_(dq_accum);
}

}  // namespace fusedattn::cuda
