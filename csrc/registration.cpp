// fusedattn._C: the Python module and the build facts it reports.
// Kernels register their operators with TORCH_LIBRARY in their own files
// (csrc/cpu, csrc/cuda); this file describes the build and adds the CPU entry points'
// direct bindings (csrc/cpu/direct_calls.cpp) and repeat_calls' tensor key (csrc/call_keys.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "call_keys.h"
#include "cpu/direct_calls.h"
#include "cpu/simd_levels.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["compiler"] = std::string(FUSEDATTN_COMPILER);
  info["cxx_standard"] = std::string("C++") + std::to_string(FUSEDATTN_CXX_STANDARD);
  info["build_type"] = std::string(FUSEDATTN_BUILD_TYPE);
  info["simd"] = fusedattn::cpu::compiled_simd_levels();
  info["openmp"] = static_cast<bool>(FUSEDATTN_OPENMP_ENABLED);
  info["cuda"] = static_cast<bool>(FUSEDATTN_CUDA_ENABLED);
  std::vector<std::string> archs;
  std::string list = FUSEDATTN_CUDA_ARCHS;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find_first_of(",;", start);  // CMake joins the list with commas
    if (end == std::string::npos) end = list.size();
    std::string arch = list.substr(start, end - start);
    // CMake writes nvcc's names (sm_80, sm_90+PTX, compute_90); a bare number means sm_<number>.
    bool named = arch.rfind("sm_", 0) == 0 || arch.rfind("compute_", 0) == 0;
    if (!arch.empty()) archs.push_back(named ? arch : "sm_" + arch);
    start = end + 1;
  }
  info["cuda_architectures"] = archs;
  info["sanitizers"] = static_cast<bool>(FUSEDATTN_SANITIZERS);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedattn native extension";
  m.def("build_info", &build_info, "Compiler, C++ standard, SIMD levels, OpenMP and CUDA facts of this build");
  fusedattn::cpu::bind_direct_calls(m);
  fusedattn::bind_call_keys(m);
}
