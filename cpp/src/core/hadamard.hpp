// Hadamard matrices of the orders transformer widths need, and the online rotation y = x H_n / sqrt(n) that the
// quantize kernels fuse (QuantizeOptions::rotate). The definition is python/osengine/quant/hadamard.py's, entry for
// entry and operation for operation (its module docstring is the normative text):
//
//   n = m * 2^k with m = 1 or a Paley order m <= 256, the largest 2^k that works;
//     Paley I   m = q + 1      q prime, q = 3 (mod 4)   H = I + [[0, 1^T], [-1, Q]]
//     Paley II  m = 2 (q + 1)  q prime, q = 1 (mod 4)   C = [[0, 1^T], [1, Q]], 0 -> [[1, -1], [-1, -1]],
//                                                       +-1 -> +-[[1, 1], [1, -1]]
//     (Paley I where both exist), Q[i][j] = chi(j - i) with chi the quadratic character of GF(q);
//   H_n = kron(H_m, Sylvester_{2^k}), row index i = a * 2^k + b.
//
// The transform of one float32 row, in this order (every backend follows it, so all give the same floats):
//   1. per a, Sylvester butterflies over x[a, :] for h = 1, 2, 4, ..., 2^(k-1):
//      (x_j, x_{j+h}) -> (x_j + x_{j+h}, x_j - x_{j+h}) for each pair of each block of 2h;
//   2. per output a', y[a', :] = +-x[0, :], then +-x[a, :] added (H_m[a, a'] = +1) or subtracted (-1) for
//      a = 1, ..., m - 1 in that order (column a' of H_m: Paley I matrices are not symmetric);
//   3. y *= float32(1 / sqrt(double(n))).
// Stage 2 may be computed as fma(x, +-1, acc): the product is exact, so that is acc +- x rounded once, the same bits.
//
// paley_entry is a host/device function: the CUDA kernel computes H_m's entries from it, the host builds its
// matrices with it, so there is one definition of the matrix.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/float_math.hpp"  // OSENGINE_HD

namespace osengine::detail {

constexpr int kMaxHadamardBaseOrder = 256;

enum class HadamardKind : int { sylvester = 0, paley1 = 1, paley2 = 2 };

// H_m[i][j] (+1 or -1) of a Paley construction of prime q; chi[r] is the quadratic character of r in GF(q)
// (chi[0] = 0, else +1 for a nonzero square, -1 otherwise). 0 <= i, j < m.
OSENGINE_HD int paley_entry(HadamardKind kind, int q, const signed char* chi, int i, int j) {
  if (kind == HadamardKind::paley1) {  // H = I + [[0, 1^T], [-1, Q]]
    if (i == 0) return 1;
    if (j == 0) return -1;
    return chi[((j - i) % q + q) % q] + (i == j ? 1 : 0);  // chi(0) = 0: the diagonal is +1
  }
  // Paley II: C = [[0, 1^T], [1, Q]], each entry a 2x2 block
  const int bi = i / 2, bj = j / 2, di = i % 2, dj = j % 2;
  int c;
  if (bi == 0 || bj == 0)
    c = (bi == 0 && bj == 0) ? 0 : 1;
  else
    c = chi[((bj - bi) % q + q) % q];
  if (c == 0) return (di == 0 && dj == 0) ? 1 : -1;  // [[1, -1], [-1, -1]]
  return (di == 1 && dj == 1) ? -c : c;              // c [[1, 1], [1, -1]]
}

// The rotation of rows of n values: n = m * p, p = 2^log2_p.
struct HadamardPlan {
  std::int64_t n = 0;
  std::int64_t m = 1;
  std::int64_t p = 1;
  int log2_p = 0;
  HadamardKind kind = HadamardKind::sylvester;
  int q = 0;                            // the Paley prime (0 for m = 1)
  float scale = 1.0f;                   // float32(1 / sqrt(double(n)))
  const std::int8_t* base = nullptr;    // H_m [m, m] row-major, +-1 (a process-wide cache owns it)
  const float* column_signs = nullptr;  // H_m transposed as float +-1: column_signs[a' * m + a] = H_m[a][a']
};

// (m, p) of n as above, or false when n has no supported decomposition (n < 1 included).
bool hadamard_decomposition(std::int64_t n, std::int64_t& m, std::int64_t& p);
// The supported forms, for error messages: "m * 2^k with m = 1 or a Paley order <= 256 (12, 20, ...)".
std::string hadamard_supported_forms();
// The plan of a supported order (the caller checked with hadamard_decomposition; an unsupported n throws
// std::invalid_argument). Thread-safe; base matrices are built once per base order and kept.
HadamardPlan hadamard_plan(std::int64_t n);
// H_m of a base order (1 or a Paley order), row-major +-1, built from paley_entry (not cached).
std::vector<std::int8_t> hadamard_base_matrix(std::int64_t m);

// The scalar transform of one row in the normative order: x[n] is overwritten (the butterflies run in place), the
// rotated row goes to out[n] (out != x).
void hadamard_transform_row(const HadamardPlan& plan, float* x, float* out);

}  // namespace osengine::detail
