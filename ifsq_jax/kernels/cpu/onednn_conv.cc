// 2-D convolutions on CPU through oneDNN, as XLA FFI handlers.
//
// One handler per pass of y = conv(x, w) (no bias); activations channels last
// (NHWC), kernels HWIO, as in JAX:
//   IfsqConvForward:         x (B, H, W, C),    w (kh, kw, C, O) -> y (B, Ho, Wo, O)
//   IfsqConvBackwardData:    dy (B, Ho, Wo, O), w (kh, kw, C, O) -> dx (B, H, W, C)
//   IfsqConvBackwardWeights: x (B, H, W, C),    dy (B, Ho, Wo, O) -> dw (kh, kw, C, O)
// Attributes: stride (both axes), pad_top, pad_bottom, pad_left, pad_right.
// Activations and kernels are float32 or bfloat16; the kernel gradient is
// written in its buffer's type (float32 accumulation inside oneDNN).
//
// oneDNN chooses its own kernel layout; kernels are reordered from (and kernel
// gradients to) HWIO on each call, a small cost next to the convolution.
// Primitives are built once per shape and kept for the life of the process.
//
// IfsqConvCanBuild (a plain C function, called through ctypes at trace time)
// says whether oneDNN can build the three passes of a convolution on this
// processor: oneDNN 3.2 builds no bfloat16 convolution without AVX-512, and JAX
// then keeps XLA's convolution for it.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::data_type OneDnnType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

// Sizes of one convolution; the pass picks the descriptors it needs.
struct Geometry {
  memory::dim b, h, w, c, kh, kw, o, ho, wo, stride, pad_top, pad_bottom, pad_left, pad_right;
  memory::data_type act, wei;  // activations (and kernel); the kernel or its gradient as stored by JAX

  memory::desc Src() const { return {{b, c, h, w}, act, Tag::nhwc}; }
  memory::desc Dst() const { return {{b, o, ho, wo}, act, Tag::nhwc}; }
  memory::desc Weights(memory::data_type dt, Tag tag) const { return {{o, c, kh, kw}, dt, tag}; }
  memory::desc UserWeights() const { return Weights(wei, Tag::hwio); }

  std::string Key(const char* pass) const {
    std::ostringstream key;
    key << pass;
    for (auto v : {b, h, w, c, kh, kw, o, ho, wo, stride, pad_top, pad_bottom, pad_left, pad_right}) key << ',' << v;
    key << ',' << static_cast<int>(act) << ',' << static_cast<int>(wei);
    return key.str();
  }

  dnnl::primitive_attr Attr() const {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // one scratchpad per call: safe across threads
    return attr;
  }

  dnnl::convolution_forward::primitive_desc Forward() const {
    return {Engine(),
            dnnl::prop_kind::forward_training,
            dnnl::algorithm::convolution_direct,
            Src(),
            Weights(act, Tag::any),
            Dst(),
            {stride, stride},
            {pad_top, pad_left},
            {pad_bottom, pad_right},
            Attr()};
  }
  dnnl::convolution_backward_data::primitive_desc BackwardData() const {
    return {Engine(), dnnl::algorithm::convolution_direct, Src(), Weights(act, Tag::any), Dst(),
            {stride, stride}, {pad_top, pad_left}, {pad_bottom, pad_right}, Forward(), Attr()};
  }
  dnnl::convolution_backward_weights::primitive_desc BackwardWeights() const {
    return {Engine(), dnnl::algorithm::convolution_direct, Src(), Weights(wei, Tag::any), Dst(),
            {stride, stride}, {pad_top, pad_left}, {pad_bottom, pad_right}, Forward(), Attr()};
  }
};

// A convolution primitive, its scratchpad size, and the reorder between its
// kernel layout and HWIO when they differ.
struct Plan {
  dnnl::primitive conv;
  memory::desc scratchpad;
  memory::desc weights;
  std::unique_ptr<dnnl::reorder> reorder;
};

template <typename PrimitiveDesc, typename Primitive>
std::shared_ptr<Plan> MakePlan(const PrimitiveDesc& pd, memory::desc weights, const memory::desc& user,
                               bool to_user) {
  auto plan = std::make_shared<Plan>(Plan{Primitive(pd), pd.scratchpad_desc(), weights, nullptr});
  if (weights != user) {
    auto from = to_user ? weights : user, to = to_user ? user : weights;
    plan->reorder = std::make_unique<dnnl::reorder>(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(const std::string& key, const std::function<std::shared_ptr<Plan>()>& build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Plan>> plans;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = plans.find(key);
    if (it != plans.end()) return it->second;
  }
  auto plan = build();
  std::lock_guard<std::mutex> lock(mutex);
  return plans.emplace(key, plan).first->second;
}

// x: input dims, k: kernel dims, y: output dims (NHWC, HWIO, NHWC).
ffi::Error MakeGeometry(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions k, ffi::AnyBuffer::Dimensions y,
                        ffi::DataType act, ffi::DataType wei, int64_t stride, int64_t pad_top, int64_t pad_bottom,
                        int64_t pad_left, int64_t pad_right, Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("oneDNN conv: needs rank-4 NHWC activations and an HWIO kernel");
  }
  if (k[2] != x[3] || y[0] != x[0] || y[3] != k[3]) {
    return ffi::Error::InvalidArgument("oneDNN conv: input, kernel and output shapes disagree");
  }
  *g = Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], stride, pad_top, pad_bottom, pad_left,
                pad_right, OneDnnType(act), OneDnnType(wei)};
  if (g->act == memory::data_type::undef || g->wei == memory::data_type::undef) {
    return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 buffers only");
  }
  return ffi::Error::Success();
}

