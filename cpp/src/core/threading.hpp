// One place for CPU parallelism (OpenMP when the build has it, serial otherwise).
#pragma once
#include <cstdint>
#include <functional>

namespace osengine::detail {

// Calls body(begin, end) on disjoint chunks covering [0, count), in parallel over the configured threads.
// Chunks are at least min_chunk long so tiny problems stay on one thread.
void parallel_for(std::int64_t count, std::int64_t min_chunk,
                  const std::function<void(std::int64_t begin, std::int64_t end)>& body);

}  // namespace osengine::detail
