// Convolutions and their two gradients through oneDNN, as XLA FFI handlers.
//
// XLA:CPU runs convolutions with Eigen (or YNNPACK) and differentiates them as further
// convolutions; PyTorch runs the same three operations through oneDNN's JIT kernels, which
// is most of why torchvision's DenseNets trained as fast as ours on a 2-core CPU. These
// handlers give the train step oneDNN's kernels for NHWC activations and HWIO kernels,
// the layouts our models already use, so nothing is transposed around the calls.
//
// Element types: activations, kernels and their gradients are all float32, or all bfloat16,
// except the kernel gradient, which is float32 either way: oneDNN accumulates it in float32
// over every position of the batch, and the parameters it updates are float32, so rounding it
// to bfloat16 would only lose precision. Where bfloat16 is taken is decided in onednn.py
// (`dtypes`), from what this CPU runs natively (`DensenetOnednnBfloat16Kernels` below).
//
// Threads: this oneDNN build parallelises with OpenMP, and inside an XLA program its thread
// team competed with XLA's own threads for the cores (XLA runs independent operations
// concurrently): DenseNet-BC-100's step was no faster than with XLA's convolutions. So each
// call splits its batch into as many parts as XLA's intra-op thread pool has threads, runs
// every part single-threaded, the calling thread taking parts too, and parts that no pool
// thread has picked up by then run on the calling thread: no thread waits for a busy core.
//
// The oneDNN primitives themselves are built and run in conv_primitives.h.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "conv_primitives.h"
#include "parts.h"

namespace ffi = xla::ffi;

