// CPU: the classifiers' float32 first-layer GEMMs on AVX2 + FMA, for CPUs where MKL's SGEMM is
// far from the FMA units' peak.
//
// Why: on a 2-core AMD EPYC (Zen 3, no AVX-512) MKL 2024.2's SGEMM ran the step's first layers at
// 56-86 GFLOP/s per core ([256, 4096] x [4096, 64 | 128], [64, 4096] x [4096, 256]) against
// 97-100 GFLOP/s of independent FMAs, and the float32 step, which those GEMMs dominate, missed
// issue 7's CPU goal there; this kernel runs them at 78-96 (bench/RESULTS.md, eighteenth
// session). oneDNN's f32 BRGeMM (torch's cpublas::brgemm) measured 41-48 GFLOP/s there.
//
// The kernel: B (the weight, [K, N] at any strides, one or more column groups each with its bias)
// is packed once per call into 16-column panels of KC-row slabs, every group starting on a panel
// of its own; A (float32 rows with any row stride; the callers pad it so that consecutive rows do
// not alias in L1) is read in place; a 6 x 16 register tile (12 ymm accumulators) runs over each
// slab with broadcast A loads. Every output element is summed per slab of 256 k from zero, in
// ascending k, one FMA after another; the slab sums are added in slab order (a blocked sum: at
// K = 4096 its error is that of 16 terms of 256, not of one chain of 4096), then its bias: the same
// bits whatever the row's place in the block, the panel range, the blocking of rows or the number
// of threads.
//
// CARE_EXT_CPU_GEMM (run time): "avx2" uses it, "mkl" uses MKL (torch's addmm), unset or "auto"
// uses it on x86 CPUs with AVX2 and FMA and without AVX-512F (where MKL has its AVX-512 kernels)
// at hidden sizes >= 1024 (LLM sizes; below, MKL keeps the float order the CPU lab's recorded
// numbers, H = 128, were made with, as the other CPU auto choices do); "avx2" on a CPU without
// AVX2/FMA is an error.
#include "../classifier_parts.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CARE_EXT_F32_GEMM_X86 1
#include <immintrin.h>
#else
#define CARE_EXT_F32_GEMM_X86 0
#endif

