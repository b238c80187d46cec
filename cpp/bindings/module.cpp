// osengine._C: thin bindings over the C++ API. Output buffers are passed in (the Python layer in
// osengine/ops.py allocates them with numpy or torch, matching the inputs), so no data is ever copied here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "dlpack_view.hpp"
#ifdef OSENGINE_HAVE_RUNTIME
#include "runtime.hpp"
#endif
#include "osengine/osengine.hpp"

namespace py = pybind11;
using osengine::python::HeldView;
using osengine::python::to_view;

namespace {

osengine::ActivationFormat parse_format(const std::string& name) {
  if (name == "int8") return osengine::ActivationFormat::int8;
  if (name == "int4_packed") return osengine::ActivationFormat::int4_packed;
  throw osengine::ArgumentError("gemm", "a_format", "unknown activation format '" + name +
                                                        "'; expected 'int8' or 'int4_packed'");
}

void quantize_static(py::handle x, py::handle shift, py::handle smooth_scale, py::handle delta, py::handle zero_point,
                     py::handle out_codes, int bits, bool symmetric, std::int64_t group_size,
                     const std::string& backend, std::uintptr_t stream, py::handle rms_norm_weight, float rms_norm_eps,
                     bool silu_gate, bool rotate) {
  const char* op = "quantize_static";
  HeldView vx = to_view(x, op, "x"), vs = to_view(shift, op, "shift"), vsc = to_view(smooth_scale, op, "smooth_scale"),
           vd = to_view(delta, op, "delta"), vz = to_view(zero_point, op, "zero_point"),
           vo = to_view(out_codes, op, "out_codes", true), vn = to_view(rms_norm_weight, op, "rms_norm_weight");
  osengine::QuantizeOptions options{bits,   symmetric, group_size,   backend,
                                    stream, vn.view,   rms_norm_eps, silu_gate, rotate};
  py::gil_scoped_release release;
  osengine::quantize_static(vx.view, vs.view, vsc.view, vd.view, vz.view, vo.view, options);
}

void quantize_dynamic(py::handle x, py::handle shift, py::handle smooth_scale, py::handle out_codes,
                      py::handle out_delta, py::handle out_zero_point, int bits, bool symmetric,
                      std::int64_t group_size, const std::string& backend, std::uintptr_t stream,
                      py::handle rms_norm_weight, float rms_norm_eps, bool silu_gate, bool rotate) {
  const char* op = "quantize_dynamic";
  HeldView vx = to_view(x, op, "x"), vs = to_view(shift, op, "shift"), vsc = to_view(smooth_scale, op, "smooth_scale"),
           vo = to_view(out_codes, op, "out_codes", true), vd = to_view(out_delta, op, "out_delta", true),
           vz = to_view(out_zero_point, op, "out_zero_point", true), vn = to_view(rms_norm_weight, op, "rms_norm_weight");
  osengine::QuantizeOptions options{bits,   symmetric, group_size,   backend,
                                    stream, vn.view,   rms_norm_eps, silu_gate, rotate};
  py::gil_scoped_release release;
  osengine::quantize_dynamic(vx.view, vs.view, vsc.view, vo.view, vd.view, vz.view, options);
}

void gemm(py::handle a, const osengine::PackedWeights& weights, py::handle a_scale, py::handle w_scale, py::handle out,
          py::handle a_zero_point, py::handle bias, py::handle residual, const std::string& activation,
          const std::string& a_format, std::uintptr_t stream) {
  const char* op = "gemm";
  HeldView va = to_view(a, op, "a"), vas = to_view(a_scale, op, "a_scale"), vws = to_view(w_scale, op, "w_scale"),
           vo = to_view(out, op, "out", true), vaz = to_view(a_zero_point, op, "a_zero_point"),
           vb = to_view(bias, op, "bias"), vr = to_view(residual, op, "residual");
  osengine::GemmArgs args;
  args.a = va.view;
  args.a_format = parse_format(a_format);
  args.a_scale = vas.view;
  args.a_zero_point = vaz.view;
  args.w_scale = vws.view;
  args.bias = vb.view;
  args.residual = vr.view;
  args.activation = osengine::parse_activation(activation);
  args.out = vo.view;
  args.stream = stream;
  py::gil_scoped_release release;
  osengine::gemm(args, weights);
}

void gemm_accumulate(py::handle a, const osengine::PackedWeights& weights, py::handle out, const std::string& a_format,
                     std::uintptr_t stream) {
  HeldView va = to_view(a, "gemm_accumulate", "a"), vo = to_view(out, "gemm_accumulate", "out", true);
  const auto format = parse_format(a_format);
  py::gil_scoped_release release;
  osengine::gemm_accumulate(va.view, format, weights, vo.view, stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "osengine C++ engine (private module; use the osengine package)";
  m.attr("__version__") = OSENGINE_VERSION_STRING;

  // Errors map onto the Python exceptions a user expects: bad values -> ValueError, bad dtype / layout -> TypeError,
  // a backend this machine lacks -> RuntimeError. The message names the op and the argument.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const osengine::DTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const osengine::ArgumentError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const osengine::UnsupportedError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("quantize_static", &quantize_static, py::arg("x"), py::arg("shift"), py::arg("smooth_scale"), py::arg("delta"),
        py::arg("zero_point"), py::arg("out_codes"), py::arg("bits"), py::arg("symmetric"), py::arg("group_size"),
        py::arg("backend"), py::arg("stream") = 0, py::arg("rms_norm_weight") = py::none(),
        py::arg("rms_norm_eps") = 1e-6f, py::arg("silu_gate") = false, py::arg("rotate") = false);
  m.def("quantize_dynamic", &quantize_dynamic, py::arg("x"), py::arg("shift"), py::arg("smooth_scale"),
        py::arg("out_codes"), py::arg("out_delta"), py::arg("out_zero_point"), py::arg("bits"), py::arg("symmetric"),
        py::arg("group_size"), py::arg("backend"), py::arg("stream") = 0, py::arg("rms_norm_weight") = py::none(),
        py::arg("rms_norm_eps") = 1e-6f, py::arg("silu_gate") = false, py::arg("rotate") = false);
  m.def("gemm", &gemm, py::arg("a"), py::arg("weights"), py::arg("a_scale"), py::arg("w_scale"), py::arg("out"),
        py::arg("a_zero_point"), py::arg("bias"), py::arg("residual"), py::arg("activation"), py::arg("a_format"),
        py::arg("stream") = 0);
  m.def("gemm_accumulate", &gemm_accumulate, py::arg("a"), py::arg("weights"), py::arg("out"), py::arg("a_format"),
        py::arg("stream") = 0);
  m.def("hadamard_transform", [](py::handle x, py::handle out) {
    HeldView vx = to_view(x, "hadamard_transform", "x"), vo = to_view(out, "hadamard_transform", "out", true);
    py::gil_scoped_release release;
    osengine::hadamard_transform(vx.view, vo.view);
  }, py::arg("x"), py::arg("out"),
  "out = x H_K / sqrt(K) per row of float32 [M, K] (CPU), in the order of QuantizeOptions::rotate (cross-checks).");
  m.def("is_hadamard_order", &osengine::is_hadamard_order, py::arg("n"),
        "Whether rows of n values can be rotated (rotate=True): n = m * 2^k, m = 1 or a Paley order <= 256.");
  m.def("pack_int4", [](py::handle codes, py::handle out) {
    HeldView vc = to_view(codes, "pack_int4", "codes"), vo = to_view(out, "pack_int4", "out", true);
    py::gil_scoped_release release;
    osengine::pack_int4(vc.view, vo.view);
  }, py::arg("codes"), py::arg("out"));
  m.def("unpack_int4", [](py::handle packed, py::handle out) {
    HeldView vp = to_view(packed, "unpack_int4", "packed"), vo = to_view(out, "unpack_int4", "out", true);
    py::gil_scoped_release release;
    osengine::unpack_int4(vp.view, vo.view);
  }, py::arg("packed"), py::arg("out"));
  m.def("column_sums", [](py::handle weights, std::int64_t group_size, py::handle out) {
    HeldView vw = to_view(weights, "column_sums", "weights"), vo = to_view(out, "column_sums", "out", true);
    osengine::column_sums(vw.view, group_size, vo.view);
  }, py::arg("weights"), py::arg("group_size"), py::arg("out"));
  m.def("code_range", [](int bits, bool symmetric) {
    if (bits < 2 || bits > 8) throw osengine::ArgumentError("code_range", "bits", "must be in 2..8, got " + std::to_string(bits));
    auto r = osengine::code_range(bits, symmetric);
    return py::make_tuple(r.qmin, r.qmax);
  }, py::arg("bits"), py::arg("symmetric"));
  m.def("set_num_threads", &osengine::set_num_threads, py::arg("num_threads"));
  m.def("get_num_threads", &osengine::get_num_threads);
  m.def("cpu_has_avx2", &osengine::cpu_has_avx2);
  m.def("cpu_has_avx512_vnni", &osengine::cpu_has_avx512_vnni);
  m.def("has_cuda_backend", &osengine::has_cuda_backend);
#ifdef OSENGINE_HAVE_RUNTIME
  osengine::python::bind_runtime(m);
  m.def("has_native_runtime", [] { return true; }, "Whether this build contains the native runtime (_C.runtime).");
#else
  m.def("has_native_runtime", [] { return false; }, "Whether this build contains the native runtime (_C.runtime).");
#endif
  m.def("registered_backends", &osengine::registered_backends,
        "Names of the backends this build registers and this machine can run (reference first).");
  m.def("best_cpu_backend", [] { return std::string(osengine::backend_name(osengine::best_cpu_backend())); });

  py::class_<osengine::PackedWeights>(m, "PackedWeights")
      .def_static("pack", [](py::handle weights, int bits, std::int64_t group_size, const std::string& backend,
                             py::handle weight_scale) {
        HeldView vw = to_view(weights, "pack_weights", "weights"), vs = to_view(weight_scale, "pack_weights", "weight_scale");
        py::gil_scoped_release release;
        return osengine::PackedWeights::pack(vw.view, bits, group_size, backend, vs.view);
      }, py::arg("weights"), py::arg("bits"), py::arg("group_size") = 0, py::arg("backend") = "auto",
         py::arg("weight_scale") = py::none())
      .def_property_readonly("n", &osengine::PackedWeights::n)
      .def_property_readonly("k", &osengine::PackedWeights::k)
      .def_property_readonly("bits", &osengine::PackedWeights::bits)
      .def_property_readonly("group_size", &osengine::PackedWeights::group_size)
      .def_property_readonly("num_groups", &osengine::PackedWeights::num_groups)
      .def_property_readonly("nbytes", &osengine::PackedWeights::nbytes)
      .def_property_readonly("has_weight_scales", &osengine::PackedWeights::has_weight_scales)
      .def_property_readonly("device_index", &osengine::PackedWeights::device_index)
      .def_property_readonly("backend", [](const osengine::PackedWeights& w) { return w.backend_name(); })
      .def("column_sums", [](const osengine::PackedWeights& w) {
        py::array_t<std::int32_t> out({w.num_groups(), w.n()});
        std::memcpy(out.mutable_data(), w.column_sums().data(), w.column_sums().size() * sizeof(std::int32_t));
        return out;
      })
      .def("unpack", [](const osengine::PackedWeights& w, py::handle out) {
        HeldView vo = to_view(out, "PackedWeights.unpack", "out", true);
        w.unpack(vo.view);
      }, py::arg("out"))
      .def("unpack_rows", [](const osengine::PackedWeights& w, py::handle rows, py::handle out) {
        HeldView vr = to_view(rows, "PackedWeights.unpack_rows", "rows"),
                 vo = to_view(out, "PackedWeights.unpack_rows", "out", true);
        py::gil_scoped_release release;
        w.unpack_rows(vr.view, vo.view);
      }, py::arg("rows"), py::arg("out"))
      .def("__repr__", [](const osengine::PackedWeights& w) {
        return "<osengine PackedWeights int" + std::to_string(w.bits()) + " [" + std::to_string(w.n()) + ", " +
               std::to_string(w.k()) + "] group_size=" + std::to_string(w.group_size()) + " backend=" +
               w.backend_name() + ">";
      });
}
