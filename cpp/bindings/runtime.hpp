// The native runtime's bindings (runtime.cpp), added to osengine._C (RuntimeModel, RuntimeContext,
// runtime_generate, RuntimeLoadError) when it is built.
#pragma once
#include <pybind11/pybind11.h>

namespace osengine::python {
void bind_runtime(pybind11::module_& m);
}
