// The runtime's attention kernel: the AVX2 version against a float64 softmax-attention computed directly, on awkward
// key counts and head sizes; a query's output is bit-identical whichever rows it is computed with (1 .. kAttendRows,
// with other rows seeing more or fewer keys), which is what makes chunked prefill equal one-shot prefill; the scalar
// version agrees with the AVX2 one to rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <vector>

#include "float_kernels.hpp"
#include "harness.hpp"

using osengine::runtime::detail::attend_scalar;
using osengine::runtime::detail::float_kernels;
using osengine::runtime::detail::kAttendRows;
using osengine::runtime::detail::key_offset;

namespace {

struct Cache {
  std::int64_t hd = 0, slots = 0;
  std::vector<float> keys, values;  // blocked keys, row-major values
  std::vector<float> key_rows;      // row-major keys, for the direct formula
};

Cache make_cache(std::int64_t hd, int n, std::mt19937& rng) {
  Cache c;
  c.hd = hd;
  c.slots = (n + 7) / 8 * 8;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // NaN in the unwritten positions of the last block: a kernel that reads them into a result fails
  c.keys.assign(static_cast<std::size_t>(c.slots * hd), std::nanf(""));
  c.values.assign(static_cast<std::size_t>(c.slots * hd), std::nanf(""));
  c.key_rows.resize(static_cast<std::size_t>(n * hd));
  for (int j = 0; j < n; ++j)
    for (std::int64_t i = 0; i < hd; ++i) {
      const float k = 2.0f * normal(rng), v = normal(rng);
      c.key_rows[static_cast<std::size_t>(j * hd + i)] = k;
      c.keys[static_cast<std::size_t>(key_offset(j, i, hd))] = k;
      c.values[static_cast<std::size_t>(j * hd + i)] = v;
    }
  return c;
}

// Softmax attention of one query over keys [0, n) in float64.
std::vector<double> direct(const Cache& c, const float* q, int n, float scale) {
  std::vector<double> s(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(c.hd), 0.0);
  double max_s = -INFINITY, total = 0.0;
  for (int j = 0; j < n; ++j) {
    double acc = 0.0;
    for (std::int64_t i = 0; i < c.hd; ++i) acc += double(q[i]) * c.key_rows[static_cast<std::size_t>(j * c.hd + i)];
    s[static_cast<std::size_t>(j)] = acc * scale;
    max_s = std::max(max_s, s[static_cast<std::size_t>(j)]);
  }
  for (double& x : s) total += (x = std::exp(x - max_s));
  for (int j = 0; j < n; ++j)
    for (std::int64_t i = 0; i < c.hd; ++i)
      out[static_cast<std::size_t>(i)] += s[static_cast<std::size_t>(j)] / total * c.values[static_cast<std::size_t>(j * c.hd + i)];
  return out;
}

using AttendFn = decltype(float_kernels().attend);

// Runs `rows` queries (query r sees n_keys[r] keys) and returns their outputs, row after row.
std::vector<float> run(AttendFn attend, const Cache& c, const std::vector<std::vector<float>>& queries,
                       const std::vector<int>& n_keys) {
  const int rows = static_cast<int>(queries.size());
  std::vector<float> out(static_cast<std::size_t>(rows * c.hd), std::nanf(""));
  std::vector<float> scores(static_cast<std::size_t>(kAttendRows * c.slots));
  const float* q[kAttendRows];
  float* o[kAttendRows];
  for (int r = 0; r < rows; ++r) {
    q[r] = queries[static_cast<std::size_t>(r)].data();
    o[r] = out.data() + r * c.hd;
  }
  attend(q, n_keys.data(), rows, c.keys.data(), c.values.data(), c.hd, 1.0f / std::sqrt(float(c.hd)), scores.data(),
         c.slots, o);
  return out;
}

std::vector<float> random_query(std::int64_t hd, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(hd));
  for (float& x : q) x = normal(rng);
  return q;
}

}  // namespace

TEST(attention_matches_the_direct_formula) {
  std::mt19937 rng(1);
  for (std::int64_t hd : {8, 12, 64, 72, 128})
    for (int n : {1, 3, 8, 17, 64, 255}) {
      const Cache c = make_cache(hd, n, rng);
      for (AttendFn attend : {float_kernels().attend, static_cast<AttendFn>(attend_scalar)}) {
        const std::vector<float> q = random_query(hd, rng);
        const std::vector<float> got = run(attend, c, {q}, {n});
        const std::vector<double> want = direct(c, q.data(), n, 1.0f / std::sqrt(float(hd)));
        for (std::int64_t i = 0; i < hd; ++i) {
          const double err = std::abs(got[static_cast<std::size_t>(i)] - want[static_cast<std::size_t>(i)]);
          if (!(err <= 1e-5 * (1.0 + std::abs(want[static_cast<std::size_t>(i)])))) {
            std::ostringstream msg;
            msg << "hd " << hd << " n " << n << " output " << i << ": " << got[static_cast<std::size_t>(i)] << " vs "
                << want[static_cast<std::size_t>(i)];
            throw osengine_test::Failure(msg.str());
          }
        }
      }
    }
}

TEST(a_query_gives_the_same_bits_in_any_row_group) {
  std::mt19937 rng(2);
  for (std::int64_t hd : {8, 64, 72})
    for (int n : {1, 5, 16, 33, 130}) {
      const Cache c = make_cache(hd, n + 3 * kAttendRows, rng);  // room for the rows that see more keys
      const std::vector<float> q = random_query(hd, rng);
      const std::vector<float> alone = run(float_kernels().attend, c, {q}, {n});
      for (int rows = 2; rows <= kAttendRows; ++rows)
        for (int place = 0; place < rows; ++place) {
          // the others see more keys (consecutive prefill rows) or fewer
          std::vector<std::vector<float>> queries;
          std::vector<int> n_keys;
          for (int r = 0; r < rows; ++r) {
            queries.push_back(r == place ? q : random_query(hd, rng));
            n_keys.push_back(r == place ? n : std::max(1, n + (r - place) * (r % 2 ? 1 : 3)));
          }
          const std::vector<float> group = run(float_kernels().attend, c, queries, n_keys);
          CHECK(std::memcmp(group.data() + place * hd, alone.data(), static_cast<std::size_t>(hd) * sizeof(float)) == 0);
        }
    }
}

OSENGINE_TEST_MAIN
