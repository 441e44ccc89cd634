#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main(){
  const long N=200000000;
  auto t0=std::chrono::steady_clock::now();
  long x=0; for(long i=0;i<N;i++){ asm volatile("add $1, %0" : "+r"(x)); }
  auto t1=std::chrono::steady_clock::now();
  double ns=std::chrono::duration<double,std::nano>(t1-t0).count()/N;
  printf("clock ~ %.2f GHz (1-cycle add chain, loop overhead overlapped)\n", 1/ns);
  __m512 a[12]; for(int i=0;i<12;i++) a[i]=_mm512_set1_ps(i);
  __m512bh q=(__m512bh)_mm512_set1_epi16(0x3f80), k=(__m512bh)_mm512_set1_epi16(0x3f80);
  const long M=20000000;
  t0=std::chrono::steady_clock::now();
  for(long i=0;i<M;i++){ _Pragma("GCC unroll 12") for(int j=0;j<12;j++) a[j]=_mm512_dpbf16_ps(a[j],q,k); asm volatile(""::"v"(q),"v"(k)); }
  t1=std::chrono::steady_clock::now();
  ns=std::chrono::duration<double,std::nano>(t1-t0).count()/(M*12.0);
  float s=0; for(int i=0;i<12;i++) s+=_mm512_reduce_add_ps(a[i]);
  printf("vdpbf16ps zmm: %.3f ns each (%f)\n", ns, s);
  __m512i b[12]; for(int i=0;i<12;i++) b[i]=_mm512_set1_epi32(i);
  __m512i u=_mm512_set1_epi8(3), v=_mm512_set1_epi8(5);
  t0=std::chrono::steady_clock::now();
  for(long i=0;i<M;i++){ _Pragma("GCC unroll 12") for(int j=0;j<12;j++) b[j]=_mm512_dpbusd_epi32(b[j],u,v); asm volatile(""::"v"(u),"v"(v)); }
  t1=std::chrono::steady_clock::now();
  ns=std::chrono::duration<double,std::nano>(t1-t0).count()/(M*12.0);
  long si=0; for(int i=0;i<12;i++) si+=_mm512_reduce_add_epi32(b[i]);
  printf("vpdpbusd zmm: %.3f ns each (%ld)\n", ns, si);
  __m512 c[12]; for(int i=0;i<12;i++) c[i]=_mm512_set1_ps(i);
  __m512 m=_mm512_set1_ps(1.0f);
  t0=std::chrono::steady_clock::now();
  for(long i=0;i<M;i++){ _Pragma("GCC unroll 12") for(int j=0;j<12;j++) c[j]=_mm512_fmadd_ps(c[j],m,m); asm volatile(""::"v"(m)); }
  t1=std::chrono::steady_clock::now();
  ns=std::chrono::duration<double,std::nano>(t1-t0).count()/(M*12.0);
  s=0; for(int i=0;i<12;i++) s+=_mm512_reduce_add_ps(c[i]);
  printf("vfmadd zmm: %.3f ns each (%f)\n", ns, s);
}
