// A dense layer's first BatchNorm-ReLU-Conv1x1 on a prefix of its block's feature buffer, and
// its gradients, as XLA FFI handlers (called from densenet_jax/models/scanned_layer.py).
//
// Why: in a scanned block every layer reads the first `width` channels of a buffer whose width
// is the block's, and `width` is only known when the layer runs. Written in XLA, the layer
// read the buffer in fixed-size chunks (padding its last chunk's convolution with zero rows)
// and made several passes over each chunk: BatchNorm-ReLU, the convolution, and in the backward
// pass the recomputed activation, its gradient, the statistics' reductions and the add into
// the buffer's gradient. Here the width is an operand, the 1x1 convolution is one matrix
// product over exactly `width` channels, and the elementwise work is done on blocks of rows
// that stay in the core's cache between the products that read and write them.
//
// With x the buffer's rows (positions) and channels, a and b per-channel BatchNorm factors
// (BatchNorm-ReLU is relu(x * a + b)) and K the layer's [width, out] kernel starting at row
// `offset` of the block's flat kernel:
//   forward:  y = relu(x[:, :width] * a + b) @ K
//   backward: for the output gradient g, with u = x * a + b and d = (g @ K^T) * (u > 0):
//             dx[:, :width] += d * a, da = sum over rows of d * x, db = sum of d,
//             dK += relu(u)^T @ g   (dx and dK are accumulated in place: aliased operands).
// The matrix products are oneDNN's dnnl_sgemm, single-threaded in each part (parts.h).
//
// The buffer x is float32, or a bfloat16 model's buffer passed as its bits in uint16 (the
// scanned block moves its buffer as bits, models/ops.py, and a bfloat16 operand would make XLA
// convert them into a copy of the buffer); everything else, the
// output, the gradients and the arithmetic, is float32. A bfloat16 x is widened as the
// BatchNorm-ReLU reads it, so the products are float32 ones on bfloat16 inputs: at least as
// precise as the chunked path's, which rounds the activation and the kernel to bfloat16 and
// sums in float32, and as fast as the float32 call, with half the buffer's memory traffic.
// (oneDNN 3.2's C API has no bfloat16 matrix product to call here; its matmul primitive
// would need one primitive per layer width.)

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "parts.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using densenet_jax::Checks;
using densenet_jax::Dims;
using densenet_jax::ForEachPart;
using densenet_jax::Guard;

// Rows per block: a block's activation (rows x width floats) is kept near 512 KiB, so that it
// and its gradient stay in a core's L2 cache between the products and the elementwise passes.
int64_t BlockRows(int64_t width) { return std::max<int64_t>(16, (128 * 1024) / width); }

void Gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  dnnl_status_t status =
      dnnl_sgemm(transa, transb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  if (status != dnnl_success) {
    throw std::runtime_error("dnnl_sgemm failed with status " + std::to_string(status));
  }
}

// The buffer's elements as float32: a bfloat16 is the upper half of a float32.
inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// h[r, c] = relu(x[r, c] * a[c] + b[c]) for a block of rows; x has `stride` elements a row.
template <typename T>
__attribute__((always_inline)) inline void NormReluOf(
    const T* __restrict x, int64_t stride, int64_t rows, int64_t width,
    const float* __restrict a, const float* __restrict b, float* __restrict h) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * stride;
    float* __restrict hr = h + r * width;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) hr[c] = std::max(0.0f, Widen(xr[c]) * a[c] + b[c]);
  }
}

// One function per buffer type, each compiled for AVX-512, AVX2 and plain x86-64.
#define DENSENET_NORM_RELU(T)                                                              \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void NormRelu(              \
      const T* __restrict x, int64_t stride, int64_t rows, int64_t width,                  \
      const float* __restrict a, const float* __restrict b, float* __restrict h) {         \
    NormReluOf(x, stride, rows, width, a, b, h);                                           \
  }
DENSENET_NORM_RELU(float)
DENSENET_NORM_RELU(uint16_t)

// The backward pass's elementwise work on a block of rows: dh (the gradient of h, from the
// product with K^T) becomes the gradient of u where u > 0; it is added to dx times a, and to
// the per-channel sums da and db; h is recomputed into `h` for the kernel's gradient.
template <typename T>
__attribute__((always_inline)) inline void NormReluBackwardOf(
    const T* __restrict x, float* __restrict dx, int64_t stride, int64_t rows, int64_t width,
    const float* __restrict a, const float* __restrict b, const float* __restrict dh,
    float* __restrict h, float* __restrict da, float* __restrict db) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * stride;
    float* __restrict dxr = dx + r * stride;
    const float* __restrict dhr = dh + r * width;
    float* __restrict hr = h + r * width;
    // Without the pragma GCC guards the vector loop with an aliasing check that fails here,
    // and the scalar loop's branch on u > 0, mispredicted on random data, is many times slower.
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      float xc = Widen(xr[c]);
      float u = xc * a[c] + b[c];
      float d = u > 0.0f ? dhr[c] : 0.0f;
      hr[c] = std::max(0.0f, u);
      dxr[c] += d * a[c];
      da[c] += d * xc;
      db[c] += d;
    }
  }
}