namespace {

using densenet_jax::Checks;
using densenet_jax::Dims;
using densenet_jax::DimsString;
using densenet_jax::ElementAt;
using densenet_jax::ForEachPart;
using densenet_jax::Guard;

using densenet_jax::conv::Bfloat16Kernels;
using densenet_jax::conv::Dt;
using densenet_jax::conv::Kind;
using densenet_jax::conv::Run;
using densenet_jax::conv::Shape;

// oneDNN's name for an element type the checks have let through (f32 or bf16).
Dt OnednnType(ffi::DataType type) { return type == ffi::DataType::BF16 ? Dt::bf16 : Dt::f32; }

// `src`: the convolution's input (or input gradient) dimensions; `type`: the activations'.
Shape ShapeOf(ffi::Span<const int64_t> src, ffi::Span<const int64_t> kernel, int64_t batch,
              int64_t stride, int64_t padding, ffi::DataType type) {
  return Shape(batch, src[1], src[2], kernel[2], kernel[3], kernel[0], stride, padding,
               OnednnType(type));
}

// Elements per image of an NHWC array.
int64_t ImageSize(ffi::Span<const int64_t> dims) { return dims[1] * dims[2] * dims[3]; }

// The activation types the handlers take; the kernel and the other activations must match.
constexpr std::initializer_list<ffi::DataType> kActivationTypes = {ffi::DataType::F32,
                                                                    ffi::DataType::BF16};

// Checks element types first, so that the sizes computed from them are right: `first` is one
// of the activation types, and every buffer of `same` has its type.
bool CheckTypes(Checks& c, const std::string& first_name, ffi::DataType first,
                std::initializer_list<std::pair<std::string, ffi::DataType>> same) {
  if (!c.Type(first_name, first, kActivationTypes)) return false;
  for (const auto& [name, type] : same) c.Type(name, type, {first}, first_name + "'s");
  return c.ok();
}

struct Named {
  std::string name;
  Dims dims;
};

// Checks a convolution's operands before anything is read or written: `src` [N, H, W, in] (x,
// or dx for the input gradient), `kernel` [k, k, in, out] square and odd-sized, `dst` [N,
// out_h, out_w, out] (y, acc or the output gradient g) with out_h and out_w as the stride and
// padding make them; stride >= 1, 0 <= padding < k ('same', k / 2, where `padding` is empty),
// the kernel no larger than the padded input. Returns the padding.
int64_t CheckConv(Checks& c, const Named& src, const Named& kernel, const Named& dst,
                  int64_t stride, std::optional<int64_t> padding) {
  if (!(c.Rank(src.name, src.dims, 4) && c.Rank(kernel.name, kernel.dims, 4) &&
        c.Rank(dst.name, dst.dims, 4))) {
    return 0;
  }
  int64_t k = kernel.dims[0], pad = padding.value_or(k / 2);
  c.Expect(kernel.dims[1] == k && k % 2 == 1, kernel.name + " not square and odd-sized",
           DimsString(kernel.dims), "[k, k, in, out] with k odd");
  c.Expect(stride >= 1, "stride", std::to_string(stride), "at least 1");
  c.InRange("padding", pad, 0, k - 1);
  if (!c.ok()) return 0;  // the sums below are safe from here on
  c.Expect(kernel.dims[2] == src.dims[3], kernel.name + " input channels",
           std::to_string(kernel.dims[2]), std::to_string(src.dims[3]) + ", " + src.name + "'s");
  int64_t h = src.dims[1] + 2 * pad, w = src.dims[2] + 2 * pad;
  c.Expect(k <= std::min(h, w), kernel.name + " larger than the padded " + src.name,
           std::to_string(k), "at most " + DimsString(std::vector<int64_t>{h, w}));
  if (!c.ok()) return 0;
  c.Shape(dst.name, dst.dims,
          {src.dims[0], (h - k) / stride + 1, (w - k) / stride + 1, kernel.dims[3]});
  return pad;
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer kernel,
                       ffi::Result<ffi::AnyBuffer> y, int64_t stride, int64_t padding) {
  Checks c("densenet_onednn_conv_forward");
  if (!CheckTypes(c, "x", x.element_type(),
                  {{"kernel", kernel.element_type()}, {"y", y->element_type()}})) {
    return c.Result();
  }
  CheckConv(c, {"x", x.dimensions()}, {"kernel", kernel.dimensions()}, {"y", y->dimensions()},
            stride, padding);
  if (!c.ok()) return c.Result();
  int64_t x_size = ImageSize(x.dimensions()), y_size = ImageSize(y->dimensions());
  return Guard([&] {
    ForEachPart(pool, x.dimensions()[0], [&](int64_t, int64_t first, int64_t count) {
      Run(Kind::kForward,
          ShapeOf(x.dimensions(), kernel.dimensions(), count, stride, padding, x.element_type()),
          ElementAt(x, first * x_size), kernel.untyped_data(), ElementAt(*y, first * y_size));
    });
  });
}

// y = acc + convolution(x, kernel); y is aliased to acc (input_output_aliases in onednn.py).
ffi::Error ForwardAccumulateImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer kernel,
                                 ffi::AnyBuffer acc, ffi::Result<ffi::AnyBuffer> y) {
  Checks c("densenet_onednn_conv_forward_accumulate");
  if (!CheckTypes(c, "x", x.element_type(),
                  {{"kernel", kernel.element_type()}, {"acc", acc.element_type()},
                   {"y", y->element_type()}})) {
    return c.Result();
  }
  int64_t padding = CheckConv(c, {"x", x.dimensions()}, {"kernel", kernel.dimensions()},
                              {"acc", acc.dimensions()}, 1, std::nullopt);
  // y is acc's buffer, or (where XLA could not alias them) a copy of acc made here.
  c.Shape("y", y->dimensions(),
          std::vector<int64_t>(acc.dimensions().begin(), acc.dimensions().end()));
  if (!c.ok()) return c.Result();
  if (acc.untyped_data() != y->untyped_data()) {
    std::copy_n(static_cast<const char*>(acc.untyped_data()), acc.size_bytes(),
                static_cast<char*>(y->untyped_data()));
  }
  int64_t x_size = ImageSize(x.dimensions()), y_size = ImageSize(y->dimensions());
  return Guard([&] {
    ForEachPart(pool, x.dimensions()[0], [&](int64_t, int64_t first, int64_t count) {
      Run(Kind::kForwardAccumulate,
          ShapeOf(x.dimensions(), kernel.dimensions(), count, 1, padding, x.element_type()),
          ElementAt(x, first * x_size), kernel.untyped_data(), ElementAt(*y, first * y_size));
    });
  });
}

