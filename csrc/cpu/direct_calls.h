// Binds the CPU entry points into fusedattn._C (direct_calls.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fusedattn::cpu {

void bind_direct_calls(pybind11::module_& module);

}  // namespace fusedattn::cpu