#define DENSENET_NORM_RELU_BACKWARD(T)                                                     \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void NormReluBackward(      \
      const T* __restrict x, float* __restrict dx, int64_t stride, int64_t rows,           \
      int64_t width, const float* __restrict a, const float* __restrict b,                 \
      const float* __restrict dh, float* __restrict h, float* __restrict da,               \
      float* __restrict db) {                                                              \
    NormReluBackwardOf(x, dx, stride, rows, width, a, b, dh, h, da, db);                   \
  }
DENSENET_NORM_RELU_BACKWARD(float)
DENSENET_NORM_RELU_BACKWARD(uint16_t)

// Calls f with x's elements typed (float or uint16_t, a bfloat16's bits); the checks have
// let only f32 and u16 (bfloat16's bits) through.
template <typename F>
void WithElements(const ffi::AnyBuffer& x, F&& f) {
  if (x.element_type() != ffi::DataType::F32) {
    f(static_cast<const uint16_t*>(x.untyped_data()));
  } else {
    f(static_cast<const float*>(x.untyped_data()));
  }
}

struct Geometry {
  int64_t rows, channels, width, offset, out;
};

// Checks the operands both handlers take, and the output (forward: y; backward: dy), before
// anything is read past their shapes: x [N, H, W, C], f32 or u16 (bfloat16's bits), a and
// b [C], kernels [1, 1,
// rows, out],
// width and offset int32 scalars with 1 <= width <= C and offset + width <= rows (as int64, so
// that no sum of int32s wraps), out [N, H, W, out]. Fills `g` once they pass.
void CheckGeometry(Checks& c, const ffi::AnyBuffer& x_buffer, Dims a, Dims b, Dims kernels,
                   const ffi::Buffer<ffi::S32>& width, const ffi::Buffer<ffi::S32>& offset,
                   const std::string& out_name, Dims out, Geometry* g) {
  Dims x = x_buffer.dimensions();
  if (!(c.Type("x", x_buffer.element_type(),
               {ffi::DataType::F32, ffi::DataType::U16},
               "u16 holding bfloat16's bits") &&
        c.Rank("x", x, 4) && c.Rank("a", a, 1) && c.Rank("b", b, 1) &&
        c.Rank("kernels", kernels, 4) && c.Rank("width", width.dimensions(), 0) &&
        c.Rank("offset", offset.dimensions(), 0) && c.Rank(out_name, out, 4))) {
    return;
  }
  int64_t channels = x[3], rows = kernels[2];
  int64_t w = *width.typed_data(), o = *offset.typed_data();  // scalars: read once checked
  c.Shape("a", a, {channels});
  c.Shape("b", b, {channels});
  c.Shape("kernels", kernels, {1, 1, rows, kernels[3]});
  c.InRange("width", w, 1, channels);
  c.InRange("offset", o, 0, rows - 1);
  c.InRange("offset + width", o + w, 1, rows);
  c.Shape(out_name, out, {x[0], x[1], x[2], kernels[3]});
  *g = Geometry{x[0] * x[1] * x[2], channels, w, o, kernels[3]};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> a,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> kernels,
                       ffi::Buffer<ffi::S32> width, ffi::Buffer<ffi::S32> offset,
                       ffi::ResultBuffer<ffi::F32> y) {
  Geometry g;
  Checks c("densenet_onednn_bottleneck_forward");
  CheckGeometry(c, x, a.dimensions(), b.dimensions(), kernels.dimensions(), width, offset, "y",
                y->dimensions(), &g);
  if (!c.ok()) return c.Result();
  const float* k = kernels.typed_data() + g.offset * g.out;
  return Guard([&] {
    ForEachPart(pool, g.rows, [&](int64_t, int64_t first, int64_t count) {
      int64_t block = std::min(count, BlockRows(g.width));
      std::vector<float> h(block * g.width);
      for (int64_t r = first; r < first + count; r += block) {
        int64_t n = std::min(block, first + count - r);
        WithElements(x, [&](auto* elements) {
          NormRelu(elements + r * g.channels, g.channels, n, g.width, a.typed_data(),
                   b.typed_data(), h.data());
        });
        Gemm('N', 'N', n, g.out, g.width, h.data(), g.width, k, g.out, 0.0f,
             y->typed_data() + r * g.out, g.out);
      }
    });
  });
}

