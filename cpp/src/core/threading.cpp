#include "core/threading.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#include "osengine/backend.hpp"
#include "osengine/errors.hpp"

#ifdef OSENGINE_HAVE_OPENMP
#include <omp.h>
#endif

namespace osengine {

namespace {
std::atomic<int> configured_threads{0};
thread_local int scoped_threads = 0;  // ThreadCountScope of the calling thread (0: none)

int default_threads() {
#ifdef OSENGINE_HAVE_OPENMP
  return std::max(1, omp_get_num_procs());
#else
  return 1;
#endif
}
}  // namespace

void set_num_threads(int num_threads) {
  if (num_threads < 0) throw ArgumentError("set_num_threads", "num_threads", "must be >= 0 (0 = all cores)");
  configured_threads = num_threads;
}

int get_num_threads() {
  if (scoped_threads > 0) return scoped_threads;
  int n = configured_threads.load();
  return n > 0 ? n : default_threads();
}

ThreadCountScope::ThreadCountScope(int num_threads) : previous_(scoped_threads) {
  if (num_threads < 0) throw ArgumentError("ThreadCountScope", "num_threads", "must be >= 0 (0 = unchanged)");
  if (num_threads > 0) scoped_threads = num_threads;
}

ThreadCountScope::~ThreadCountScope() { scoped_threads = previous_; }

namespace detail {

void parallel_for(std::int64_t count, std::int64_t min_chunk,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (count <= 0) return;
  min_chunk = std::max<std::int64_t>(1, min_chunk);
  const std::int64_t max_chunks = (count + min_chunk - 1) / min_chunk;
  const int threads = static_cast<int>(std::min<std::int64_t>(get_num_threads(), max_chunks));
  if (threads <= 1) {
    body(0, count);
    return;
  }
#ifdef OSENGINE_HAVE_OPENMP
  // Exceptions must not cross the OpenMP region: keep the first and rethrow it after.
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    const std::int64_t t = omp_get_thread_num();
    const std::int64_t nt = omp_get_num_threads();
    const std::int64_t begin = count * t / nt;
    const std::int64_t end = count * (t + 1) / nt;
    if (begin < end) {
      try {
        body(begin, end);
      } catch (...) {
#pragma omp critical(osengine_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  body(0, count);
#endif
}

}  // namespace detail
}  // namespace osengine