namespace care_ext {
namespace {

constexpr int64_t kPanel = kF32Panel;  // columns per panel
constexpr int64_t kTile = 6;           // rows per register tile
constexpr int64_t kSlab = 256;         // k per slab: a 16 KB panel slab stays in L1
constexpr int64_t kRowBlock = 72;      // rows per pass over a slab: 72 KB of A stays in L2

#if CARE_EXT_F32_GEMM_X86
// c[R, 16] (row stride ldc) = (first ? 0 : c) + (a[R, kc] (row stride lda) x b[kc, 16] (packed:
// rows 16 floats apart, 32-byte aligned; kPacked false: rows ldb floats apart, any alignment),
// summed from zero), then + bias[16] when bias is not null.
template <int R, bool kPacked = true>
__attribute__((target("avx2,fma"))) void tile(int64_t kc, const float* a, int64_t lda,
                                              const float* b, float* c, int64_t ldc, bool first,
                                              const float* bias, int64_t ldb = kPanel) {
  const int64_t sb = kPacked ? kPanel : ldb;
  __m256 acc[R][2];
  const float* row[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    row[r] = a + r * lda;
    acc[r][0] = _mm256_setzero_ps();
    acc[r][1] = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * sb;
    const __m256 b0 = kPacked ? _mm256_load_ps(bk) : _mm256_loadu_ps(bk);
    const __m256 b1 = kPacked ? _mm256_load_ps(bk + 8) : _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(row[r] + k);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  if (!first) {  // the slabs' sums added in slab order
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc), acc[r][0]);
      acc[r][1] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc + 8), acc[r][1]);
    }
  }
  if (bias != nullptr) {
    const __m256 c0 = _mm256_loadu_ps(bias), c1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_add_ps(acc[r][0], c0);
      acc[r][1] = _mm256_add_ps(acc[r][1], c1);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// d[k][0..16) = column k of the 16 rows w[n * ldw + k] (n < 16, k < kc): a 16-column panel slab
// of a weight stored transposed, by 8 x 8 register transposes (8 k of 8 rows at a time).
__attribute__((target("avx2"))) void pack_transposed_panel(const float* w, int64_t ldw, int64_t kc,
                                                           float* d) {
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 -> columns 8h .. 8h + 7 of the panel
      const float* r = w + 8 * h * ldw + k;
      const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + ldw),
                   r2 = _mm256_loadu_ps(r + 2 * ldw), r3 = _mm256_loadu_ps(r + 3 * ldw),
                   r4 = _mm256_loadu_ps(r + 4 * ldw), r5 = _mm256_loadu_ps(r + 5 * ldw),
                   r6 = _mm256_loadu_ps(r + 6 * ldw), r7 = _mm256_loadu_ps(r + 7 * ldw);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = d + k * kPanel + 8 * h;  // column j of the 8 rows is k + j of the panel
      _mm256_storeu_ps(o + 0 * kPanel, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(o + 1 * kPanel, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(o + 2 * kPanel, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(o + 3 * kPanel, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(o + 4 * kPanel, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(o + 5 * kPanel, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(o + 6 * kPanel, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_storeu_ps(o + 7 * kPanel, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
  }
  for (; k < kc; ++k) {
    for (int64_t n = 0; n < kPanel; ++n) d[k * kPanel + n] = w[n * ldw + k];
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, bool,
                        const float*, int64_t);
constexpr TileFn kTiles[kTile + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
constexpr TileFn kStridedTiles[kTile + 1] = {nullptr,           tile<1, false>, tile<2, false>,
                                             tile<3, false>,    tile<4, false>, tile<5, false>,
                                             tile<6, false>};

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#else
bool cpu_has_avx2_fma() { return false; }
bool cpu_has_avx512f() { return false; }
void pack_transposed_panel(const float*, int64_t, int64_t, float*) {}  // never called off x86
#endif

// The calling thread's reusable float32 buffers (pooled_floats): a buffer is handed out again
// only when nothing else holds its storage (a view of it counts), so reuse is never visible. They
// are kept until the thread exits (at 64x8x4096: ~7 MB on the calling thread, ~4 MB per worker).
constexpr size_t kPoolSlots = 8;
thread_local std::vector<Tensor> pool;

}  // namespace

Tensor pooled_floats(int64_t n) {
  TORCH_INTERNAL_ASSERT(n >= 0);
  Tensor *best = nullptr, *free_slot = nullptr;  // the smallest free buffer that fits; any free
  for (Tensor& t : pool) {
    if (t.storage().use_count() != 1) continue;
    if (t.numel() >= n && (best == nullptr || t.numel() < best->numel())) best = &t;
    if (free_slot == nullptr || t.numel() < free_slot->numel()) free_slot = &t;
  }
  if (best != nullptr) return best->narrow(0, 0, n);
  Tensor fresh = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kFloat));
  if (free_slot != nullptr) {
    *free_slot = fresh;  // the smallest free buffer, too small: replaced by a bigger one
  } else if (pool.size() < kPoolSlots) {
    pool.push_back(fresh);
  }
  return fresh.narrow(0, 0, n);
}

#if CARE_EXT_F32_GEMM_X86
namespace {
__attribute__((target("avx2"))) void bf16_to_float_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(d + i, &u, sizeof u);
  }
}
}  // namespace
#endif

void bf16_to_float(const at::BFloat16* s, float* d, int64_t n) {
#if CARE_EXT_F32_GEMM_X86
  if (cpu_has_avx2_fma()) {
    bf16_to_float_avx2(reinterpret_cast<const uint16_t*>(s), d, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}

bool cpu_f32_gemm_available() { return cpu_has_avx2_fma(); }

bool cpu_f32_gemm_auto() { return cpu_has_avx2_fma() && !cpu_has_avx512f(); }

bool cpu_f32_gemm_selected(int64_t K) {
  static const char* const kChoices[] = {"avx2", "mkl"};
  const int choice = env_choice("CARE_EXT_CPU_GEMM", kChoices);
  if (choice == 0) {
    TORCH_CHECK(cpu_has_avx2_fma(), "CARE_EXT_CPU_GEMM=avx2: this CPU (or build) has no AVX2 and "
                "FMA; use mkl or auto");
    return true;
  }
  if (choice == 1) return false;
  return cpu_f32_gemm_auto() && K >= kF32GemmAutoMinK;
}

int64_t f32_row_stride(int64_t K) {
  // a multiple of 16 floats that is not a multiple of 1024 (4 KB): rows 4 KB apart would share
  // L1 sets, and the 6 rows of a tile with the panel slab overflow their ways (at H = 4096 the
  // kernel measured 72.8 GFLOP/s unpadded against 78.8 padded on one Zen 3 core)
  int64_t ld = (K + 15) / 16 * 16;
  if (ld % 1024 == 0) ld += 16;
  return ld;
}

F32Panels f32_panels_layout(const std::vector<std::pair<Tensor, Tensor>>& groups) {
  TORCH_INTERNAL_ASSERT(!groups.empty());
  F32Panels p;
  p.K = groups.front().first.size(0);
  p.first.push_back(0);
  for (const auto& [w, bias] : groups) {
    TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.size(0) == p.K && w.scalar_type() == at::kFloat);
    TORCH_INTERNAL_ASSERT(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(1) &&
                                              bias.scalar_type() == at::kFloat));
    p.cols.push_back(w.size(1));
    p.first.push_back(p.first.back() + (w.size(1) + kPanel - 1) / kPanel);
  }
  p.panels = p.first.back();
  p.bias = at::zeros({p.panels * kPanel}, at::TensorOptions().dtype(at::kFloat));
  float* bias_out = p.bias.data_ptr<float>();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (!groups[g].second.defined()) continue;  // no bias: zeros
    const Tensor b = groups[g].second.contiguous();
    std::copy_n(b.const_data_ptr<float>(), p.cols[g], bias_out + p.first[g] * kPanel);
  }
  return p;
}

void pack_f32_panels_into(const std::vector<std::pair<Tensor, Tensor>>& groups,
                          const F32Panels& p, float* out) {
  TORCH_INTERNAL_ASSERT(groups.size() + 1 == p.first.size());
  const int64_t K = p.K, np = p.panels;
  // panel q of group g: columns [(q - first[g]) * 16, + 16) of its weight, zero past its width;
  // slab s at out + s * kSlab * np * 16, the panel at + q * kc * 16 within it
  at::parallel_for(0, np, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const size_t g = static_cast<size_t>(
          std::upper_bound(p.first.begin(), p.first.end(), q) - p.first.begin() - 1);
      const Tensor& w = groups[g].first;
      const float* wp = w.const_data_ptr<float>();
      const int64_t sk = w.stride(0), sn = w.stride(1);
      const int64_t n0 = (q - p.first[g]) * kPanel, nn = std::min(kPanel, p.cols[g] - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kSlab) {
        const int64_t kc = std::min(kSlab, K - k0);
        float* d = out + k0 * np * kPanel + q * kc * kPanel;
        if (sn == 1) {  // rows of the panel contiguous in w
          for (int64_t k = 0; k < kc; ++k) {
            const float* s = wp + (k0 + k) * sk + n0;
            float* dk = d + k * kPanel;
            std::copy_n(s, nn, dk);
            std::fill(dk + nn, dk + kPanel, 0.0f);
          }
        } else if (sk == 1 && nn == kPanel && cpu_has_avx2_fma()) {  // columns contiguous in k
          pack_transposed_panel(wp + n0 * sn + k0, sn, kc, d);
        } else {  // a transposed weight: each column contiguous (or strided) in k
          for (int64_t k = 0; k < kc; ++k) {
            std::fill(d + k * kPanel + nn, d + (k + 1) * kPanel, 0.0f);
          }
          for (int64_t n = 0; n < nn; ++n) {
            const float* s = wp + (n0 + n) * sn + k0 * sk;
            for (int64_t k = 0; k < kc; ++k) d[k * kPanel + n] = s[k * sk];
          }
        }
      }
    }
  });
}

F32Panels pack_f32_panels(const std::vector<std::pair<Tensor, Tensor>>& groups) {
  F32Panels p = f32_panels_layout(groups);
  p.data = pooled_floats(f32_panels_numel(p));
  pack_f32_panels_into(groups, p, p.data.data_ptr<float>());
  return p;
}

void f32_gemm_panels(const float* a, int64_t lda, int64_t M, const F32Panels& b, int64_t p0,
                     int64_t p1, float* c, int64_t ldc) {
#if CARE_EXT_F32_GEMM_X86
  TORCH_INTERNAL_ASSERT(cpu_has_avx2_fma() && 0 <= p0 && p0 <= p1 && p1 <= b.panels);
  const int64_t K = b.K, np = b.panels;
  const float* data = b.data.const_data_ptr<float>();
  const float* bias = b.bias.const_data_ptr<float>();
  if (K == 0) {  // no products: the bias alone
    for (int64_t i = 0; i < M; ++i) {
      std::copy(bias + p0 * kPanel, bias + p1 * kPanel, c + i * ldc + p0 * kPanel);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSlab) {
    const int64_t kc = std::min(kSlab, K - k0);
    const bool first = k0 == 0, last = k0 + kc == K;
    const float* slab = data + k0 * np * kPanel;
    for (int64_t i0 = 0; i0 < M; i0 += kRowBlock) {
      const int64_t i1 = std::min(M, i0 + kRowBlock);
      for (int64_t q = p0; q < p1; ++q) {
        const float* bq = slab + q * kc * kPanel;
        const float* bias_q = last ? bias + q * kPanel : nullptr;
        for (int64_t i = i0; i < i1; i += kTile) {
          kTiles[std::min(kTile, i1 - i)](kc, a + i * lda + k0, lda, bq, c + i * ldc + q * kPanel,
                                          ldc, first, bias_q, kPanel);
        }
      }
    }
  }
#else
  (void)a, (void)lda, (void)M, (void)b, (void)p0, (void)p1, (void)c, (void)ldc;
  TORCH_CHECK(false, "care_ext: the AVX2 float32 GEMM is not built for this CPU");
#endif
}

void f32_gemm_strided_panel(const float* a, int64_t lda, int64_t M, int64_t K, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#if CARE_EXT_F32_GEMM_X86
  TORCH_INTERNAL_ASSERT(cpu_has_avx2_fma());
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + kPanel, 0.0f);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kSlab) {  // the same slab order as f32_gemm_panels
    const int64_t kc = std::min(kSlab, K - k0);
    for (int64_t i = 0; i < M; i += kTile) {
      kStridedTiles[std::min(kTile, M - i)](kc, a + i * lda + k0, lda, b + k0 * ldb, c + i * ldc,
                                            ldc, k0 == 0 && !accumulate, nullptr, ldb);
    }
  }
#else
  (void)a, (void)lda, (void)M, (void)K, (void)b, (void)ldb, (void)c, (void)ldc, (void)accumulate;
  TORCH_CHECK(false, "care_ext: the AVX2 float32 GEMM is not built for this CPU");
#endif
}

