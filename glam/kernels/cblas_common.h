// What cblas_gemm.cc and expert_ffn.cc share: the CBLAS entry points glam/kernels/cblas.py hands
// over, a list of sgemms run in one batched call, and the group bounds of rows sorted by group.
#ifndef GLAM_KERNELS_CBLAS_COMMON_H_
#define GLAM_KERNELS_CBLAS_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace glam {

namespace ffi = xla::ffi;

// cblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
// cblas_sgemm_batch_strided(layout, trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb,
// stride_b, beta, c, ldc, stride_c, batch): oneMKL's and OpenBLAS's, optional.
using SgemmBatchStrided = void (*)(int, int, int, int, int, int, float, const float*, int, int, const float*,
                                   int, int, float, float*, int, int, int);
// cblas_sgemm_batch(layout, trans_a[], trans_b[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[],
// beta[], c[], ldc[], group_count, group_size[]): oneMKL's and OpenBLAS's (>= 0.3.29), optional.
// Both libraries spread the sgemms of one call over their threads instead of splitting each one,
// which is what many small experts need (the sizes are 32-bit ints: the LP64 interfaces).
using SgemmBatch = void (*)(int, const int*, const int*, const int*, const int*, const int*, const float*,
                            const float**, const int*, const float**, const int*, const float*, float**,
                            const int*, int, const int*);

extern Sgemm g_sgemm;
extern SgemmBatchStrided g_sgemm_batch_strided;
extern SgemmBatch g_sgemm_batch;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enum values

using Stack = ffi::Buffer<ffi::F32, 3>;  // [batch, rows, cols]
using Rows = ffi::Buffer<ffi::F32, 2>;   // [N, cols]
using Sizes = ffi::Buffer<ffi::S32, 1>;  // [E]

// The sgemms of one call, run in one cblas_sgemm_batch call when the library has it.
struct SgemmList {
  std::vector<int> trans_a, trans_b, m, n, k, lda, ldb, ldc, ones;
  std::vector<float> alpha, beta;
  std::vector<const float*> a, b;
  std::vector<float*> c;

  // c = op(a) @ op(b) + beta * c, op(a) [rows, depth], op(b) [depth, cols]; la, lb, lc: row lengths
  // as stored. Empty products are skipped (and leave c as it is).
  void Add(int ta, int tb, int64_t rows, int64_t cols, int64_t depth, const float* ap, int64_t la, const float* bp,
           int64_t lb, float* cp, int64_t lc, float beta_value = 0.0f) {
    if (rows == 0 || cols == 0) return;
    trans_a.push_back(ta), trans_b.push_back(tb), m.push_back(static_cast<int>(rows));
    n.push_back(static_cast<int>(cols)), k.push_back(static_cast<int>(depth));
    a.push_back(ap), lda.push_back(static_cast<int>(la)), b.push_back(bp);
    ldb.push_back(static_cast<int>(lb)), c.push_back(cp), ldc.push_back(static_cast<int>(lc));
    alpha.push_back(1.0f), beta.push_back(beta_value), ones.push_back(1);
  }

  void Run() {
    if (g_sgemm_batch != nullptr && m.size() > 1) {
      g_sgemm_batch(kRowMajor, trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(), alpha.data(), a.data(),
                    lda.data(), b.data(), ldb.data(), beta.data(), c.data(), ldc.data(), static_cast<int>(m.size()),
                    ones.data());
      return;
    }
    for (size_t i = 0; i < m.size(); ++i) {
      g_sgemm(kRowMajor, trans_a[i], trans_b[i], m[i], n[i], k[i], 1.0f, a[i], lda[i], b[i], ldb[i], beta[i], c[i],
              ldc[i]);
    }
  }
};

// Each group's first row and row count, clamped so that no group reaches past `rows` (negative
// sizes count as 0). Returns the end of the last group.
inline int64_t GroupStarts(Sizes sizes, int64_t rows, int64_t* starts, int64_t* counts) {
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

}  // namespace glam

#endif  // GLAM_KERNELS_CBLAS_COMMON_H_
