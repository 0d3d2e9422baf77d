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
#include <cstdint>

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
Sgemm g_sgemm = nullptr;
SgemmBatchStrided g_sgemm_batch_strided = nullptr;

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

}  // namespace

extern "C" void glam_set_sgemm(void* sgemm, void* sgemm_batch_strided) {
  g_sgemm = reinterpret_cast<Sgemm>(sgemm);
  g_sgemm_batch_strided = reinterpret_cast<SgemmBatchStrided>(sgemm_batch_strided);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GlamCblasGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<Stack>()
                                  .Arg<Stack>()
                                  .Ret<Stack>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
