// An XLA:CPU custom call (XLA FFI) that runs float32 matmuls through a CBLAS sgemm (oneMKL's).
//
// At the train step's shapes XLA:CPU's own dots (YNNPACK, Eigen) take 10-25% longer than oneMKL's
// sgemm on the same machine (README, "Train step against Hugging Face Mixtral"), and matmuls are
// most of the step. The sgemm is not linked here: glam/kernels/cblas.py loads a CBLAS library and
// hands its cblas_sgemm to glam_set_sgemm, so this file builds with nothing but the FFI headers
// that ship with jaxlib.
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
// cblas_sgemm_batch_strided(layout, trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb,
// stride_b, beta, c, ldc, stride_c, batch): oneMKL's, optional; 4-6% faster than a loop of sgemm
// calls on the experts' [8, 544, 512] x [8, 512, 1024] (scratch, 2026-11-25 15:22 UTC).
using SgemmBatchStrided = void (*)(int, int, int, int, int, int, float, const float*, int, int,
                                   const float*, int, int, float, float*, int, int, int);
// cblas_sgemm_batch(layout, trans_a[], trans_b[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[],
// beta[], c[], ldc[], group_count, group_size[]): oneMKL's, optional; the grouped matmul hands it
// every expert at once, so the library spreads small experts' sgemms over the threads instead of
// splitting each one (the sizes are MKL_INT: 32-bit in the LP64 interface that libmkl_rt defaults to).
using SgemmBatch = void (*)(int, const int*, const int*, const int*, const int*, const int*,
                            const float*, const float**, const int*, const float**, const int*,
                            const float*, float**, const int*, int, const int*);
Sgemm g_sgemm = nullptr;
SgemmBatchStrided g_sgemm_batch_strided = nullptr;
SgemmBatch g_sgemm_batch = nullptr;

using Stack = ffi::Buffer<ffi::F32, 3>;  // [batch, rows, cols]
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enum values

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

// The sgemms of one grouped call, run in one cblas_sgemm_batch call when the library has it.
struct SgemmList {
  std::vector<int> trans_a, trans_b, m, n, k, lda, ldb, ldc, ones;
  std::vector<float> alpha, beta;
  std::vector<const float*> a, b;
  std::vector<float*> c;

  void Add(int ta, int tb, int64_t rows, int64_t cols, int64_t depth, const float* ap, int64_t la,
           const float* bp, int64_t lb, float* cp, int64_t lc) {
    trans_a.push_back(ta), trans_b.push_back(tb), m.push_back(static_cast<int>(rows));
    n.push_back(static_cast<int>(cols)), k.push_back(static_cast<int>(depth));
    a.push_back(ap), lda.push_back(static_cast<int>(la)), b.push_back(bp);
    ldb.push_back(static_cast<int>(lb)), c.push_back(cp), ldc.push_back(static_cast<int>(lc));
    alpha.push_back(1.0f), beta.push_back(0.0f), ones.push_back(1);
  }

  void Run() {
    if (g_sgemm_batch != nullptr && m.size() > 1) {
      g_sgemm_batch(kRowMajor, trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(),
                    alpha.data(), a.data(), lda.data(), b.data(), ldb.data(), beta.data(), c.data(),
                    ldc.data(), static_cast<int>(m.size()), ones.data());
      return;
    }
    for (size_t i = 0; i < m.size(); ++i) {
      g_sgemm(kRowMajor, trans_a[i], trans_b[i], m[i], n[i], k[i], 1.0f, a[i], lda[i], b[i], ldb[i],
              0.0f, c[i], ldc[i]);
    }
  }
};

using Rows = ffi::Buffer<ffi::F32, 2>;  // [N, cols]
using Sizes = ffi::Buffer<ffi::S32, 1>;  // [E]

// Each group's first row, clamped so that no group reaches past `rows` (negative sizes count as 0).
// Returns the end of the last group.
int64_t GroupStarts(Sizes sizes, int64_t rows, int64_t* starts, int64_t* counts) {
  const int64_t groups = sizes.dimensions()[0];
  const int32_t* s = sizes.typed_data();
  int64_t start = 0;
  for (int64_t e = 0; e < groups; ++e) {
    starts[e] = start;
    counts[e] = std::min<int64_t>(std::max<int32_t>(s[e], 0), rows - start);
    start += counts[e];
  }
  return start;
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
  g_sgemm = reinterpret_cast<Sgemm>(sgemm);
  g_sgemm_batch_strided = reinterpret_cast<SgemmBatchStrided>(sgemm_batch_strided);
  g_sgemm_batch = reinterpret_cast<SgemmBatch>(sgemm_batch);
}

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
