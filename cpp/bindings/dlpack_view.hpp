// Turning Python objects into osengine::TensorView without copying: numpy arrays through the buffer protocol,
// anything else (torch tensors, CPU or CUDA) through the DLPack protocol (__dlpack__; for plain torch tensors
// torch.utils.dlpack.to_dlpack, the same capsule made in C).
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "osengine/tensor.hpp"

namespace osengine::python {

// A view plus whatever keeps the memory alive while an op runs (the array or the DLPack capsule).
// Hidden like everything pybind11 compiles (-fvisibility=hidden), since it holds a py::object.
struct __attribute__((visibility("hidden"))) HeldView {
  TensorView view;
  pybind11::object keepalive;
};

// `name` is the argument's name, for error messages. None gives an undefined view (an optional argument left out).
// writable: the op writes into it (read-only numpy arrays are refused).
HeldView to_view(const pybind11::handle& obj, const std::string& op, const std::string& name, bool writable = false);

}  // namespace osengine::python
