// Micro-benchmark of the 8-bit decode kernel's pieces from L1, one thread's CPU time (CLOCK_THREAD_CPUTIME_ID):
// scores (4 query rows x 64 keys, D 128) and P.V (4 rows x 64 keys, Dv 128) of decode_step.inc, per key per KV head.
// Build from the repository root: g++ -O3 -ffp-contract=fast -fno-math-errno -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp -std=c++17 -Icsrc cpu-2026-12-06-issue18/kernel_pieces.cpp -o /tmp/kernel_pieces
#define FUSEDATTN_ISA_NAMESPACE avx512bf16
#define FUSEDATTN_ISA_NAME "avx512bf16"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"
#include <chrono>
#include <cstdio>
#include <time.h>
struct clk { using time_point = std::chrono::duration<double, std::nano>; static time_point now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return time_point(t.tv_sec * 1e9 + t.tv_nsec); } };
namespace fusedattn::cpu::avx512bf16 { namespace {
template <typename F> double per_key_ns(F f, int keys, int reps = 20000) {
  for (int i = 0; i < 200; ++i) f();
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    auto t0 = clk::now();
    for (int i = 0; i < reps; ++i) f();
    double ns = std::chrono::duration<double, std::nano>(clk::now() - t0).count() / reps / keys;
    best = std::min(best, ns);
  }
  return best;
}
template <typename Storage, KeyPairing P> void run(const char* name) {
  constexpr int K = 64, D = 128;
  alignas(64) static Storage kdata[K * D], vdata[K * D], zero[D];
  for (int i = 0; i < K * D; ++i) { kdata[i] = Storage((i * 37) % 100); vdata[i] = Storage((i * 11) % 90); }
  for (int i = 0; i < D; ++i) zero[i] = 0;
  const Storage* krows[K]; const Storage* vrows[K];
  for (int j = 0; j < K; ++j) { krows[j] = kdata + j * D; vrows[j] = vdata + j * D; }
  alignas(64) static uint16_t queries[4 * 2 * D];  // unpacked_bytes: 2 values per head-dim value
  for (int i = 0; i < 4 * 2 * D; ++i) queries[i] = 0x3f80;
  alignas(64) static float scores[4 * K], acc[4 * D], probs[4 * K];
  alignas(64) static uint32_t pairs[4 * K / 2];
  for (int i = 0; i < 4 * K; ++i) probs[i] = 0.01f;
  double s = per_key_ns([&] { converted_decode_scores<Storage, P>(4, K, D, queries, 2 * D, krows, zero, 0.1f, probs, scores, K); asm volatile("" ::: "memory"); }, K);
  double v = per_key_ns([&] { converted_values<Storage, P>(4, K, D, pairs, K / 2, vrows, zero, acc, D); asm volatile("" ::: "memory"); }, K);
  std::printf("%-14s scores %.2f ns (%.0f cycles at 3.5 GHz)  P.V %.2f ns (%.0f cycles) per key per KV head\n", name, s, s * 3.5, v, v * 3.5);
}
void all() { run<int8_t, KeyPairing::split_halves>("int8 split"); run<int8_t, KeyPairing::unpacked_bytes>("int8 tables"); run<uint8_t, KeyPairing::in_order>("e4m3 in order"); run<uint8_t, KeyPairing::unpacked_bytes>("e4m3 tables"); }
}}
int main() { fusedattn::cpu::avx512bf16::all(); }
