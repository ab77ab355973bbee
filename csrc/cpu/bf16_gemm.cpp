// CPU: bf16 x bf16 -> float32 products for the split first layers (care_ext.bf16_split).
//
// A product of two bf16 numbers is exact in float32, so a GEMM of bf16 hidden states with the
// bf16 pieces of a float32 weight gives float32 GEMM results up to the order of the float32 sums.
// MKL's cblas_gemm_bf16bf16f32 runs it on AMX tiles / AVX512-BF16 where the CPU has them (one
// Xeon core: [256, 4096] x [4096, 384] in 0.9 ms, about the time of a float32 [256, 4096] x
// [4096, 128] GEMM with its bf16 -> float32 conversion, for three times the products;
// bench/RESULTS.md, 2026-11-27, third session). torch's x86 builds export it from libtorch_cpu; it is declared
// weak here, so the library also loads against a torch without MKL, where the products run as a
// float32 GEMM on converted copies (the same exact products, slower).
#include "../classifier_parts.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" {
// mkl_cblas.h: CBLAS_LAYOUT / CBLAS_TRANSPOSE are C enums (int), MKL_INT is int in torch's
// LP64 MKL, MKL_BF16 is unsigned short.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
// mkl_service.h's mkl_set_num_threads_local (a macro for this C entry; the lower-case symbol is the
// Fortran one, taking a pointer): MKL's thread count for the calling thread's next calls (0: the
// global setting); returns the previous local setting.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace care_ext {
namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CblasRowMajor, CblasNoTrans, ...
constexpr int64_t kTileRows = 128, kTileCols = 256;  // output tiles of mkl_bf16_gemm

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// How MKL reads a bf16 matrix [rows, cols] in row-major terms: (transposed?, leading dimension),
// or nothing when neither its rows nor its columns are unit-stride (the caller copies).
struct BlasView {
  bool ok, trans;
  int64_t ld;
};
BlasView blas_view(const Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(c, 1)) return {true, false, t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(r, 1)) return {true, true, t.stride(1)};
  return {false, false, 0};
}

// op(a) [M, K] x op(b) [K, N] -> float32 [M, N] through MKL's bf16 GEMM, a and b read as va / vb
// say; an undefined tensor where MKL cannot run it (no bf16 GEMM in this torch, a size or leading
// dimension beyond int, an empty product): the caller multiplies converted copies instead.
// tiled: in fixed output tiles (below), else one MKL call as MKL threads it (the CPU split step,
// which calls it per block of rows inside its own parallel loop; with tiles there an A/B on the
// AMD VM put the step 4-6% slower, medians of rounds spanning 0.92-1.12, untiled 0.98-1.00).
Tensor mkl_bf16_gemm(const Tensor& a, BlasView va, const Tensor& b, BlasView vb, int64_t M,
                     int64_t N, int64_t K, bool tiled) {
  if (!cpu_bf16_gemm_available() || !fits_int(M) || !fits_int(N) || !fits_int(K) ||
      !fits_int(va.ld) || !fits_int(vb.ld) || M == 0 || N == 0 || K == 0) {
    return Tensor();
  }
  Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
  const auto* ap = reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
  float* cp = c.data_ptr<float>();
  // c's rows i0 .. i0+m-1 and columns j0 .. j0+n-1: op(a)'s rows i0.. times op(b)'s columns j0..,
  // as MKL reads them (va / vb: row-major terms)
  auto gemm = [&](int64_t i0, int64_t j0, int64_t m, int64_t n) {
    cblas_gemm_bf16bf16f32(kRowMajor, va.trans ? kTrans : kNoTrans, vb.trans ? kTrans : kNoTrans,
                           static_cast<int>(m), static_cast<int>(n), static_cast<int>(K), 1.0f,
                           ap + (va.trans ? i0 : i0 * va.ld), static_cast<int>(va.ld),
                           bp + (vb.trans ? j0 * vb.ld : j0), static_cast<int>(vb.ld), 0.0f,
                           cp + i0 * N + j0, static_cast<int>(N));
  };
  if (!tiled) {
    gemm(0, 0, M, N);
    return c;
  }
  // Fixed tiles of the output, each one single-threaded MKL call, the tiles over torch's threads:
  // MKL's own threading splits the product by the thread count, and on CPUs without AVX512-BF16
  // (an AMD EPYC VM, 2026-11-28) its results then changed with it in the last bit (1200 x 24 x 6:
  // 1 and 3 threads agreed, 2 did not). A tile's sums do not depend on who computes it.
  const int64_t tm = (M + kTileRows - 1) / kTileRows, tn = (N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, tm * tn, 1, [&](int64_t begin, int64_t end) {
    const int before = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
#ifdef _OPENMP
    // and OpenMP's: MKL's bf16 GEMM followed omp_get_max_threads() on the calling thread whatever
    // the local MKL setting (a lone tile, run outside a parallel region with 2 torch threads,
    // still differed); the calling task's own setting, restored below
    const int omp_before = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = t / tn * kTileRows, j0 = t % tn * kTileCols;
      gemm(i0, j0, std::min(kTileRows, M - i0), std::min(kTileCols, N - j0));
    }
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(before);
#ifdef _OPENMP
    omp_set_num_threads(omp_before);
#endif
  });
  return c;
}

}  // namespace

