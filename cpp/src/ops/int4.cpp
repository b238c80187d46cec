#include "osengine/int4.hpp"

#include "core/checks.hpp"

namespace osengine {

void pack_int4(const TensorView& codes, const TensorView& out) {
  const detail::Checker check("pack_int4");
  check.tensor(codes, "codes", {DType::int8});
  if (codes.ndim() < 1) check.fail("codes", "must have at least one dimension");
  const std::int64_t k = codes.size(-1);
  if (k % 2 != 0) check.fail("codes", "last dimension must be even to pack two int4 codes per byte, got " + codes.shape_string());
  check.tensor(out, "out", {DType::uint8, DType::int8}, codes.ndim());
  for (int d = 0; d < codes.ndim(); ++d) {
    const std::int64_t expected = d == codes.ndim() - 1 ? k / 2 : codes.size(d);
    if (out.size(d) != expected) check.fail("out", "must have shape of codes with the last dimension halved, got " + out.shape_string());
  }
  const auto* src = codes.ptr<const std::int8_t>();
  const std::int64_t count = codes.numel();
  for (std::int64_t i = 0; i < count; ++i) {
    if (src[i] < -8 || src[i] > 7)
      check.fail("codes", "int4 codes must lie in [-8, 7]; found " + std::to_string(int{src[i]}) + " at flat index " + std::to_string(i));
  }
  auto* dst = static_cast<std::uint8_t*>(out.data);
  for (std::int64_t i = 0; i < count; i += 2)
    dst[i / 2] = static_cast<std::uint8_t>((src[i] & 0x0f) | ((src[i + 1] & 0x0f) << 4));
}

void unpack_int4(const TensorView& packed, const TensorView& out) {
  const detail::Checker check("unpack_int4");
  check.tensor(packed, "packed", {DType::uint8, DType::int8});
  if (packed.ndim() < 1) check.fail("packed", "must have at least one dimension");
  check.tensor(out, "out", {DType::int8}, packed.ndim());
  for (int d = 0; d < packed.ndim(); ++d) {
    const std::int64_t expected = d == packed.ndim() - 1 ? packed.size(d) * 2 : packed.size(d);
    if (out.size(d) != expected) check.fail("out", "must have shape of packed with the last dimension doubled, got " + out.shape_string());
  }
  const auto* src = static_cast<const std::uint8_t*>(packed.data);
  auto* dst = out.ptr<std::int8_t>();
  const std::int64_t count = packed.numel();
  for (std::int64_t i = 0; i < count; ++i) {
    const int lo = src[i] & 0x0f, hi = src[i] >> 4;
    dst[2 * i] = static_cast<std::int8_t>(lo >= 8 ? lo - 16 : lo);
    dst[2 * i + 1] = static_cast<std::int8_t>(hi >= 8 ? hi - 16 : hi);
  }
}

}  // namespace osengine
