// The experts' whole feed-forward network in one XLA FFI custom call each way, on rows sorted by
// expert (group_sizes [E] int32, read on the host as in cblas_gemm.cc):
//
//   forward:   rows = x[row_token],  h = rows wi[e],  g = rows wg[e] (gated only),
//              a = act(g) * h (gated) or act(h),  y = a wo[e]
//              x [T, D] (tokens), row_token [N] int32, wi, wg [E, D, F], wo [E, F, D]
//              -> y [N, D], and h, g [N, F] for the backward
//   backward:  dy [N, D] and the forward's h, g -> dx [T, D] (each token's rows summed), dwi, dwg
//              [E, D, F], dwo [E, F, D]
//
// Why one call instead of a grouped matmul per weight and XLA's elementwise ops between them: the
// sgemms of a stage go to the library in one batched call (both input projections together, the
// weight and input gradients together), the activation and its gradient run in this file over
// rows that a batched call has just written, and the hidden-sized temporaries (a, and the
// backward's da, dh, dg) live in buffers this file keeps from call to call. XLA allocates its own
// temporaries afresh for every step, and at 32 experts of 256 rows each the first writes to that
// memory (page faults, zeroing) cost the grouped matmuls 2-4x their time (README, "MoE layer speed").
//
// act: 0 gelu (the tanh approximation, as jax.nn.gelu), 1 relu, 2 silu. Rows after the last group
// get zeros, as do the weight gradients of experts without rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "cblas_common.h"

namespace {

using namespace glam;  // NOLINT: this file's kernels are glam's

enum Activation : int32_t { kGelu = 0, kRelu = 1, kSilu = 2 };
using Index = ffi::Buffer<ffi::S32, 1>;  // [N] each row's token

// exp(x) for float, written so that the loops below vectorize: Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (Cephes expf's coefficients) and
// 2^n from the exponent bits. About 1 ulp on [-87, 88]; inputs are clamped there.
inline __attribute__((always_inline)) float Exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline __attribute__((always_inline)) float Sigmoid(float x) { return 1.0f / (1.0f + Exp(-x)); }

// gelu(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
constexpr float kGeluScale = 2.0f * 0.7978845608028654f;  // 2 sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

// act(x) and act'(x), one activation per instantiation so that the loops below have no branch on it.
template <int kAct>
inline __attribute__((always_inline)) void Act(float x, float* value, float* slope) {
  if (kAct == kRelu) {
    *value = x > 0.0f ? x : 0.0f;
    *slope = x > 0.0f ? 1.0f : 0.0f;  // 0 at 0, as jax.nn.relu's gradient
  } else if (kAct == kSilu) {
    const float s = Sigmoid(x);
    *value = x * s;
    *slope = s * (1.0f + x * (1.0f - s));
  } else {
    const float s = Sigmoid(kGeluScale * (x + kGeluCubic * x * x * x));
    *value = x * s;
    *slope = s + x * s * (1.0f - s) * kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  }
}

// a = act(g) * h (gated) or act(h), for n elements.
template <int kAct>
inline __attribute__((always_inline)) void ForwardLoop(const float* h, const float* g, float* a, int64_t n) {
  float value, slope;
  if (g != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      Act<kAct>(g[i], &value, &slope);
      a[i] = value * h[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      Act<kAct>(h[i], &value, &slope);
      a[i] = value;
    }
  }
}

// From da (overwritten with dh): gated dh = da act(g), dg = da h act'(g); plain dh = da act'(h).
template <int kAct>
inline __attribute__((always_inline)) void BackwardLoop(const float* h, const float* g, float* da_dh, float* dg,
                                                        int64_t n) {
  float value, slope;
  if (g != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      Act<kAct>(g[i], &value, &slope);
      const float da = da_dh[i];
      da_dh[i] = da * value;
      dg[i] = da * h[i] * slope;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      Act<kAct>(h[i], &value, &slope);
      da_dh[i] = da_dh[i] * slope;
    }
  }
}

// The loops, compiled for AVX-512, AVX2 and baseline x86-64, one picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GLAM_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GLAM_VECTOR_CLONES
#endif

GLAM_VECTOR_CLONES void ActivationForward(int act, const float* h, const float* g, float* a, int64_t n) {
  if (act == kRelu) return ForwardLoop<kRelu>(h, g, a, n);
  if (act == kSilu) return ForwardLoop<kSilu>(h, g, a, n);
  return ForwardLoop<kGelu>(h, g, a, n);
}