ffi::Error Execute(const std::function<void(dnnl::stream&)>& body) {
  try {
    dnnl::stream stream(Engine());
    body(stream);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

// The kernel in the primitive's layout: the user's buffer itself, or a reordered copy.
memory KernelIn(const Plan& plan, memory& user, dnnl::stream& stream) {
  if (!plan.reorder) return user;
  memory kernel(plan.weights, Engine());
  plan.reorder->execute(stream, user, kernel);
  return kernel;
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t stride,
                       int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g;
  auto err = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(), w.element_type(),
                          stride, pad_top, pad_bottom, pad_left, pad_right, &g);
  if (err.failure()) return err;
  return Execute([&](dnnl::stream& stream) {
    auto plan = GetPlan(g.Key("forward"), [&] {
      auto pd = g.Forward();
      return MakePlan<decltype(pd), dnnl::convolution_forward>(pd, pd.weights_desc(), g.UserWeights(), false);
    });
    auto& eng = Engine();
    memory user_w(g.UserWeights(), eng, w.untyped_data());
    memory kernel = KernelIn(*plan, user_w, stream);
    plan->conv.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), eng, x.untyped_data())},
                                {DNNL_ARG_WEIGHTS, kernel},
                                {DNNL_ARG_DST, memory(g.Dst(), eng, y->untyped_data())},
                                {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, eng)}});
  });
}

ffi::Error BackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t stride,
                            int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g;
  auto err = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dy.element_type(), w.element_type(),
                          stride, pad_top, pad_bottom, pad_left, pad_right, &g);
  if (err.failure()) return err;
  return Execute([&](dnnl::stream& stream) {
    auto plan = GetPlan(g.Key("backward_data"), [&] {
      auto pd = g.BackwardData();
      return MakePlan<decltype(pd), dnnl::convolution_backward_data>(pd, pd.weights_desc(), g.UserWeights(), false);
    });
    auto& eng = Engine();
    memory user_w(g.UserWeights(), eng, w.untyped_data());
    memory kernel = KernelIn(*plan, user_w, stream);
    plan->conv.execute(stream, {{DNNL_ARG_DIFF_DST, memory(g.Dst(), eng, dy.untyped_data())},
                                {DNNL_ARG_WEIGHTS, kernel},
                                {DNNL_ARG_DIFF_SRC, memory(g.Src(), eng, dx->untyped_data())},
                                {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, eng)}});
  });
}

ffi::Error BackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, int64_t stride,
                               int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g;
  auto err = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), x.element_type(), dw->element_type(),
                          stride, pad_top, pad_bottom, pad_left, pad_right, &g);
  if (err.failure()) return err;
  return Execute([&](dnnl::stream& stream) {
    auto plan = GetPlan(g.Key("backward_weights"), [&] {
      auto pd = g.BackwardWeights();
      return MakePlan<decltype(pd), dnnl::convolution_backward_weights>(pd, pd.diff_weights_desc(),
                                                                         g.UserWeights(), true);
    });
    auto& eng = Engine();
    memory user_dw(g.UserWeights(), eng, dw->untyped_data());
    memory kernel_grad = plan->reorder ? memory(plan->weights, eng) : user_dw;
    plan->conv.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), eng, x.untyped_data())},
                                {DNNL_ARG_DIFF_DST, memory(g.Dst(), eng, dy.untyped_data())},
                                {DNNL_ARG_DIFF_WEIGHTS, kernel_grad},
                                {DNNL_ARG_SCRATCHPAD, memory(plan->scratchpad, eng)}});
    if (plan->reorder) plan->reorder->execute(stream, kernel_grad, user_dw);
  });
}

// The three passes' primitive descriptors and kernel reorders of one convolution; throws dnnl::error.
void BuildAll(const Geometry& forward_geometry) {
  Geometry weights_geometry = forward_geometry;
  weights_geometry.wei = memory::data_type::f32;  // the kernel gradient is float32 (see kernel_grad in onednn.py)
  auto reorder = [](const memory::desc& a, const memory::desc& b) {
    if (a != b) dnnl::reorder::primitive_desc(Engine(), a, Engine(), b);
  };
  auto forward = forward_geometry.Forward();
  reorder(forward_geometry.UserWeights(), forward.weights_desc());
  auto data = forward_geometry.BackwardData();
  reorder(forward_geometry.UserWeights(), data.weights_desc());
  auto weights = weights_geometry.BackwardWeights();
  reorder(weights.diff_weights_desc(), weights_geometry.UserWeights());
}

}  // namespace

// dtype: 0 float32, 1 bfloat16 (activations and kernel). dims: b, h, w, c, kh, kw, o, ho, wo, stride,
// pad_top, pad_bottom, pad_left, pad_right. Returns 1 when oneDNN builds every pass; otherwise 0, with the
// reason in `why` (NUL-terminated, truncated to why_size bytes).
extern "C" int IfsqConvCanBuild(int dtype, const int64_t* dims, char* why, int64_t why_size) {
  auto fail = [&](const std::string& message) {
    if (why != nullptr && why_size > 0) {
      auto n = std::min<size_t>(message.size(), static_cast<size_t>(why_size - 1));
      std::memcpy(why, message.data(), n);
      why[n] = '\0';
    }
    return 0;
  };
  if (dtype != 0 && dtype != 1) return fail("oneDNN conv: float32 or bfloat16 only");
  auto dt = dtype == 0 ? memory::data_type::f32 : memory::data_type::bf16;
  Geometry g{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9], dims[10],
             dims[11], dims[12], dims[13], dt, dt};
  try {
    BuildAll(g);
  } catch (const dnnl::error& e) {
    return fail(e.what());
  }
  return 1;
}

namespace {

auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IfsqConvForward, ForwardImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(IfsqConvBackwardData, BackwardDataImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(IfsqConvBackwardWeights, BackwardWeightsImpl, ConvBinding());
