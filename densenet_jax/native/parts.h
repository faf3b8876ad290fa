// Shared by the oneDNN handlers (onednn_conv.cc, bottleneck.cc): running a call's work in
// parts on XLA's intra-op thread pool, and turning C++ exceptions into FFI errors.

#ifndef DENSENET_JAX_NATIVE_PARTS_H_
#define DENSENET_JAX_NATIVE_PARTS_H_

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace densenet_jax {

namespace ffi = xla::ffi;

// How many parts ForEachPart splits [0, n) into: one per pool thread, at most n.
inline int64_t NumParts(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, pool.num_threads()));
}

// Runs part(i, first, count) for parts of [0, n) (a batch's images, or an array's rows) on the
// calling thread and on XLA's intra-op thread pool, each part single-threaded in oneDNN;
// returns when all parts are done. Parts are claimed from a shared counter, so a part that no
// pool thread has claimed yet runs on the calling thread (see onednn_conv.cc on threads).
inline void ForEachPart(ffi::ThreadPool& pool, int64_t n,
                        const std::function<void(int64_t, int64_t, int64_t)>& part) {
  int64_t parts = NumParts(pool, n);
  auto run = [n, parts, &part](int64_t i) {
    omp_set_num_threads(1);  // per thread; see the comment at the top
    int64_t first = n * i / parts;
    part(i, first, n * (i + 1) / parts - first);
  };
  if (parts == 1) {
    run(0);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::string error;  // the first part's failure, rethrown on the calling thread
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  // Claims and runs parts until none is left. A pool task that starts after the call has
  // returned finds none and touches nothing but `shared`.
  auto work = [shared, parts, run]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < parts;) {
      std::string error;
      try {
        run(i);
      } catch (const std::exception& e) {  // an exception must not leave a pool thread
        error = e.what();
      }
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->error.empty()) shared->error = error;
      if (++shared->done == parts) shared->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == parts; });
  if (!shared->error.empty()) throw std::runtime_error(shared->error);
}

inline ffi::Error Guard(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace densenet_jax

#endif  // DENSENET_JAX_NATIVE_PARTS_H_
