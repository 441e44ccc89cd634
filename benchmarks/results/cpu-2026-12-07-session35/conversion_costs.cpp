#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
static inline __m512i pb(__m512i index, __m512i lo, __m512i hi) {
  asm("vpermi2b %[high], %[low], %[index]" : [index] "+v"(index) : [low] "v"(lo), [high] "v"(hi)); return index; }
static inline __m512i pbz(__m512i index, __m512i lo, __m512i hi, __mmask64 k) {
  asm("vpermi2b %[high], %[low], %[index]%{%[keep]%}%{z%}" : [index] "+v"(index) : [low] "v"(lo), [high] "v"(hi), [keep] "Yk"(k)); return index; }
alignas(64) uint8_t mem[1<<16];
template <int Mode>
double run(long M) {
  __m512 acc[16]; for (int i=0;i<16;i++) acc[i]=_mm512_setzero_ps();
  __m512i t0=_mm512_set1_epi8(1), t1=_mm512_set1_epi8(2), t2=_mm512_set1_epi8(3), t3=_mm512_set1_epi8(4);
  __m512bh q[8]; for(int i=0;i<8;i++) q[i]=(__m512bh)_mm512_set1_epi16(0x3f80+i);
  const __m512i sign=_mm512_set1_epi8((char)0x80);
  auto s=std::chrono::steady_clock::now();
  for (long it=0; it<M; ++it) {
    const uint8_t* p = mem + ((it*256) & 0xffff);
    #pragma GCC unroll 4
    for (int pr=0; pr<4; ++pr) {
      __m512i bytes=_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p+64*pr))), _mm256_loadu_si256((const __m256i*)(p+64*pr+32)),1);
      __m512i k0, k1;
      if constexpr (Mode==0) { // int8 current
        __m512i m=_mm512_abs_epi8(bytes);
        __m512i lo=pb(m,t0,t1); __m512i hi=pbz(m,t2,t3,_mm512_test_epi8_mask(bytes,bytes));
        hi=_mm512_ternarylogic_epi32(hi,bytes,sign,0xf8);
        k0=_mm512_unpacklo_epi8(lo,hi); k1=_mm512_unpackhi_epi8(lo,hi);
      } else if constexpr (Mode==1) { // float8
        __m512i lo=pb(bytes,t0,t1); __m512i hi=pb(bytes,t2,t3);
        hi=_mm512_ternarylogic_epi32(hi,bytes,sign,0xf8);
        k0=_mm512_unpacklo_epi8(lo,hi); k1=_mm512_unpackhi_epi8(lo,hi);
      } else if constexpr (Mode==4) { // int8 via gf2p8affine one's complement (+0.5 bias)
        __m512i m=_mm512_gf2p8affine_epi64_epi8(bytes,_mm512_set1_epi64(0x8182848890A0C080ll),0);
        __m512i lo=pb(m,t0,t1); __m512i hi=pb(m,t2,t3);
        hi=_mm512_ternarylogic_epi32(hi,bytes,sign,0xf8);
        k0=_mm512_unpacklo_epi8(lo,hi); k1=_mm512_unpackhi_epi8(lo,hi);
      } else if constexpr (Mode==5) { // min(x, ~x)
        __m512i m=_mm512_min_epu8(bytes,_mm512_xor_si512(bytes,_mm512_set1_epi8(-1)));
        __m512i lo=pb(m,t0,t1); __m512i hi=pb(m,t2,t3);
        hi=_mm512_ternarylogic_epi32(hi,bytes,sign,0xf8);
        k0=_mm512_unpacklo_epi8(lo,hi); k1=_mm512_unpackhi_epi8(lo,hi);
      } else if constexpr (Mode==6) { // abs only (timing)
        __m512i m=_mm512_abs_epi8(bytes);
        __m512i lo=pb(m,t0,t1); __m512i hi=pb(m,t2,t3);
        hi=_mm512_ternarylogic_epi32(hi,bytes,sign,0xf8);
        k0=_mm512_unpacklo_epi8(lo,hi); k1=_mm512_unpackhi_epi8(lo,hi);
      } else if constexpr (Mode==2) { // dots only
        k0=bytes; k1=bytes;
      } else if constexpr (Mode==3) { // int8 via 16-bit words: sign-extend bytes to words then ... (cost probe: 2 vpmovsxbw)
        k0=_mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes)); k1=_mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes,1));
      }
      #pragma GCC unroll 4
      for (int r=0;r<4;r++) { acc[4*pr+r]=_mm512_dpbf16_ps(acc[4*pr+r], q[2*r], (__m512bh)k0); acc[4*pr+r]=_mm512_dpbf16_ps(acc[4*pr+r], q[2*r+1], (__m512bh)k1); }
    }
  }
  auto e=std::chrono::steady_clock::now();
  float sum=0; for(int i=0;i<16;i++) sum+=_mm512_reduce_add_ps(acc[i]);
  if (sum==1234.5f) printf("x");
  return std::chrono::duration<double,std::nano>(e-s).count()/(M*4.0) * 3.65; // cycles per pair-chunk
}
int main(){ long M=5000000;
 for(int rep=0;rep<2;rep++){
 printf("int8 cur %.2f  float8 %.2f  dots %.2f  sxbw %.2f gfni %.2f min %.2f abs %.2f\n", run<0>(M), run<1>(M), run<2>(M), run<3>(M), run<4>(M), run<5>(M), run<6>(M)); }
}
