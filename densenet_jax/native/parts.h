// Shared by the oneDNN handlers (onednn_conv.cc, bottleneck.cc): checking a call's operands,
// running its work in parts on XLA's intra-op thread pool, and turning C++ exceptions into FFI
// errors.

#ifndef DENSENET_JAX_NATIVE_PARTS_H_
#define DENSENET_JAX_NATIVE_PARTS_H_

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace densenet_jax {

namespace ffi = xla::ffi;

using Dims = ffi::Span<const int64_t>;

// "[2, 4, 4, 3]".
template <typename Sizes>
std::string DimsString(const Sizes& dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

// "f32", "bf16", as XLA's text names element types.
inline std::string TypeName(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return "f32";
    case ffi::DataType::BF16: return "bf16";
    case ffi::DataType::F16: return "f16";
    case ffi::DataType::F64: return "f64";
    case ffi::DataType::S32: return "s32";
    case ffi::DataType::U16: return "u16";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

// The checks a handler makes on its operands, attributes and results before it touches any of
// their memory: a custom call can be given any shapes (jax.ffi.ffi_call takes the results' on
// trust), and a wrong one must come back as an XLA error, not as a crash or an access outside a
// buffer. The first check that fails is kept, as "<target>: <what> (got ..., expected ...)";
// later ones are then no-ops. Their arguments are still evaluated, so a handler checks ranks
// first and returns on !ok() before it indexes any dimensions.
class Checks {
 public:
  explicit Checks(const char* target) : target_(target) {}

  bool ok() const { return message_.empty(); }

  ffi::Error Result() const {
    return ok() ? ffi::Error::Success()
                : ffi::Error(ffi::ErrorCode::kInvalidArgument, message_);
  }

  // Fails with "<what> (got <got>, expected <expected>)" unless `good`; returns ok().
  bool Expect(bool good, const std::string& what, const std::string& got,
              const std::string& expected) {
    if (ok() && !good) {
      message_ = target_ + ": " + what + " (got " + got + ", expected " + expected + ")";
    }
    return ok();
  }

  // `dims` has `rank` dimensions, none of them empty (a scalar: rank 0).
  bool Rank(const std::string& name, Dims dims, size_t rank) {
    bool good = dims.size() == rank &&
                std::all_of(dims.begin(), dims.end(), [](int64_t d) { return d >= 1; });
    return Expect(good, name + " shape", DimsString(dims),
                  "rank " + std::to_string(rank) + " with no empty dimension");
  }

  bool Shape(const std::string& name, Dims dims, const std::vector<int64_t>& expected) {
    bool good = dims.size() == expected.size() &&
                std::equal(dims.begin(), dims.end(), expected.begin());
    return Expect(good, name + " shape", DimsString(dims), DimsString(expected));
  }

  // `type` is one of `allowed` (`why`, if given, follows them: "x's").
  bool Type(const std::string& name, ffi::DataType type,
            std::initializer_list<ffi::DataType> allowed, const std::string& why = "") {
    std::string expected;
    for (ffi::DataType t : allowed) expected += (expected.empty() ? "" : " or ") + TypeName(t);
    bool good = std::find(allowed.begin(), allowed.end(), type) != allowed.end();
    return Expect(good, name + " element type", TypeName(type),
                  why.empty() ? expected : expected + ", " + why);
  }

  // lo <= value <= hi; int64 on both sides, so that sums of int32 operands cannot wrap.
  bool InRange(const std::string& what, int64_t value, int64_t lo, int64_t hi) {
    return Expect(lo <= value && value <= hi, what, std::to_string(value),
                  "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }

 private:
  std::string target_, message_;
};

// The address of element `index` of a buffer of any element type.
inline void* ElementAt(const ffi::AnyBuffer& buffer, int64_t index) {
  return static_cast<char*>(buffer.untyped_data()) + index * ffi::ByteWidth(buffer.element_type());
}

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