GLAM_VECTOR_CLONES void ActivationBackward(int act, const float* h, const float* g, float* da_dh, float* dg,
                                           int64_t n) {
  if (act == kRelu) return BackwardLoop<kRelu>(h, g, da_dh, dg, n);
  if (act == kSilu) return BackwardLoop<kSilu>(h, g, da_dh, dg, n);
  return BackwardLoop<kGelu>(h, g, da_dh, dg, n);
}

// Hidden-sized buffers kept between calls, so that a step's temporaries are memory the process has
// touched before. A buffer goes back to the pool when its call ends; the pool holds at most what
// the calls running at once needed.
class ScratchPool {
 public:
  class Buffer {
   public:
    Buffer(ScratchPool* pool, std::vector<float> data) : pool_(pool), data_(std::move(data)) {}
    Buffer(const Buffer&) = delete;
    ~Buffer() { pool_->Give(std::move(data_)); }
    float* data() { return data_.data(); }

   private:
    ScratchPool* pool_;
    std::vector<float> data_;
  };

  Buffer Take(size_t size) {
    std::vector<float> data;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->size() >= size && (best == free_.end() || it->size() < best->size())) best = it;
      }
      if (best != free_.end()) {
        data = std::move(*best);
        free_.erase(best);
      }
    }
    if (data.size() < size) data.resize(size);
    return Buffer(this, std::move(data));
  }

 private:
  void Give(std::vector<float> data) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(data));
  }

  std::mutex mu_;
  std::vector<std::vector<float>> free_;
};

ScratchPool& Scratch() {
  static ScratchPool* pool = new ScratchPool();  // never destroyed: calls may run at exit
  return *pool;
}

struct Groups {
  std::vector<int64_t> starts, counts;
  int64_t used;
};

Groups Bounds(Sizes sizes, int64_t rows) {
  Groups groups;
  const int64_t experts = sizes.dimensions()[0];
  groups.starts.resize(experts);
  groups.counts.resize(experts);
  groups.used = GroupStarts(sizes, rows, groups.starts.data(), groups.counts.data());
  return groups;
}

void ZeroRows(float* data, int64_t from, int64_t rows, int64_t cols) {
  std::memset(data + from * cols, 0, sizeof(float) * (rows - from) * cols);
}

void ZeroEmptyExperts(const Groups& groups, float* w, int64_t per_expert) {
  for (size_t e = 0; e < groups.counts.size(); ++e) {
    if (groups.counts[e] == 0) std::memset(w + e * per_expert, 0, sizeof(float) * per_expert);
  }
}

bool Matches(Rows x, Stack wi, const Stack* wg, Stack wo, Sizes sizes, int64_t* d, int64_t* f) {
  const int64_t experts = sizes.dimensions()[0];
  *d = x.dimensions()[1];
  *f = wi.dimensions()[2];
  auto same = [&](Stack w, int64_t rows, int64_t cols) {
    return w.dimensions()[0] == experts && w.dimensions()[1] == rows && w.dimensions()[2] == cols;
  };
  return same(wi, *d, *f) && (wg == nullptr || same(*wg, *d, *f)) && same(wo, *f, *d);
}

// rows[r] = x[row_token[r]] for the first `used` rows (zeros where the token is out of range): the
// experts' input in expert order, gathered here rather than by XLA, so that it never becomes an XLA
// buffer of its own (the backward gathers it again, which costs less than keeping it).
void GatherRows(Rows x, Index row_token, int64_t used, float* rows) {
  const int64_t tokens = x.dimensions()[0], d = x.dimensions()[1];
  const int32_t* token = row_token.typed_data();
  for (int64_t r = 0; r < used; ++r) {
    if (token[r] >= 0 && token[r] < tokens) {
      std::memcpy(rows + r * d, x.typed_data() + token[r] * d, sizeof(float) * d);
    } else {
      std::memset(rows + r * d, 0, sizeof(float) * d);
    }
  }
}

// dx[t] = the sum of d_rows[r] over the rows r < used whose token is t: the gather's gradient.
void AddRowsToTokens(const float* d_rows, Index row_token, int64_t used, Rows* dx) {
  const int64_t tokens = dx->dimensions()[0], d = dx->dimensions()[1];
  const int32_t* token = row_token.typed_data();
  float* out = dx->typed_data();
  std::memset(out, 0, sizeof(float) * tokens * d);
  for (int64_t r = 0; r < used; ++r) {
    if (token[r] < 0 || token[r] >= tokens) continue;
    float* target = out + token[r] * d;
    const float* source = d_rows + r * d;
    for (int64_t j = 0; j < d; ++j) target[j] += source[j];
  }
}

