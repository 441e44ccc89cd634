#include "cpu/simd_levels.h"

namespace fusedattn::cpu {

std::vector<std::string> compiled_simd_levels() {
  std::vector<std::string> levels;
#if defined(__SSE2__)
  levels.push_back("sse2");
#endif
#if defined(__AVX2__)
  levels.push_back("avx2");
#endif
#if defined(__AVX512F__)
  levels.push_back("avx512f");
#endif
#if defined(__ARM_NEON)
  levels.push_back("neon");
#endif
#if defined(FUSEDATTN_CPU_ISA_VARIANTS)
  // Kernel variants compiled with their own flags and chosen at run time.
  for (const char* variant : {FUSEDATTN_CPU_ISA_VARIANTS}) levels.push_back(std::string(variant) + " (runtime dispatch)");
#endif
  return levels;
}

}  // namespace fusedattn::cpu
