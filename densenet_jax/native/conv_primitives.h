// oneDNN's convolution primitives for onednn_conv.cc's handlers: built once per shape and
// element type and kept (building one takes longer than running a small one), and run on one
// part of a batch. Kernels are reordered into oneDNN's preferred blocked layout on each call:
// they are small next to the activations.

#ifndef DENSENET_JAX_NATIVE_CONV_PRIMITIVES_H_
#define DENSENET_JAX_NATIVE_CONV_PRIMITIVES_H_

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"

namespace densenet_jax {
namespace conv {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

// (batch, input height, input width, in, out, kernel size, stride, padding on every side,
// the activations' and kernel's element type).
using Shape =
    std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, Dt>;

inline dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// The kernel gradient's element type: float32 for every activation type (see the top).
constexpr Dt kGradientType = Dt::f32;

struct Descs {
  memory::desc src, dst, user_weights, any_weights;
  memory::desc user_diff_weights, any_diff_weights;
  memory::dims strides, padding;
};

inline Descs MakeDescs(const Shape& s) {
  auto [n, h, w, cin, cout, k, stride, pad, dt] = s;
  int64_t out_h = (h + 2 * pad - k) / stride + 1, out_w = (w + 2 * pad - k) / stride + 1;
  return Descs{memory::desc({n, cin, h, w}, dt, Tag::nhwc),
               memory::desc({n, cout, out_h, out_w}, dt, Tag::nhwc),
               memory::desc({cout, cin, k, k}, dt, Tag::hwio),
               memory::desc({cout, cin, k, k}, dt, Tag::any),
               memory::desc({cout, cin, k, k}, kGradientType, Tag::hwio),
               memory::desc({cout, cin, k, k}, kGradientType, Tag::any),
               {stride, stride},
               {pad, pad}};
}

inline dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// With `accumulate`, the primitive adds its result to what the output already holds (oneDNN's
// sum post-op), in the same pass that writes it.
inline dnnl::convolution_forward::primitive_desc ForwardPd(const Shape& s,
                                                          bool accumulate = false) {
  Descs d = MakeDescs(s);
  dnnl::primitive_attr attr = UserScratchpad();
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
      d.any_weights, d.dst, d.strides, d.padding, d.padding, attr);
}

// One operation for one shape: its primitive, and the reorder between the user's HWIO
// kernel and the primitive's kernel layout (absent when they are the same).
struct Op {
  dnnl::primitive primitive;
  memory::desc weights;  // the primitive's kernel (or kernel gradient) layout
  memory::desc scratchpad;
  std::unique_ptr<dnnl::reorder> weights_reorder;
  std::string implementation;  // oneDNN's name for the kernel it chose ("brg:avx512_core", ...)
};

enum class Kind { kForward, kForwardAccumulate, kBackwardData, kBackwardWeights };

inline std::unique_ptr<Op> BuildOp(Kind kind, const Shape& s) {
  Descs d = MakeDescs(s);
  auto fwd = ForwardPd(s);
  auto op = std::make_unique<Op>();
  bool to_primitive = true;  // the kernel is reordered into the primitive's layout
  switch (kind) {
    case Kind::kForward:
    case Kind::kForwardAccumulate: {
      auto pd = kind == Kind::kForward ? fwd : ForwardPd(s, /*accumulate=*/true);
      op->primitive = dnnl::convolution_forward(pd);
      op->weights = pd.weights_desc();
      op->scratchpad = pd.scratchpad_desc();
      op->implementation = pd.impl_info_str();
      break;
    }
    case Kind::kBackwardData: {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, d.src, d.any_weights, d.dst, d.strides,
          d.padding, d.padding, fwd, UserScratchpad());
      op->primitive = dnnl::convolution_backward_data(pd);
      op->weights = pd.weights_desc();
      op->scratchpad = pd.scratchpad_desc();
      op->implementation = pd.impl_info_str();
      break;
    }
    case Kind::kBackwardWeights: {
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, d.src, d.any_diff_weights, d.dst,
          d.strides, d.padding, d.padding, fwd, UserScratchpad());
      op->primitive = dnnl::convolution_backward_weights(pd);
      op->weights = pd.diff_weights_desc();
      op->scratchpad = pd.scratchpad_desc();
      op->implementation = pd.impl_info_str();
      to_primitive = false;  // the gradient is reordered back into HWIO
      break;
    }
  }
  const memory::desc& user = to_primitive ? d.user_weights : d.user_diff_weights;
  if (op->weights != user) {
    dnnl::reorder::primitive_desc rpd =
        to_primitive ? dnnl::reorder::primitive_desc(Engine(), user, Engine(), op->weights)
                     : dnnl::reorder::primitive_desc(Engine(), op->weights, Engine(), user);
    op->weights_reorder = std::make_unique<dnnl::reorder>(rpd);
  }
  return op;
}

