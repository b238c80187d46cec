// Hadamard orders, base matrices and the scalar row transform (see hadamard.hpp for the definition).
#include "core/hadamard.hpp"

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace osengine::detail {

namespace {

bool is_prime(int q) {
  if (q < 2) return false;
  for (int d = 2; d * d <= q; ++d)
    if (q % d == 0) return false;
  return true;
}

struct Construction {
  HadamardKind kind;
  int q;
};

// Paley order -> construction, as quant/hadamard.py's _base_constructions: Paley II first, then Paley I over it.
const std::map<int, Construction>& constructions() {
  static const std::map<int, Construction> table = [] {
    std::map<int, Construction> out;
    for (int q = 3; q < kMaxHadamardBaseOrder; ++q) {
      if (!is_prime(q)) continue;
      if (q % 4 == 1 && 2 * (q + 1) <= kMaxHadamardBaseOrder)
        out.emplace(2 * (q + 1), Construction{HadamardKind::paley2, q});
      if (q % 4 == 3 && q + 1 <= kMaxHadamardBaseOrder) out[q + 1] = Construction{HadamardKind::paley1, q};
    }
    return out;
  }();
  return table;
}

std::vector<signed char> quadratic_character(int q) {
  std::vector<signed char> chi(static_cast<std::size_t>(q), -1);
  chi[0] = 0;
  for (int x = 1; x < q; ++x) chi[static_cast<std::size_t>(x * x % q)] = 1;
  return chi;
}

struct BaseEntry {
  std::vector<std::int8_t> matrix;   // H_m row-major
  std::vector<float> column_signs;   // H_m^T as +-1.0f
};

const BaseEntry& cached_base(std::int64_t m) {
  static std::mutex mutex;
  static std::map<std::int64_t, std::unique_ptr<BaseEntry>> cache;  // never erased: plans keep pointers into it
  const std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[m];
  if (!slot) {
    auto entry = std::make_unique<BaseEntry>();
    entry->matrix = hadamard_base_matrix(m);
    entry->column_signs.resize(entry->matrix.size());
    for (std::int64_t a = 0; a < m; ++a)
      for (std::int64_t c = 0; c < m; ++c)
        entry->column_signs[static_cast<std::size_t>(c * m + a)] =
            static_cast<float>(entry->matrix[static_cast<std::size_t>(a * m + c)]);
    slot = std::move(entry);
  }
  return *slot;
}

}  // namespace

bool hadamard_decomposition(std::int64_t n, std::int64_t& m, std::int64_t& p) {
  if (n < 1) return false;
  const auto& bases = constructions();
  for (std::int64_t power = n & -n; power >= 1; power /= 2) {  // the largest power of two dividing n first
    const std::int64_t base = n / power;
    if (base == 1 || (base <= kMaxHadamardBaseOrder && bases.count(static_cast<int>(base)))) {
      m = base;
      p = power;
      return true;
    }
  }
  return false;
}

std::string hadamard_supported_forms() {
  std::ostringstream out;
  out << "m * 2^k with m = 1 or a Paley order <= " << kMaxHadamardBaseOrder << " (";
  int shown = 0;
  for (const auto& entry : constructions()) {
    if (shown == 12) break;
    if ((entry.first & (entry.first - 1)) == 0) continue;  // powers of two need no Paley matrix (m = 1)
    out << (shown++ ? ", " : "") << entry.first;
  }
  out << ", ...)";
  return out.str();
}

std::vector<std::int8_t> hadamard_base_matrix(std::int64_t m) {
  if (m == 1) return {1};
  const auto& bases = constructions();
  const auto found = m <= kMaxHadamardBaseOrder ? bases.find(static_cast<int>(m)) : bases.end();
  if (found == bases.end()) throw std::invalid_argument("hadamard_base_matrix: not a base order");
  const Construction c = found->second;
  const std::vector<signed char> chi = quadratic_character(c.q);
  std::vector<std::int8_t> h(static_cast<std::size_t>(m * m));
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j)
      h[static_cast<std::size_t>(i * m + j)] = static_cast<std::int8_t>(paley_entry(c.kind, c.q, chi.data(), i, j));
  return h;
}

HadamardPlan hadamard_plan(std::int64_t n) {
  HadamardPlan plan;
  if (!hadamard_decomposition(n, plan.m, plan.p))
    throw std::invalid_argument("hadamard_plan: order " + std::to_string(n) + " is not supported");
  plan.n = n;
  while ((std::int64_t{1} << plan.log2_p) < plan.p) ++plan.log2_p;
  if (plan.m > 1) {
    const Construction c = constructions().at(static_cast<int>(plan.m));
    plan.kind = c.kind;
    plan.q = c.q;
  }
  plan.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  const BaseEntry& base = cached_base(plan.m);
  plan.base = base.matrix.data();
  plan.column_signs = base.column_signs.data();
  return plan;
}

void hadamard_transform_row(const HadamardPlan& plan, float* x, float* out) {
  const std::int64_t m = plan.m, p = plan.p;
  // 1. Sylvester butterflies within each block x[a, :]
  for (std::int64_t a = 0; a < m; ++a) {
    float* v = x + a * p;
    for (std::int64_t h = 1; h < p; h *= 2)
      for (std::int64_t s = 0; s < p; s += 2 * h)
        for (std::int64_t j = s; j < s + h; ++j) {
          const float lo = v[j], hi = v[j + h];
          v[j] = lo + hi;
          v[j + h] = lo - hi;
        }
  }
  // 2. y[a', :] = sum_a H_m[a][a'] x[a, :], a in order; 3. times 1 / sqrt(n)
  for (std::int64_t c = 0; c < m; ++c) {
    float* y = out + c * p;
    for (std::int64_t b = 0; b < p; ++b) y[b] = plan.base[c] > 0 ? x[b] : -x[b];
    for (std::int64_t a = 1; a < m; ++a) {
      const float* v = x + a * p;
      if (plan.base[a * m + c] > 0)
        for (std::int64_t b = 0; b < p; ++b) y[b] = y[b] + v[b];
      else
        for (std::int64_t b = 0; b < p; ++b) y[b] = y[b] - v[b];
    }
    for (std::int64_t b = 0; b < p; ++b) y[b] = y[b] * plan.scale;
  }
}

}  // namespace osengine::detail
