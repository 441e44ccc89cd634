// The option arguments of every native attention operator (cpu_forward / cpu_backward and
// cuda_attention_forward / cuda_attention_backward), written once.
//
// The list is an X-macro: FUSEDATTN_NATIVE_OPTIONS(X) calls X(parameter type, name, schema
// type) per option, in the one order of every schema. From it come the operators' C++
// parameters (FUSEDATTN_OPTION_PARAMETERS), their schema text (FUSEDATTN_OPTIONS_SCHEMA)
// and the NativeOptions struct the operator bodies read (FUSEDATTN_COLLECT_OPTIONS). The
// Python side passes them from fusedattn.ops.native_option_values, in the order of
// fusedattn.ops.NATIVE_OPTIONS; tests/test_ops.py compares that tuple with the schema.
//
// The values arrive validated (python/fusedattn/validation.py): window sides are -1 or in
// [0, 2**30], dropout as the integers the kernels hash with (semantics.dropout_threshold,
// dropout_keep_scale, dropout_seed_key). The operators only refuse values outside those
// ranges; they never re-derive or clamp them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#define FUSEDATTN_NATIVE_OPTIONS(X)                           \
  X(const std::optional<at::Tensor>&, attn_mask, "Tensor?")    \
  X(const std::optional<at::Tensor>&, key_lengths, "Tensor?")  \
  X(const std::optional<at::Tensor>&, cu_seqlens_q, "Tensor?") \
  X(const std::optional<at::Tensor>&, cu_seqlens_k, "Tensor?") \
  X(const std::optional<at::Tensor>&, alibi_slopes, "Tensor?") \
  X(const std::optional<at::Tensor>&, sinks, "Tensor?")        \
  X(const std::optional<at::Tensor>&, block_table, "Tensor?")  \
  X(const std::optional<at::Tensor>&, cache_lengths, "Tensor?") \
  X(int64_t, max_seqlen_q, "int")                              \
  X(int64_t, max_seqlen_k, "int")                              \
  X(double, scale, "float")                                    \
  X(bool, causal, "bool")                                      \
  X(bool, bottom_right, "bool")                                \
  X(int64_t, window_left, "int")                               \
  X(int64_t, window_right, "int")                              \
  X(int64_t, query_start, "int")                               \
  X(int64_t, key_start, "int")                                 \
  X(const std::optional<at::Tensor>&, k_descale, "Tensor?")    \
  X(const std::optional<at::Tensor>&, v_descale, "Tensor?")    \
  X(double, softcap, "float")                                  \
  X(int64_t, dropout_threshold, "int")                         \
  X(double, dropout_keep_scale, "float")                       \
  X(int64_t, dropout_seed_key, "int")

// ", type name" per option: follows the operator's tensor parameters.
#define FUSEDATTN_OPTION_PARAMETER(type, name, schema) , type name
#define FUSEDATTN_OPTION_PARAMETERS FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_PARAMETER)

// ", schema name" per option: follows the tensor part of the schema string.
#define FUSEDATTN_OPTION_SCHEMA(type, name, schema) ", " schema " " #name
#define FUSEDATTN_OPTIONS_SCHEMA FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_SCHEMA)

namespace fusedattn {

// Widest window side that means something (validation.WIDEST_WINDOW): wider hides nothing.
constexpr int64_t kWidestWindow = int64_t(1) << 30;

struct NativeOptions {
#define FUSEDATTN_OPTION_FIELD(type, name, schema) std::decay_t<type> name;
  FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_FIELD)
#undef FUSEDATTN_OPTION_FIELD
};

}  // namespace fusedattn

// Inside an operator taking FUSEDATTN_OPTION_PARAMETERS: a NativeOptions named `options`.
#define FUSEDATTN_OPTION_ASSIGN(type, name, schema) options.name = name;
#define FUSEDATTN_COLLECT_OPTIONS()    \
  ::fusedattn::NativeOptions options; \
  FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_ASSIGN)

// The fields of a NativeOptions as local references named like the options.
#define FUSEDATTN_OPTION_LOCAL(type, name, schema) [[maybe_unused]] const auto& name = unpacked_options.name;
#define FUSEDATTN_UNPACK_OPTIONS(source)                 \
  const ::fusedattn::NativeOptions& unpacked_options = source; \
  FUSEDATTN_NATIVE_OPTIONS(FUSEDATTN_OPTION_LOCAL)