inline const Op& GetOp(Kind kind, const Shape& s) {
  static std::mutex* mu = new std::mutex;
  static auto* ops = new std::map<std::tuple<Kind, Shape>, std::unique_ptr<Op>>;
  std::lock_guard<std::mutex> lock(*mu);
  auto key = std::make_tuple(kind, s);
  auto it = ops->find(key);
  if (it == ops->end()) it = ops->emplace(key, BuildOp(kind, s)).first;
  return *it->second;
}

// Owned scratch memory for one call, freed when it goes out of scope.
struct Scratch {
  std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
  memory Make(const memory::desc& desc) {
    size_t bytes = desc.get_size();
    if (bytes == 0) return memory(desc, Engine(), nullptr);
    data.reset(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    return memory(desc, Engine(), data.get());
  }
};

inline void Run(Kind kind, const Shape& s, void* src, void* weights, void* dst) {
  const Op& op = GetOp(kind, s);
  Descs d = MakeDescs(s);
  dnnl::stream stream(Engine());
  Scratch scratch_pad, scratch_weights;
  memory user_weights(kind == Kind::kBackwardWeights ? d.user_diff_weights : d.user_weights,
                      Engine(), weights);
  memory op_weights = op.weights_reorder ? scratch_weights.Make(op.weights) : user_weights;
  if (op.weights_reorder && kind != Kind::kBackwardWeights) {
    op.weights_reorder->execute(stream, user_weights, op_weights);
  }
  memory src_mem(d.src, Engine(), src), dst_mem(d.dst, Engine(), dst);
  memory pad = scratch_pad.Make(op.scratchpad);
  switch (kind) {
    case Kind::kForward:
    case Kind::kForwardAccumulate:
      op.primitive.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, op_weights},
                                    {DNNL_ARG_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, pad}});
      break;
    case Kind::kBackwardData:
      op.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src_mem},
                                    {DNNL_ARG_WEIGHTS, op_weights},
                                    {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, pad}});
      break;
    case Kind::kBackwardWeights:
      op.primitive.execute(stream, {{DNNL_ARG_SRC, src_mem},
                                    {DNNL_ARG_DIFF_WEIGHTS, op_weights},
                                    {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, pad}});
      if (op.weights_reorder) op.weights_reorder->execute(stream, op_weights, user_weights);
      break;
  }
  stream.wait();
}

// Whether this CPU has bfloat16 instructions and oneDNN builds its own (not its reference)
// kernels for a bfloat16 convolution's three operations. Without the instructions oneDNN
// emulates bfloat16 with AVX-512 integer arithmetic; that was not measured (this project's CPUs
// have them), so such CPUs keep the path that was: XLA's bfloat16 convolutions.
inline bool Bfloat16Kernels() {
  unsigned isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto has = [isa](dnnl::cpu_isa feature) {
    unsigned bits = static_cast<unsigned>(feature);
    return (isa & bits) == bits;
  };
  if (!(has(dnnl::cpu_isa::avx512_core_bf16) || has(dnnl::cpu_isa::avx2_vnni_2))) return false;
  try {
    for (Kind kind : {Kind::kForward, Kind::kBackwardData, Kind::kBackwardWeights}) {
      Shape s(2, 8, 8, 32, 32, 3, 1, 1, Dt::bf16);
      if (GetOp(kind, s).implementation.rfind("ref", 0) == 0) return false;
    }
  } catch (const dnnl::error&) {
    return false;
  }
  return true;
}

}  // namespace conv
}  // namespace densenet_jax

#endif  // DENSENET_JAX_NATIVE_CONV_PRIMITIVES_H_
