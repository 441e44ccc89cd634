// fusedattn._C.plain_tensors_key(q, k, v, k_descale, v_descale): what fusedattn.repeat_calls keys a plain call's
// tensors by, built in one C++ call.
//
// The key of a repeated call is computed before every plain call; written in Python it
// reads twelve tensor attributes (shape, stride, dtype, device, requires_grad, layout of
// three tensors) at about 0.1 us each, half the time of a small decode step. Here they
// are read from the at::Tensor directly. The rules are those of repeat_calls.dense_key:
// exactly torch.Tensor (no subclass, no Parameter), nothing that requires grad, strided.
#include "call_keys.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace fusedattn {
namespace {

namespace py = pybind11;

// Integers per tensor: rank, sizes, strides, dtype, device type and index.
int64_t key_length(const at::Tensor& tensor) { return 4 + 2 * tensor.dim(); }

bool plain(PyObject* object) {
  if (Py_TYPE(object) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
  const at::Tensor& tensor = THPVariable_Unpack(object);
  return tensor.layout() == at::kStrided && !tensor.requires_grad();
}

// The sizes, strides, dtypes and devices of q, k, v and the 8-bit scales k_descale and
// v_descale (each None or a tensor: None keys as one -1) as one flat tuple of ints, or None
// when one of them is not a plain tensor (the call takes the full path).
py::object plain_tensors_key(py::handle q, py::handle k, py::handle v, py::handle k_descale, py::handle v_descale) {
  PyObject* tensors[5] = {q.ptr(), k.ptr(), v.ptr(), k_descale.ptr(), v_descale.ptr()};
  int64_t length = 0;
  for (int i = 0; i < 5; ++i) {
    if (i >= 3 && tensors[i] == Py_None) {
      length += 1;
      continue;
    }
    if (!plain(tensors[i])) return py::none();
    length += key_length(THPVariable_Unpack(tensors[i]));
  }
  py::tuple key(length);
  int64_t index = 0;
  const auto put = [&](int64_t value) { PyTuple_SET_ITEM(key.ptr(), index++, PyLong_FromLongLong(value)); };
  for (PyObject* object : tensors) {
    if (object == Py_None) {
      put(-1);
      continue;
    }
    const at::Tensor& tensor = THPVariable_Unpack(object);
    put(tensor.dim());
    for (int64_t size : tensor.sizes()) put(size);
    for (int64_t stride : tensor.strides()) put(stride);
    put(static_cast<int64_t>(tensor.scalar_type()));
    put(static_cast<int64_t>(tensor.device().type()));
    put(tensor.device().index());
  }
  return std::move(key);
}

}  // namespace

void bind_call_keys(py::module_& module) {
  module.def("plain_tensors_key", &plain_tensors_key, py::arg("q"), py::arg("k"), py::arg("v"),
             py::arg("k_descale") = py::none(), py::arg("v_descale") = py::none(),
             "repeat_calls' key of q, k, v and the 8-bit scales (sizes, strides, dtypes, devices; a missing "
             "scale -1), or None unless each is a plain strided torch.Tensor that requires no grad");
}

}  // namespace fusedattn