ffi::Error Forward(Rows x, Index row_token, Stack wi, const Stack* wg, Stack wo, Sizes sizes, Rows* y, Rows* h,
                   Rows* g, int32_t act) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("glam_expert_ffn: no sgemm was set");
  int64_t d, f;
  const int64_t rows = row_token.dimensions()[0];
  if (!Matches(x, wi, wg, wo, sizes, &d, &f) || y->dimensions()[0] != rows || y->dimensions()[1] != d ||
      h->dimensions()[0] != rows || h->dimensions()[1] != f) {
    return ffi::Error::InvalidArgument("glam_expert_ffn: operand shapes do not match");
  }
  const Groups groups = Bounds(sizes, rows);
  const int64_t experts = groups.counts.size(), used = groups.used;
  ScratchPool::Buffer xs = Scratch().Take(used * d), a = Scratch().Take(used * f);
  float *xp = xs.data(), *ap = a.data();
  GatherRows(x, row_token, used, xp);
  float *hp = h->typed_data(), *gp = g ? g->typed_data() : nullptr, *yp = y->typed_data();
  SgemmList inputs;  // h = x wi[e] and g = x wg[e], every expert in one call
  for (int64_t e = 0; e < experts; ++e) {
    const float* xe = xp + groups.starts[e] * d;
    inputs.Add(kNoTrans, kNoTrans, groups.counts[e], f, d, xe, d, wi.typed_data() + e * d * f, f,
               hp + groups.starts[e] * f, f);
    if (wg) {
      inputs.Add(kNoTrans, kNoTrans, groups.counts[e], f, d, xe, d, wg->typed_data() + e * d * f, f,
                 gp + groups.starts[e] * f, f);
    }
  }
  inputs.Run();
  ActivationForward(act, hp, gp, ap, used * f);
  SgemmList outputs;  // y = a wo[e]
  for (int64_t e = 0; e < experts; ++e) {
    outputs.Add(kNoTrans, kNoTrans, groups.counts[e], d, f, ap + groups.starts[e] * f, f,
                wo.typed_data() + e * f * d, d, yp + groups.starts[e] * d, d);
  }
  outputs.Run();
  ZeroRows(yp, used, rows, d);
  ZeroRows(hp, used, rows, f);
  if (gp) ZeroRows(gp, used, rows, f);
  return ffi::Error::Success();
}

ffi::Error Backward(Rows x, Index row_token, Stack wi, const Stack* wg, Stack wo, Sizes sizes, Rows h,
                    const Rows* g, Rows dy, Rows* dx, Stack* dwi, Stack* dwg, Stack* dwo, int32_t act) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("glam_expert_ffn_bwd: no sgemm was set");
  int64_t d, f;
  const int64_t rows = row_token.dimensions()[0];
  if (!Matches(x, wi, wg, wo, sizes, &d, &f) || h.dimensions()[0] != rows || h.dimensions()[1] != f ||
      dy.dimensions()[0] != rows || dy.dimensions()[1] != d || dx->dimensions()[0] != x.dimensions()[0] ||
      dx->dimensions()[1] != d) {
    return ffi::Error::InvalidArgument("glam_expert_ffn_bwd: operand shapes do not match");
  }
  const Groups groups = Bounds(sizes, rows);
  const int64_t experts = groups.counts.size(), used = groups.used;
  const float *hp = h.typed_data(), *gp = g ? g->typed_data() : nullptr;
  const float* dyp = dy.typed_data();
  float *dwip = dwi->typed_data(), *dwop = dwo->typed_data();
  float* dwgp = dwg ? dwg->typed_data() : nullptr;
  ScratchPool::Buffer xs = Scratch().Take(used * d), dxs = Scratch().Take(used * d);
  ScratchPool::Buffer a = Scratch().Take(used * f), da = Scratch().Take(used * f);
  float *xp = xs.data(), *dxp = dxs.data(), *ap = a.data(), *dap = da.data();
  GatherRows(x, row_token, used, xp);
  ActivationForward(act, hp, gp, ap, used * f);  // the forward's a, again
  SgemmList through_wo;  // dwo[e] = a_e^T dy_e, da = dy wo[e]^T
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t start = groups.starts[e], count = groups.counts[e];
    through_wo.Add(kTrans, kNoTrans, f, d, count, ap + start * f, f, dyp + start * d, d, dwop + e * f * d, d);
    through_wo.Add(kNoTrans, kTrans, count, f, d, dyp + start * d, d, wo.typed_data() + e * f * d, d,
                   dap + start * f, f);
  }
  through_wo.Run();
  // da becomes dh; a, no longer needed, becomes dg
  ActivationBackward(act, hp, gp, dap, ap, used * f);
  SgemmList through_wi;  // dwi[e] = x_e^T dh_e, dwg[e] = x_e^T dg_e, dx = dh wi[e]^T
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t start = groups.starts[e], count = groups.counts[e];
    const float* xe = xp + start * d;
    through_wi.Add(kTrans, kNoTrans, d, f, count, xe, d, dap + start * f, f, dwip + e * d * f, f);
    if (wg) through_wi.Add(kTrans, kNoTrans, d, f, count, xe, d, ap + start * f, f, dwgp + e * d * f, f);
    through_wi.Add(kNoTrans, kTrans, count, d, f, dap + start * f, f, wi.typed_data() + e * d * f, f,
                   dxp + start * d, d);
  }
  through_wi.Run();
  if (wg) {
    SgemmList through_wg;  // dx += dg wg[e]^T: after the call above wrote dx
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t start = groups.starts[e], count = groups.counts[e];
      through_wg.Add(kNoTrans, kTrans, count, d, f, ap + start * f, f, wg->typed_data() + e * d * f, f,
                     dxp + start * d, d, 1.0f);
    }
    through_wg.Run();
  }
  AddRowsToTokens(dxp, row_token, used, dx);
  ZeroEmptyExperts(groups, dwip, d * f);
  ZeroEmptyExperts(groups, dwop, f * d);
  if (dwgp) ZeroEmptyExperts(groups, dwgp, d * f);
  return ffi::Error::Success();
}

}  // namespace

