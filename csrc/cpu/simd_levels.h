// Which SIMD instruction sets the CPU code of this build was compiled for.
#pragma once

#include <string>
#include <vector>

namespace fusedattn::cpu {

// Levels enabled for the translation units of the baseline build (compiler macros),
// plus the per-ISA kernel variants CMake compiled in (FUSEDATTN_CPU_ISA_VARIANTS).
std::vector<std::string> compiled_simd_levels();

}  // namespace fusedattn::cpu
