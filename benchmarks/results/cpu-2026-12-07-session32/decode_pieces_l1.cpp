// L1-resident micro-benchmark of the CPU decode kernels' pieces (session 32): one thread's CPU time per key per KV head,
// 64 keys, D 128, rows 1, 2, 4 (query rows per KV head): 8-bit caches (scores and P.V, byte tables), the bf16
// cache (scores, P.V at 4 rows) and the fp32 cache (scores). Build from the repository root:
// g++ -O3 -ffp-contract=fast -fno-math-errno -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp -std=c++17 -Icsrc FILE -o /tmp/x
#define FUSEDATTN_ISA_NAMESPACE avx512bf16
#define FUSEDATTN_ISA_NAME "avx512bf16"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"
#include <chrono>
#include <cstdio>
#include <time.h>
static double now_ns() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
namespace fusedattn::cpu::avx512bf16 { namespace {
template <typename F> double per_key_ns(F f, int keys, int reps = 8000) {
  for (int i = 0; i < 200; ++i) f();
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    double t0 = now_ns();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, (now_ns() - t0) / reps / keys);
  }
  return best;
}
template <typename Storage, KeyPairing P> void run(const char* name) {
  constexpr int K = 64, D = 128; static volatile int64_t dim_v = D; const int64_t dim = dim_v;
  alignas(64) static Storage kdata[K * D], vdata[K * D], zero[D];
  for (int i = 0; i < K * D; ++i) { kdata[i] = Storage((i * 37) % 100); vdata[i] = Storage((i * 11) % 90); }
  for (int i = 0; i < D; ++i) zero[i] = 0;
  const Storage* krows[K]; const Storage* vrows[K];
  for (int j = 0; j < K; ++j) { krows[j] = kdata + j * D; vrows[j] = vdata + j * D; }
  alignas(64) static uint16_t queries[4 * 2 * D];
  for (int i = 0; i < 4 * 2 * D; ++i) queries[i] = 0x3f80 + (i % 7);
  alignas(64) static float scores[4 * K], acc[4 * D], probs[4 * K];
  alignas(64) static uint32_t pairs[4 * K / 2];
  for (int i = 0; i < 4 * K; ++i) probs[i] = 0.01f;
  for (int rows : {1, 2, 4}) {
  double s = per_key_ns([&] { converted_decode_scores<Storage, P>(rows, K, dim, queries, 2 * D, krows, zero, vrows, D, nullptr, 0.1f, probs, scores, K); asm volatile("" ::: "memory"); }, K);
  double v = per_key_ns([&] { converted_values<Storage, P>(rows, K, dim, pairs, K / 2, vrows, zero, acc, D); asm volatile("" ::: "memory"); }, K);
  double check = 0; for (int i = 0; i < 4 * K; ++i) check += scores[i];
  std::printf("rows %d %-14s scores %.2f ns (%.0f cyc@3.5)  P.V %.2f ns (%.0f cyc)  check %.6g\n", rows, name, s, s * 3.5, v, v * 3.5, check); }
}
void bfloat16_cache() {
  constexpr int K = 64, D = 128; static volatile int64_t dim_v = D; const int64_t dim = dim_v;
  alignas(64) static uint16_t kdata[K * D], vdata[K * D], zero[D];
  for (int i = 0; i < K * D; ++i) { kdata[i] = 0x3f80 + (i * 37) % 100; vdata[i] = 0x3f80 + (i * 11) % 90; }
  for (int i = 0; i < D; ++i) zero[i] = 0;
  const uint16_t* krows[K]; const uint16_t* vrows[K];
  for (int j = 0; j < K; ++j) { krows[j] = kdata + j * D; vrows[j] = vdata + j * D; }
  alignas(64) static uint16_t queries[4 * D];
  for (int i = 0; i < 4 * D; ++i) queries[i] = 0x3f80 + (i % 7);
  alignas(64) static float scores[4 * K], acc[4 * D];
  alignas(64) static uint32_t pairs[4 * K / 2];
  for (int i = 0; i < 4 * K / 2; ++i) pairs[i] = 0x3c003c00;
  for (int rows : {1, 2, 4}) {
    double s = per_key_ns([&] { decode_scores_bfloat16_pairs(rows, K, dim, queries, D, krows, zero, 0.1f, scores, K, vrows, D * 2); asm volatile("" ::: "memory"); }, K);
    double v = per_key_ns([&] { for (int r0 = 0; r0 < rows; r0 += 4) decode_values_bfloat16_pairs_tile<uint16_t, 4>(K, pairs, K / 2, vrows, 0, zero, acc, D), decode_values_bfloat16_pairs_tile<uint16_t, 4>(K, pairs, K / 2, vrows, 64, zero, acc + 64, D); asm volatile("" ::: "memory"); }, K);
    double check = 0; for (int i = 0; i < rows * K; ++i) check += scores[i];
    std::printf("rows %d bf16 scores %.2f ns (%.0f cyc@3.5)  P.V(4 rows) %.2f ns  check %.6g\n", rows, s, s * 3.5, v, check);
  }
}
void float32_cache() {
  constexpr int K = 64, D = 128; static volatile int64_t dim_v = D; const int64_t dim = dim_v;
  alignas(64) static float kdata[K * D], vdata[K * D], zero[D];
  for (int i = 0; i < K * D; ++i) { kdata[i] = (i * 37) % 100 * 0.01f; vdata[i] = (i * 11) % 90 * 0.01f; }
  for (int i = 0; i < D; ++i) zero[i] = 0;
  const float* krows[K]; const float* vrows[K];
  for (int j = 0; j < K; ++j) { krows[j] = kdata + j * D; vrows[j] = vdata + j * D; }
  alignas(64) static float queries[4 * D];
  for (int i = 0; i < 4 * D; ++i) queries[i] = (i % 7) * 0.1f;
  alignas(64) static float scores[4 * K];
  for (int rows : {1, 2, 4}) {
    double s = per_key_ns([&] { decode_scores<Float32>(rows, K, dim, queries, D, krows, zero, scores, K, vrows, D * 4); asm volatile("" ::: "memory"); }, K);
    double check = 0; for (int i = 0; i < rows * K; ++i) check += scores[i] * (i % 5);
    std::printf("rows %d fp32 scores %.2f ns (%.0f cyc@3.5)  check %.9g\n", rows, s, s * 3.5, check);
  }
}
void all() {
  run<int8_t, KeyPairing::unpacked_bytes>("int8 tables");
  run<uint8_t, KeyPairing::unpacked_bytes>("e4m3 tables");
  bfloat16_cache();
  float32_cache();
}
}}
int main() { fusedattn::cpu::avx512bf16::all(); }
