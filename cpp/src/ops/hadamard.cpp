// The public Hadamard transform (osengine/hadamard.hpp): validation, then the scalar row transform of core/hadamard.
#include "osengine/hadamard.hpp"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "core/checks.hpp"
#include "core/hadamard.hpp"
#include "core/threading.hpp"

namespace osengine {

bool is_hadamard_order(std::int64_t n) {
  std::int64_t m = 0, p = 0;
  return detail::hadamard_decomposition(n, m, p);
}

void hadamard_transform(const TensorView& x, const TensorView& out) {
  const detail::Checker check("hadamard_transform");
  check.tensor(x, "x", {DType::float32}, 2);
  check.not_empty(x, "x");
  check.tensor(out, "out", {DType::float32}, 2);
  if (out.shape != x.shape)
    check.fail("out", "must have the shape of x " + x.shape_string() + ", got " + out.shape_string());
  const std::int64_t rows = x.size(0), k = x.size(1);
  if (!is_hadamard_order(k)) {
    std::ostringstream msg;
    msg << "no Hadamard matrix of order K = " << k << " (the last dimension of x) is constructed here; supported "
        << "orders are " << detail::hadamard_supported_forms();
    check.fail("x", msg.str());
  }
  const detail::HadamardPlan plan = detail::hadamard_plan(k);
  const float* src = x.ptr<const float>();
  float* dst = out.ptr<float>();
  detail::parallel_for(rows, std::max<std::int64_t>(1, 16384 / k), [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> row(static_cast<std::size_t>(k));
    for (std::int64_t r = begin; r < end; ++r) {
      std::memcpy(row.data(), src + r * k, static_cast<std::size_t>(k) * sizeof(float));  // out may alias x
      detail::hadamard_transform_row(plan, row.data(), dst + r * k);
    }
  });
}

}  // namespace osengine
