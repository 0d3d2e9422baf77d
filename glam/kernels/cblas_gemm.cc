// An XLA:CPU custom call (XLA FFI) that runs float32 matmuls through a CBLAS sgemm (oneMKL's on
// Intel CPUs, OpenBLAS's elsewhere: glam/kernels/cblas.py).
//
// At the train step's shapes XLA:CPU's own dots (YNNPACK, Eigen) took 10-25% longer than oneMKL's
// sgemm on an Intel machine, and 5-18% longer than OpenBLAS's on an AMD one (README, "CBLAS
// matmuls"), and matmuls are most of the step. The sgemm is not linked here: cblas.py loads the
// library and hands its entry points to glam_set_sgemm, so this file builds with nothing but the
// FFI headers that ship with jaxlib.
//
//   c[i] = op(a[i]) @ op(b[i])  for i < batch, op = identity or transpose (attributes)
//   a: [batch, M, K] (or [batch, K, M] when transpose_a), b: [batch, K, N] (or [batch, N, K]),
//   c: [batch, M, N]; all row-major (XLA's default layout for custom-call operands).
//
// And a grouped (ragged) matmul for the dropless experts, rows sorted by expert, one sgemm per
// expert over exactly its rows (no padding, nothing dropped; what ragged_dot is on GPU/TPU):
//   glam_cblas_grouped_gemm:   y[rows of e] = x[rows of e] @ op(w[e]),  x [N, K], w [E, K, F]
//                              (or [E, F, K] when transpose_w), y [N, F]
//   glam_cblas_grouped_outer:  dw[e] = x[rows of e]^T @ dy[rows of e],  dw [E, K, F]
// group_sizes [E] int32 are read on the host (XLA:CPU buffers are host memory); rows after the
// last group get zeros, as do experts without rows.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cblas_common.h"

namespace glam {

Sgemm g_sgemm = nullptr;
SgemmBatchStrided g_sgemm_batch_strided = nullptr;
SgemmBatch g_sgemm_batch = nullptr;

}  // namespace glam

namespace {

using namespace glam;  // NOLINT: this file's kernels are glam's

ffi::Error Gemm(Stack a, Stack b, ffi::Result<Stack> c, bool transpose_a, bool transpose_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("glam_cblas_gemm: no sgemm was set");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t batch = cd[0], m = cd[1], n = cd[2];
  const int64_t k = transpose_a ? ad[1] : ad[2];
  if (ad[0] != batch || bd[0] != batch || (transpose_a ? ad[2] : ad[1]) != m ||
      (transpose_b ? bd[2] : bd[1]) != k || (transpose_b ? bd[1] : bd[2]) != n) {
    return ffi::Error::InvalidArgument("glam_cblas_gemm: operand shapes do not match the result");
  }
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  const int trans_a = transpose_a ? kTrans : kNoTrans, trans_b = transpose_b ? kTrans : kNoTrans;
  if (batch > 1 && g_sgemm_batch_strided != nullptr) {
    g_sgemm_batch_strided(kRowMajor, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n),
                          static_cast<int>(k), 1.0f, ap, static_cast<int>(ad[2]),
                          static_cast<int>(ad[1] * ad[2]), bp, static_cast<int>(bd[2]),
                          static_cast<int>(bd[1] * bd[2]), 0.0f, cp, static_cast<int>(n),
                          static_cast<int>(m * n), static_cast<int>(batch));
    return ffi::Error::Success();
  }
  for (int64_t i = 0; i < batch; ++i) {
    // Leading dimensions are the row lengths as stored, whatever the transposition.
    g_sgemm(kRowMajor, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
            ap + i * ad[1] * ad[2], static_cast<int>(ad[2]), bp + i * bd[1] * bd[2],
            static_cast<int>(bd[2]), 0.0f, cp + i * m * n, static_cast<int>(n));
  }
  return ffi::Error::Success();
}

ffi::Error GroupedGemm(Rows x, Stack w, Sizes sizes, ffi::Result<Rows> y, bool transpose_w) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("glam_cblas_grouped_gemm: no sgemm was set");
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const int64_t rows = xd[0], k = xd[1], n = yd[1], groups = wd[0];
  if (yd[0] != rows || sizes.dimensions()[0] != groups || (transpose_w ? wd[2] : wd[1]) != k ||
      (transpose_w ? wd[1] : wd[2]) != n) {
    return ffi::Error::InvalidArgument("glam_cblas_grouped_gemm: operand shapes do not match");
  }
  std::vector<int64_t> starts(groups), counts(groups);
  const int64_t used = GroupStarts(sizes, rows, starts.data(), counts.data());
  float* yp = y->typed_data();
  SgemmList list;
  for (int64_t e = 0; e < groups; ++e) {
    if (counts[e] == 0) continue;
    list.Add(kNoTrans, transpose_w ? kTrans : kNoTrans, counts[e], n, k, x.typed_data() + starts[e] * k, k,
             w.typed_data() + e * wd[1] * wd[2], wd[2], yp + starts[e] * n, n);
  }
  list.Run();
  std::memset(yp + used * n, 0, sizeof(float) * (rows - used) * n);
  return ffi::Error::Success();
}

ffi::Error GroupedOuter(Rows x, Rows dy, Sizes sizes, ffi::Result<Stack> dw) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("glam_cblas_grouped_outer: no sgemm was set");
  auto xd = x.dimensions(), dyd = dy.dimensions(), dwd = dw->dimensions();
  const int64_t rows = xd[0], k = xd[1], n = dyd[1], groups = dwd[0];
  if (dyd[0] != rows || sizes.dimensions()[0] != groups || dwd[1] != k || dwd[2] != n) {
    return ffi::Error::InvalidArgument("glam_cblas_grouped_outer: operand shapes do not match");
  }
  std::vector<int64_t> starts(groups), counts(groups);
  GroupStarts(sizes, rows, starts.data(), counts.data());
  float* dwp = dw->typed_data();
  SgemmList list;
  for (int64_t e = 0; e < groups; ++e) {
    float* out = dwp + e * k * n;
    if (counts[e] == 0) {
      std::memset(out, 0, sizeof(float) * k * n);
      continue;
    }
    list.Add(kTrans, kNoTrans, k, n, counts[e], x.typed_data() + starts[e] * k, k,
             dy.typed_data() + starts[e] * n, n, out, n);
  }
  list.Run();
  return ffi::Error::Success();
}

}  // namespace

extern "C" void glam_set_sgemm(void* sgemm, void* sgemm_batch_strided, void* sgemm_batch) {
  glam::g_sgemm = reinterpret_cast<glam::Sgemm>(sgemm);
  glam::g_sgemm_batch_strided = reinterpret_cast<glam::SgemmBatchStrided>(sgemm_batch_strided);
  glam::g_sgemm_batch = reinterpret_cast<glam::SgemmBatch>(sgemm_batch);
}

namespace ffi = xla::ffi;
using glam::Rows, glam::Sizes, glam::Stack;

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlamCblasGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<Stack>()
                                  .Arg<Stack>()
                                  .Ret<Stack>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlamCblasGroupedGemm, GroupedGemm,
                              ffi::Ffi::Bind()
                                  .Arg<Rows>()
                                  .Arg<Stack>()
                                  .Arg<Sizes>()
                                  .Ret<Rows>()
                                  .Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlamCblasGroupedOuter, GroupedOuter,
                              ffi::Ffi::Bind().Arg<Rows>().Arg<Rows>().Arg<Sizes>().Ret<Stack>());
