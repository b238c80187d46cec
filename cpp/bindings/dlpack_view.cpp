#include "dlpack_view.hpp"

#include <pybind11/numpy.h>

#include <cstdint>

#include "osengine/errors.hpp"

namespace py = pybind11;

namespace osengine::python {

namespace {

// The DLPack ABI (v0.8, the "dltensor" capsule every producer supports), declared from the public specification.
struct DLDevice {
  std::int32_t device_type;  // 1 = CPU, 2 = CUDA, 3 = CUDA host
  std::int32_t device_id;
};
struct DLDataType {
  std::uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  std::int32_t ndim;
  DLDataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null = compact row-major
  std::uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

DType dtype_from_dlpack(const DLDataType& t, const std::string& op, const std::string& name) {
  if (t.lanes == 1) {
    if (t.code == 0 && t.bits == 8) return DType::int8;
    if (t.code == 1 && t.bits == 8) return DType::uint8;
    if (t.code == 0 && t.bits == 32) return DType::int32;
    if (t.code == 2 && t.bits == 32) return DType::float32;
    if (t.code == 2 && t.bits == 16) return DType::float16;
    if (t.code == 4 && t.bits == 16) return DType::bfloat16;
  }
  throw DTypeError(op, name, "unsupported dtype (DLPack code " + std::to_string(t.code) + ", " +
                                 std::to_string(t.bits) + " bits); expected int8, uint8, int32, float32, bfloat16 or float16");
}

DType dtype_from_numpy(const py::dtype& dt, const std::string& op, const std::string& name) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'i' && size == 1) return DType::int8;
  if (kind == 'u' && size == 1) return DType::uint8;
  if (kind == 'i' && size == 4) return DType::int32;
  if (kind == 'f' && size == 4) return DType::float32;
  if (kind == 'f' && size == 2) return DType::float16;
  if (size == 2 && std::string(py::str(dt.attr("name"))) == "bfloat16") return DType::bfloat16;  // ml_dtypes
  throw DTypeError(op, name, "unsupported numpy dtype " + std::string(py::str(dt)) +
                                 "; expected int8, uint8, int32, float32, bfloat16 or float16");
}

HeldView from_numpy(const py::array& array, const std::string& op, const std::string& name, bool writable) {
  if (writable && !array.writeable()) throw ArgumentError(op, name, "is a read-only array but the op writes into it");
  HeldView held;
  held.keepalive = array;
  TensorView& v = held.view;
  v.is_defined = true;
  v.dtype = dtype_from_numpy(array.dtype(), op, name);
  v.data = const_cast<void*>(array.data());
  const auto itemsize = static_cast<std::int64_t>(array.itemsize());
  for (py::ssize_t d = 0; d < array.ndim(); ++d) {
    v.shape.push_back(array.shape(d));
    const auto stride = static_cast<std::int64_t>(array.strides(d));
    if (stride % itemsize != 0) throw DTypeError(op, name, "has strides that are not a multiple of its item size");
    v.strides.push_back(stride / itemsize);
  }
  return held;
}

// Tensor.__dlpack__ is Python code that costs ~7 us a call (it checks grad, conjugation, streams), a third of a
// small GEMM call with six tensors; torch's C exporter torch.utils.dlpack.to_dlpack makes the same capsule in ~1 us.
// We take it for tensors of exactly torch.Tensor whose flags need none of __dlpack__'s handling (no grad, no
// conjugate bit; a CUDA tensor's stream is not synchronised by either). Null: use __dlpack__.
// Neither exporter honours torch's negative bit (a lazily negated view exports its memory un-negated), so any torch
// tensor with it is refused here.
py::object torch_capsule(const py::handle& obj, const std::string& op, const std::string& name) {
  static PyTypeObject* tensor_type = nullptr;  // torch.Tensor, and torch.utils.dlpack.to_dlpack: looked up once
  static PyObject* to_dlpack = nullptr;        // torch is imported, kept for the life of the process
  if (tensor_type == nullptr) {
    py::object modules = py::module_::import("sys").attr("modules");
    if (!modules.contains("torch")) return {};
    py::object tensor = modules["torch"].attr("Tensor");
    py::object fn = py::module_::import("torch.utils.dlpack").attr("to_dlpack");
    tensor_type = reinterpret_cast<PyTypeObject*>(tensor.release().ptr());
    to_dlpack = fn.release().ptr();
  }
  if (!PyObject_TypeCheck(obj.ptr(), tensor_type)) return {};
  if (obj.attr("is_neg")().cast<bool>())
    throw ArgumentError(op, name, "is a lazily negated torch view (is_neg() is true), which DLPack exports without "
                                  "the negation; pass tensor.resolve_neg()");
  if (Py_TYPE(obj.ptr()) != tensor_type || obj.attr("requires_grad").cast<bool>() ||
      obj.attr("is_conj")().cast<bool>())
    return {};
  return py::reinterpret_borrow<py::object>(to_dlpack)(obj);
}

HeldView from_dlpack(const py::handle& obj, const std::string& op, const std::string& name) {
  py::object capsule_obj = torch_capsule(obj, op, name);
  if (!capsule_obj) {
    try {
      capsule_obj = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      // The exception's type and message only (what() would append the Python traceback).
      const std::string why = std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
      throw ArgumentError(op, name, "could not be exported through DLPack: " + why +
                                        " (for a torch tensor that requires grad, pass tensor.detach())");
    }
  }
  auto capsule = py::reinterpret_borrow<py::capsule>(capsule_obj);
  if (std::string(capsule.name() ? capsule.name() : "") != "dltensor")
    throw ArgumentError(op, name, "returned a DLPack capsule that was already consumed");
  auto* managed = capsule.get_pointer<DLManagedTensor>();
  const DLTensor& t = managed->dl_tensor;
  HeldView held;
  held.keepalive = capsule_obj;  // the capsule's destructor calls the producer's deleter
  TensorView& v = held.view;
  v.is_defined = true;
  v.dtype = dtype_from_dlpack(t.dtype, op, name);
  if (t.device.device_type == 1 || t.device.device_type == 3) {
    v.device = Device::cpu;
  } else if (t.device.device_type == 2) {
    v.device = Device::cuda;
  } else {
    throw DTypeError(op, name, "lives on an unsupported device (DLPack device type " +
                                   std::to_string(t.device.device_type) + "); expected CPU or CUDA");
  }
  v.device_index = t.device.device_id;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  for (std::int32_t d = 0; d < t.ndim; ++d) v.shape.push_back(t.shape[d]);
  if (t.strides) {
    for (std::int32_t d = 0; d < t.ndim; ++d) v.strides.push_back(t.strides[d]);
  } else {
    v = TensorView(v.data, v.dtype, v.shape, v.device);
    v.device_index = t.device.device_id;
  }
  return held;
}

}  // namespace

HeldView to_view(const py::handle& obj, const std::string& op, const std::string& name, bool writable) {
  if (obj.is_none()) return {};
  if (py::isinstance<py::array>(obj)) return from_numpy(py::reinterpret_borrow<py::array>(obj), op, name, writable);
  if (py::hasattr(obj, "__dlpack__")) return from_dlpack(obj, op, name);
  throw DTypeError(op, name, std::string("expected a numpy array or a torch tensor, got ") +
                                 std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

}  // namespace osengine::python