namespace ffi = xla::ffi;
using glam::Rows, glam::Sizes, glam::Stack;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GlamExpertFfnGated,
    [](Rows x, Index row_token, Stack wi, Stack wg, Stack wo, Sizes sizes, ffi::Result<Rows> y, ffi::Result<Rows> h,
       ffi::Result<Rows> g, int32_t act) { return Forward(x, row_token, wi, &wg, wo, sizes, &*y, &*h, &*g, act); },
    ffi::Ffi::Bind()
        .Arg<Rows>()
        .Arg<Index>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Sizes>()
        .Ret<Rows>()
        .Ret<Rows>()
        .Ret<Rows>()
        .Attr<int32_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GlamExpertFfn,
    [](Rows x, Index row_token, Stack wi, Stack wo, Sizes sizes, ffi::Result<Rows> y, ffi::Result<Rows> h,
       int32_t act) { return Forward(x, row_token, wi, nullptr, wo, sizes, &*y, &*h, nullptr, act); },
    ffi::Ffi::Bind()
        .Arg<Rows>()
        .Arg<Index>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Sizes>()
        .Ret<Rows>()
        .Ret<Rows>()
        .Attr<int32_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GlamExpertFfnGatedBwd,
    [](Rows x, Index row_token, Stack wi, Stack wg, Stack wo, Sizes sizes, Rows h, Rows g, Rows dy,
       ffi::Result<Rows> dx, ffi::Result<Stack> dwi, ffi::Result<Stack> dwg, ffi::Result<Stack> dwo, int32_t act) {
      return Backward(x, row_token, wi, &wg, wo, sizes, h, &g, dy, &*dx, &*dwi, &*dwg, &*dwo, act);
    },
    ffi::Ffi::Bind()
        .Arg<Rows>()
        .Arg<Index>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Sizes>()
        .Arg<Rows>()
        .Arg<Rows>()
        .Arg<Rows>()
        .Ret<Rows>()
        .Ret<Stack>()
        .Ret<Stack>()
        .Ret<Stack>()
        .Attr<int32_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GlamExpertFfnBwd,
    [](Rows x, Index row_token, Stack wi, Stack wo, Sizes sizes, Rows h, Rows dy, ffi::Result<Rows> dx,
       ffi::Result<Stack> dwi, ffi::Result<Stack> dwo, int32_t act) {
      return Backward(x, row_token, wi, nullptr, wo, sizes, h, nullptr, dy, &*dx, &*dwi, nullptr, &*dwo, act);
    },
    ffi::Ffi::Bind()
        .Arg<Rows>()
        .Arg<Index>()
        .Arg<Stack>()
        .Arg<Stack>()
        .Arg<Sizes>()
        .Arg<Rows>()
        .Arg<Rows>()
        .Ret<Rows>()
        .Ret<Stack>()
        .Ret<Stack>()
        .Attr<int32_t>("activation"));
