// L1-resident micro-benchmark of the CPU decode kernels' pieces (session 32): one thread's CPU time per key per KV head,
// 64 keys, D 128, rows 1, 2, 4 (query rows per KV head). Build from the repository root:
// g++ -O3 -ffp-contract=fast -fno-math-errno -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp -std=c++17 -Icsrc FILE -o /tmp/x
#define FUSEDATTN_ISA_NAMESPACE avx512bf16
#define FUSEDATTN_ISA_NAME "avx512bf16"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"
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
void all() {
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
}}
int main() { fusedattn::cpu::avx512bf16::all(); }
