// fusedattn._C.plain_tensors_key: the tensor part of fusedattn.repeat_calls' key.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedattn {

void bind_call_keys(pybind11::module_& module);

}  // namespace fusedattn