void f32_gemm_panels_parallel(const float* a, int64_t lda, int64_t M, const F32Panels& b,
                              int64_t p0, int64_t p1, float* c, int64_t ldc) {
  const int64_t np = p1 - p0, row_blocks = (M + kRowBlock - 1) / kRowBlock;
  if (np <= 0 || M <= 0) return;
  // items (row block, panel), row-block major; a thread's run of items is whole panel ranges
  // within each row block it touches
  at::parallel_for(0, row_blocks * np, 1, [&](int64_t t0, int64_t t1) {
    while (t0 < t1) {
      const int64_t rb = t0 / np, q0 = t0 % np, q1 = std::min(np, q0 + (t1 - t0));
      const int64_t i0 = rb * kRowBlock, rows = std::min(kRowBlock, M - i0);
      f32_gemm_panels(a + i0 * lda, lda, rows, b, p0 + q0, p0 + q1, c + i0 * ldc, ldc);
      t0 += q1 - q0;
    }
  });
}

Tensor f32_linear_panels(const Tensor& x, const F32Panels& f) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_INTERNAL_ASSERT(K == f.K);
  const int64_t lda = f32_row_stride(K), ld = f.panels * kPanel;
  Tensor xf = pooled_floats(M * lda).view({M, lda}).narrow(1, 0, K);
  xf.copy_(x);
  Tensor c = at::empty({M, ld}, xf.options());
  f32_gemm_panels_parallel(xf.const_data_ptr<float>(), xf.stride(0), M, f, 0, f.panels,
                           c.data_ptr<float>(), ld);
  return c;
}

std::vector<Tensor> f32_linear_groups(const Tensor& x,
                                      const std::vector<std::pair<Tensor, Tensor>>& groups) {
  const F32Panels f = pack_f32_panels(groups);
  const Tensor c = f32_linear_panels(x, f);
  std::vector<Tensor> out;
  for (size_t g = 0; g < groups.size(); ++g) {
    out.push_back(c.narrow(1, f.first[g] * kPanel, f.cols[g]));
  }
  return out;
}

}  // namespace care_ext
