// Zen 4 port costs of AVX-512 instructions, alone and beside a stream of vdpbf16ps (8 independent chains each),
// one thread's CPU time at an assumed 3.6 GHz (the dependent vaddps chain of calibration measured 3.56-3.63 GHz).
// Build: g++ -O2 -march=native port_costs.cpp -o /tmp/port_costs
#include <immintrin.h>
#include <cstdio>
#include <time.h>
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
#define CH8(OP, A) A##0 = OP(A##0); A##1 = OP(A##1); A##2 = OP(A##2); A##3 = OP(A##3); A##4 = OP(A##4); A##5 = OP(A##5); A##6 = OP(A##6); A##7 = OP(A##7);
__attribute__((noinline)) void run(long n) {
  __m512 a0 = _mm512_set1_ps(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80);
  __m512 y = _mm512_set1_ps(1e-9f);
  __m512i b0 = _mm512_set1_epi8(3), b1 = b0, b2 = b0, b3 = b0, b4 = b0, b5 = b0, b6 = b0, b7 = b0;
  __m512i t0 = _mm512_set1_epi8(1), t1 = _mm512_set1_epi8(2);
  double t;
#define T(NAME, BODY, A) t = now(); for (long i = 0; i < n; ++i) { BODY; asm volatile("" : "+v"(A##0),"+v"(A##1),"+v"(A##2),"+v"(A##3),"+v"(A##4),"+v"(A##5),"+v"(A##6),"+v"(A##7)); } printf("%-28s %.2f cycles each @3.6GHz\n", NAME, (now() - t) / n / 8 * 3.6);
#define DP(s) _mm512_dpbf16_ps(s, x, x)
#define FMA(s) _mm512_fmadd_ps(s, y, y)
#define ADD(s) _mm512_add_ps(s, y)
#define PERMB(s) _mm512_permutex2var_epi8(t0, s, t1)
#define PERMW(s) _mm512_permutex2var_epi16(t0, s, t1)
#define SXBW(s) _mm512_cvtepi8_epi16(_mm512_castsi512_si256(s))
#define SXBD(s) _mm512_cvtepi8_epi32(_mm512_castsi512_si128(s))
#define CVTDQ(s) _mm512_castps_si512(_mm512_cvtepi32_ps(s))
#define CVTBF(s) _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(s, y))
#define UNPK(s) _mm512_unpacklo_epi16(s, t0)
#define SHUF(s) _mm512_shuffle_f32x4(s, y, 0x4e)
#define PERMPS(s) _mm512_permutex2var_ps(s, _mm512_castps_si512(y), y)
#define TERN(s) _mm512_ternarylogic_epi32(s, t0, t1, 0xf8)
#define BCAST(s) _mm512_add_epi32(s, _mm512_set1_epi32(((int*)&i)[0]))

#define MIX(NAME, OP, B) t = now(); for (long i = 0; i < n; ++i) { CH8(DP, a); CH8(OP, B); asm volatile("" : "+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7)); asm volatile("" : "+v"(B##0),"+v"(B##1),"+v"(B##2),"+v"(B##3),"+v"(B##4),"+v"(B##5),"+v"(B##6),"+v"(B##7)); } printf("8 dp + 8 %-20s %.2f cycles per pair\n", NAME, (now() - t) / n / 8 * 3.6);
  __m512 c0 = y, c1 = y, c2 = y, c3 = y, c4 = y, c5 = y, c6 = y, c7 = y;
  T("vdpbf16ps", CH8(DP, a), a)
  MIX("vaddps", ADD, c) MIX("vfmadd", FMA, c) MIX("vpermi2b", PERMB, b) MIX("vpermi2w", PERMW, b) MIX("vpmovsxbw", SXBW, b) MIX("vpmovsxbd", SXBD, b)
  MIX("vcvtdq2ps", CVTDQ, b) MIX("vcvtne2ps2bf16", CVTBF, c) MIX("vpunpcklwd", UNPK, b) MIX("vshuff32x4", SHUF, c) MIX("vpermt2ps", PERMPS, c) MIX("vpternlogd", TERN, b)

  __m256i h0 = _mm256_set1_epi8(3), h1 = h0, h2 = h0, h3 = h0, h4 = h0, h5 = h0, h6 = h0, h7 = h0;
  __m256i ht0 = _mm256_set1_epi8(1), ht1 = _mm256_set1_epi8(2);
  __m256 hy = _mm256_set1_ps(1e-9f);
#define PSHUFB(s) _mm512_shuffle_epi8(s, t0)
#define PSRAD(s) _mm512_srai_epi32(s, 24)
#define PSRLD(s) _mm512_srli_epi32(s, 16)
#define SUBUS(s) _mm512_subs_epu16(s, t0)
#define VPERMB1(s) _mm512_permutexvar_epi8(s, t0)
#define YSXBD(s) _mm256_cvtepi8_epi32(_mm256_castsi256_si128(s))
#define YSXBW(s) _mm256_cvtepi8_epi16(_mm256_castsi256_si128(s))
#define YPERMB(s) _mm256_permutex2var_epi8(ht0, s, ht1)
#define YPERMW(s) _mm256_permutex2var_epi16(ht0, s, ht1)
#define YCVTBF(s) (__m256i)_mm256_cvtne2ps_pbh((__m256)s, hy)
#define CVT_TERN(s) _mm512_ternarylogic_epi32(CVTDQ(s), t0, t1, 0xf8)
#define BLENDW(s) _mm512_mask_blend_epi16(0xAAAAAAAA, s, t0)
#define ANDD(s) _mm512_and_si512(s, t0)
  MIX("vpshufb", PSHUFB, b) MIX("vpsrad", PSRAD, b) MIX("vpsrld", PSRLD, b) MIX("vpsubusw", SUBUS, b) MIX("vpblendmw", BLENDW, b) MIX("vpandd", ANDD, b)
  MIX("vpermb", VPERMB1, b) MIX("cvtdq2ps+ternlog", CVT_TERN, b)
  MIX("ymm vpmovsxbd", YSXBD, h) MIX("ymm vpmovsxbw", YSXBW, h) MIX("ymm vpermi2b", YPERMB, h) MIX("ymm vpermi2w", YPERMW, h) MIX("ymm cvtne2ps2bf16", YCVTBF, h)
  T("pshufb alone", CH8(PSHUFB, b), b) T("psrad alone", CH8(PSRAD, b), b) T("ymm pmovsxbd alone", CH8(YSXBD, h), h) T("ymm vpermi2b alone", CH8(YPERMB, h), h)
}
int main() { run(20000000); }