ffi::Error BackwardDataImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer kernel,
                            ffi::Result<ffi::AnyBuffer> dx, int64_t stride, int64_t padding) {
  Checks c("densenet_onednn_conv_backward_data");
  if (!CheckTypes(c, "g", g.element_type(),
                  {{"kernel", kernel.element_type()}, {"dx", dx->element_type()}})) {
    return c.Result();
  }
  CheckConv(c, {"dx", dx->dimensions()}, {"kernel", kernel.dimensions()}, {"g", g.dimensions()},
            stride, padding);
  if (!c.ok()) return c.Result();
  int64_t g_size = ImageSize(g.dimensions()), dx_size = ImageSize(dx->dimensions());
  return Guard([&] {
    ForEachPart(pool, g.dimensions()[0], [&](int64_t, int64_t first, int64_t count) {
      Run(Kind::kBackwardData,
          ShapeOf(dx->dimensions(), kernel.dimensions(), count, stride, padding,
                  g.element_type()),
          ElementAt(*dx, first * dx_size), kernel.untyped_data(), ElementAt(g, first * g_size));
    });
  });
}

ffi::Error BackwardWeightsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                               ffi::Result<ffi::AnyBuffer> dkernel, int64_t stride,
                               int64_t padding) {
  Checks c("densenet_onednn_conv_backward_weights");
  if (!CheckTypes(c, "x", x.element_type(), {{"g", g.element_type()}})) return c.Result();
  c.Type("dkernel", dkernel->element_type(), {ffi::DataType::F32}, "for every x");
  CheckConv(c, {"x", x.dimensions()}, {"dkernel", dkernel->dimensions()}, {"g", g.dimensions()},
            stride, padding);
  if (!c.ok()) return c.Result();
  int64_t x_size = ImageSize(x.dimensions()), g_size = ImageSize(g.dimensions());
  int64_t k_size = dkernel->element_count();
  // Each part's kernel gradient goes to its own buffer (the first part's to the result), and
  // they are summed at the end.
  std::vector<std::vector<float>> partial(std::max<int64_t>(1, x.dimensions()[0]));
  return Guard([&] {
    ForEachPart(pool, x.dimensions()[0], [&](int64_t i, int64_t first, int64_t count) {
      float* out = static_cast<float*>(dkernel->untyped_data());
      if (i > 0) {
        partial[i].resize(k_size);
        out = partial[i].data();
      }
      Run(Kind::kBackwardWeights,
          ShapeOf(x.dimensions(), dkernel->dimensions(), count, stride, padding,
                  x.element_type()),
          ElementAt(x, first * x_size), out, ElementAt(g, first * g_size));
    });
    float* out = static_cast<float*>(dkernel->untyped_data());
    for (size_t i = 1; i < partial.size(); ++i) {
      for (int64_t e = 0; e < static_cast<int64_t>(partial[i].size()); ++e) out[e] += partial[i][e];
    }
  });
}

// The convolutions' handlers: two arrays in, one out (element types checked by the handler),
// the stride and the padding.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("padding");
}

}  // namespace

extern "C" int DensenetOnednnBfloat16Kernels() { return Bfloat16Kernels() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetOnednnConvForward, ForwardImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetOnednnConvForwardAccumulate, ForwardAccumulateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetOnednnConvBackwardData, BackwardDataImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetOnednnConvBackwardWeights, BackwardWeightsImpl,
                              ConvBinding());