bool cpu_bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

Tensor bf16_products(const Tensor& a, const Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) &&
                        a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
                        a.device().is_cpu() && b.device().is_cpu());
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const Tensor A = a.stride(1) == 1 && a.stride(0) >= K ? a : a.contiguous();
  const Tensor Bm = b.stride(1) == 1 && b.stride(0) >= K ? b : b.contiguous();
  const Tensor c = mkl_bf16_gemm(A, {true, false, A.stride(0)}, Bm, {true, true, Bm.stride(0)},
                                 M, N, K, /*tiled=*/false);
  return c.defined() ? c : A.to(at::kFloat).mm(Bm.to(at::kFloat).t());
}

Tensor bf16_mm_cpu(const Tensor& a_in, const Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(0),
              "care_ext._bf16_mm: a [M, K] and b [K, N] expected, got ", a_in.sizes(), " and ",
              b_in.sizes());
  TORCH_CHECK(a_in.scalar_type() == at::kBFloat16 && b_in.scalar_type() == at::kBFloat16,
              "care_ext._bf16_mm: a and b must be bfloat16, got ", a_in.scalar_type(), " and ",
              b_in.scalar_type());
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(),
              "care_ext._bf16_mm: runs on the CPU; got ", a_in.device(), " and ", b_in.device());
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
  const Tensor a = blas_view(a_in).ok ? a_in : a_in.contiguous();
  const Tensor b = blas_view(b_in).ok ? b_in : b_in.contiguous();
  const Tensor c = mkl_bf16_gemm(a, blas_view(a), b, blas_view(b), M, N, K, /*tiled=*/true);
  return c.defined() ? c : a.to(at::kFloat).mm(b.to(at::kFloat));  // the same exact products
}

void sum_split_terms(const float* c, int64_t ldc, int64_t T, int64_t Rt, int64_t col,
                     const float* bias, int64_t units, const int64_t* rows, int64_t n, float* out,
                     int64_t ldo) {
  for (int64_t k = 0; k < n; ++k) {
    const float* src = c + (rows != nullptr ? rows[k] : k) * ldc + col;
    float* dst = out + k * ldo;
    for (int64_t u = 0; u < units; ++u) dst[u] = src[u];
    for (int64_t t = 1; t < T; ++t) {
      for (int64_t u = 0; u < units; ++u) dst[u] += src[t * Rt + u];
    }
    for (int64_t u = 0; u < units; ++u) dst[u] += bias[u];
  }
}

}  // namespace care_ext
