// One decode step (B1, 32 query heads over 8 KV heads, Sq 1, D 128, bf16 queries; bf16, int8 and float8_e4m3fn caches
// with per-token scales) through the avx512bf16 variant's forward, no Python: one thread's CPU time per key per KV head.
// Build from the repository root: g++ -O3 -ffp-contract=fast -fno-math-errno -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp -std=c++17 -Icsrc benchmarks/results/cpu-2026-12-06-issue18/decode_step_kernel_only.cpp -o /tmp/step
// Run: OMP_NUM_THREADS=1 /tmp/step SK   (KIND=0/1/2: only bf16/int8/e4m3)
#define FUSEDATTN_ISA_NAMESPACE avx512bf16
#define FUSEDATTN_ISA_NAME "avx512bf16"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"
#include <cstdio>
#include <time.h>
#include <random>
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
using namespace fusedattn::cpu;
int main(int argc, char** argv) {
  const int64_t sk = argc > 1 ? atoll(argv[1]) : 4096, hq = 32, hkv = 8, d = 128;
  std::vector<uint16_t> q(hq * d), out(hq * d), kb(hkv * sk * d), vb(hkv * sk * d);
  std::vector<int8_t> k8(hkv * sk * d), v8(hkv * sk * d);
  std::vector<float> lse(hq); std::vector<float> ks(hkv * sk, 0.02f), vs(hkv * sk, 0.02f);
  std::mt19937 rng(0);
  for (auto& x : q) x = 0x3f00 + rng() % 256;
  for (size_t i = 0; i < k8.size(); ++i) { k8[i] = int8_t(rng()); v8[i] = int8_t(rng()); kb[i] = 0x3c00 + rng() % 1024; vb[i] = 0x3c00 + rng() % 1024; }
  for (int kind = (getenv("KIND") ? atoi(getenv("KIND")) : 0); kind < (getenv("KIND") ? atoi(getenv("KIND")) + 1 : 3); ++kind) {
    AttentionProblem p;
    p.element_type = ElementType::bfloat16; p.batch = 1; p.heads_q = hq; p.heads_kv = hkv; p.head_dim = d; p.head_dim_v = d;
    p.seqlen_q = 1; p.seqlen_k = sk; p.scale = 0.088f; p.num_threads = 1;
    p.q = {q.data(), hq * d, d, d, 1}; p.out = {out.data(), hq * d, d, d, 1}; p.lse = {lse.data(), hq, 1, 1, 1};
    const bool eight = kind > 0;
    p.kv_type = kind == 0 ? KeyValueType::like_queries : kind == 1 ? KeyValueType::int8 : KeyValueType::float8_e4m3;
    void* kd = eight ? (void*)k8.data() : (void*)kb.data();
    void* vd = eight ? (void*)v8.data() : (void*)vb.data();
    p.k = {kd, hkv * sk * d, sk * d, d, 1}; p.v = {vd, hkv * sk * d, sk * d, d, 1};
    if (eight) { p.k_descale = {ks.data(), hkv * sk, sk, 1, 0}; p.v_descale = {vs.data(), hkv * sk, sk, 1, 0}; }
    const int reps = std::max<int64_t>(5, 400000000 / (hkv * sk * d * 2 * (eight ? 1 : 2)));
    for (int i = 0; i < 3; ++i) avx512bf16::kVariant.forward(p);
    double best = 1e30;
    for (int round = 0; round < 5; ++round) {
      double t = now();
      for (int i = 0; i < reps; ++i) avx512bf16::kVariant.forward(p);
      best = std::min(best, (now() - t) / reps);
    }
    const double bytes = hkv * sk * d * 2.0 * (eight ? 1 : 2);
    std::printf("%s sk %ld: %.3f ms, %.1f GB/s, %.1f ns = %.0f cycles@3.5 per key per KV head\n",
                kind == 0 ? "bf16" : kind == 1 ? "int8" : "e4m3", (long)sk, best * 1e-6, bytes / best, best / (hkv * sk), best / (hkv * sk) * 3.5);
  }
}
