// CPU: per-column mean and biased variance of a [N, D] matrix (bfloat16 or float32) in one read,
// for the training BatchNorm of the first layers on split-bf16 GEMMs (care_ext.bn_linear): the
// hidden states are never converted to a float32 copy. Each column is summed around the mean of
// its first rows (sums of x - x0 and (x - x0)^2), so a column whose mean is large against its
// spread keeps its variance; float32 sums over 16 rows, float64 across them.
#include "../care_ext.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace care_ext {
namespace {

// columns per task: each row is read as one 1 KB (bf16) run, the sums stay in L1 (12 KB); a
// narrower block walked down the rows jumped a page per row and ran at a third of the speed
constexpr int64_t kCols = 512;

inline float to_float(at::BFloat16 v) {  // bf16 -> float32 as bits (vectorises, unlike the class)
  uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float v) { return v; }

constexpr int64_t kRows = 16;  // rows summed in float32 before their sums join the float64 ones

// Columns c0 .. c0 + W - 1 (W = kCols in full blocks, w otherwise): sums of x - x0 and
// (x - x0)^2, x0 = the column's mean over its first kRows rows (so the variance does not cancel
// even when the mean is far from zero), in float32 over kRows rows at a time (SSE lanes: the
// build targets the x86-64 baseline) and float64 across those.
template <int64_t W, typename T>
void column_sums(const T* x, int64_t N, int64_t ld, int64_t c0, int64_t w, double* x0, double* s1,
                 double* s2) {
  const int64_t width = W > 0 ? W : w;
  alignas(64) float shift[kCols], a1[kCols], a2[kCols];
  const int64_t head = std::min(N, kRows);
  for (int64_t j = 0; j < width; ++j) {
    double h = 0.0;
    for (int64_t n = 0; n < head; ++n) h += static_cast<double>(to_float(x[n * ld + c0 + j]));
    shift[j] = static_cast<float>(h / static_cast<double>(head));
    x0[j] = static_cast<double>(shift[j]);
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    const int64_t n1 = std::min(N, n0 + kRows);
    for (int64_t j = 0; j < width; ++j) {
      a1[j] = 0.0f;
      a2[j] = 0.0f;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const T* row = x + n * ld + c0;
      for (int64_t j = 0; j < width; ++j) {
        const float d = to_float(row[j]) - shift[j];
        a1[j] += d;
        a2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += static_cast<double>(a1[j]);
      s2[j] += static_cast<double>(a2[j]);
    }
  }
}

template <typename T>
void column_stats_block(const T* x, int64_t N, int64_t ld, int64_t c0, int64_t c1, float* mean,
                        float* var) {
  alignas(64) double s1[kCols], s2[kCols], x0[kCols];
  const int64_t w = c1 - c0;
  if (w == kCols) {
    column_sums<kCols>(x, N, ld, c0, w, x0, s1, s2);
  } else {
    column_sums<0>(x, N, ld, c0, w, x0, s1, s2);
  }
  const double inv = 1.0 / static_cast<double>(N);
  for (int64_t j = 0; j < w; ++j) {
    const double m = s1[j] * inv;
    const double v = s2[j] * inv - m * m;
    mean[c0 + j] = static_cast<float>(x0[j] + m);
    var[c0 + j] = static_cast<float>(v > 0.0 ? v : 0.0);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> column_stats_cpu(const Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "care_ext._column_stats: x must be [N, D], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "care_ext._column_stats: x must be bfloat16 or float32, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.size(0) >= 1, "care_ext._column_stats: x needs at least one row");
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), ld = x.stride(0);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({D}, f32), var = at::empty({D}, f32);
  float* m = mean.data_ptr<float>();
  float* v = var.data_ptr<float>();
  const int64_t tasks = (D + kCols - 1) / kCols;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kCols, c1 = std::min(D, c0 + kCols);
      if (x.scalar_type() == at::kBFloat16) {
        column_stats_block(x.const_data_ptr<at::BFloat16>(), N, ld, c0, c1, m, v);
      } else {
        column_stats_block(x.const_data_ptr<float>(), N, ld, c0, c1, m, v);
      }
    }
  });
  return {mean, var};
}

}  // namespace care_ext