// dx_in/dx and dkernels_in/dkernels are aliased (input_output_aliases in onednn.py): the
// gradients are added to what the reverse scan has accumulated so far.
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> a,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> kernels,
                        ffi::Buffer<ffi::S32> width, ffi::Buffer<ffi::S32> offset,
                        ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dx_in,
                        ffi::Buffer<ffi::F32> dkernels_in, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dkernels, ffi::ResultBuffer<ffi::F32> da,
                        ffi::ResultBuffer<ffi::F32> db) {
  Geometry g;
  Checks c("densenet_onednn_bottleneck_backward");
  CheckGeometry(c, x, a.dimensions(), b.dimensions(), kernels.dimensions(), width, offset,
                "dy", dy.dimensions(), &g);
  if (!c.ok()) return c.Result();
  // The gradients so far and the results (aliased to them, or copies made here) have the
  // shapes of what they are gradients of.
  std::vector<int64_t> x_dims(x.dimensions().begin(), x.dimensions().end()),
      k_dims(kernels.dimensions().begin(), kernels.dimensions().end());
  c.Shape("dx_in", dx_in.dimensions(), x_dims);
  c.Shape("dx", dx->dimensions(), x_dims);
  c.Shape("dkernels_in", dkernels_in.dimensions(), k_dims);
  c.Shape("dkernels", dkernels->dimensions(), k_dims);
  c.Shape("da", da->dimensions(), {g.channels});
  c.Shape("db", db->dimensions(), {g.channels});
  if (!c.ok()) return c.Result();
  if (dx_in.untyped_data() != dx->untyped_data()) {
    std::copy_n(dx_in.typed_data(), dx_in.element_count(), dx->typed_data());
  }
  if (dkernels_in.untyped_data() != dkernels->untyped_data()) {
    std::copy_n(dkernels_in.typed_data(), dkernels_in.element_count(), dkernels->typed_data());
  }
  const float* k = kernels.typed_data() + g.offset * g.out;
  int64_t parts = densenet_jax::NumParts(pool, g.rows);
  // Each part sums its own kernel gradient and per-channel sums; they are added at the end.
  std::vector<std::vector<float>> dk(parts), sum_da(parts), sum_db(parts);
  return Guard([&] {
    ForEachPart(pool, g.rows, [&](int64_t i, int64_t first, int64_t count) {
      int64_t block = std::min(count, BlockRows(g.width));
      std::vector<float> dh(block * g.width), h(block * g.width);
      dk[i].assign(g.width * g.out, 0.0f);
      sum_da[i].assign(g.width, 0.0f);
      sum_db[i].assign(g.width, 0.0f);
      for (int64_t r = first; r < first + count; r += block) {
        int64_t n = std::min(block, first + count - r);
        const float* g_rows = dy.typed_data() + r * g.out;
        Gemm('N', 'T', n, g.width, g.out, g_rows, g.out, k, g.out, 0.0f, dh.data(), g.width);
        WithElements(x, [&](auto* elements) {
          NormReluBackward(elements + r * g.channels, dx->typed_data() + r * g.channels,
                           g.channels, n, g.width, a.typed_data(), b.typed_data(), dh.data(),
                           h.data(), sum_da[i].data(), sum_db[i].data());
        });
        Gemm('T', 'N', g.width, g.out, n, h.data(), g.width, g_rows, g.out, 1.0f,
             dk[i].data(), g.out);
      }
    });
    float* dk_out = dkernels->typed_data() + g.offset * g.out;
    std::fill_n(da->typed_data(), g.channels, 0.0f);
    std::fill_n(db->typed_data(), g.channels, 0.0f);
    for (int64_t i = 0; i < parts; ++i) {
      if (dk[i].empty()) continue;  // a part with no rows
      for (int64_t e = 0; e < g.width * g.out; ++e) dk_out[e] += dk[i][e];
      for (int64_t c = 0; c < g.width; ++c) {
        da->typed_data()[c] += sum_da[i][c];
        db->typed_data()[c] += sum_db[i][c];
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetBottleneckForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x: f32, or bf16's bits (u16)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the flat kernel
                                  .Arg<ffi::Buffer<ffi::S32>>()  // width
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offset
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DensenetBottleneckBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x: f32, or bf16's bits (u16)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the flat kernel
                                  .Arg<ffi::Buffer<ffi::S32>>()  // width
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offset
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dx so far
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dkernels so far
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkernels
                                  .Ret<ffi::Buffer<ffi::F32>>()  // da
                                  .Ret<ffi::Buffer<ffi::F32>>());  // db
