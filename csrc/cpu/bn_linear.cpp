// CPU: forward and backward of the fused BatchNorm -> Linear training layer on normalised float32
// inputs (care_ext.bn_linear: the classifiers' first layers in training, first_layer_backward
// 'fused', which 'auto' picks at LLM widths on CPUs without bf16 units).
//
// x̂ = [x̂_0 | x̂_1 | ...] is the normalised input in column blocks [N, D_i] (sum D_i = D); W [O, D]
// and b [O] the Linear's parameters, gamma and beta [D] BatchNorm's affine ones; g = dL/dout.
//   forward:  out = x̂ (W diag(gamma))^T + (W beta + b)                               [N, O]
//   backward: M = g^T x̂ [O, D], gsum = 1^T g [O];
//             grad_W = M diag(gamma) + gsum beta^T, grad_b = gsum,
//             grad_gamma = column sums of W ⊙ M,  grad_beta = gsum^T W
//
// Where the CPU step multiplies on care_ext's AVX2 GEMM at this width (cpu_f32_gemm_selected(D):
// CARE_EXT_CPU_GEMM, by default x86 without AVX-512F at D >= 1024):
//   * the forward multiplies the first block on it (W_0 diag(gamma_0) packed per call, W beta + b
//     its bias, added after the block's sum); the other blocks (a few feature columns) are added
//     by ATen's addmm after it, in block order;
//   * the backward computes M in items of 8 16-column panels over torch's threads (each slab of
//     256 rows of an item's x̂ columns copied into panels first, prefetched 8 rows ahead; g^T
//     once into padded rows), and finishes each panel's grad_W, grad_gamma and grad_beta columns
//     from its M. Sums: M as the GEMM sums (per slab of 256 rows of x̂ from zero, slabs in
//     order); gsum one float64 sum over rows (ascending n) rounded once;
//     grad_gamma and grad_beta float32 sums of rounded products over rows (ascending o);
//     grad_W = M * gamma + gsum * beta, two rounded products and their sum.
//   Why: on a 2-core Zen 3 MKL ran the backward's [O, N] x [N, D] GEMM at N = 29-232 rows at
//   36-97 GFLOP/s, and the five elementwise passes over [O, D] after it cost ~0.4 ms a layer.
// Elsewhere both run the ATen calls of the Python twin (care_ext.reference.bn_linear_forward /
// bn_linear_backward) in the same order: the same bits as before these ops existed.
#include "../classifier_parts.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace care_ext {
namespace {

constexpr int64_t kPanel = kF32Panel;
constexpr int64_t kGroupPanels = 8;  // panels per item of the backward: 128 columns of x̂
constexpr int64_t kSlabRows = 256;   // rows of x̂ per slab: the GEMM's slab of k
constexpr int64_t kPrefetchRows = 8;  // rows of x̂ the slab's copy asks for ahead of its reads

void check_layer(const char* op, at::TensorList xhat, const Tensor& weight, const Tensor& gamma,
                 const Tensor& beta) {
  TORCH_CHECK(!xhat.empty(), op, ": xhat needs at least one block");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, op,
              ": weight must be float32 [O, D], got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t D = weight.size(1);
  int64_t width = 0;
  for (const Tensor& x : xhat) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op,
                ": every xhat block must be float32 [N, D_i], got ", x.scalar_type(), " ",
                x.sizes());
    TORCH_CHECK(x.size(0) == xhat[0].size(0), op, ": xhat blocks have ", xhat[0].size(0),
                " and ", x.size(0), " rows");
    width += x.size(1);
  }
  TORCH_CHECK(width == D, op, ": xhat blocks are ", width, " columns wide, weight has ", D);
  for (const Tensor* t : {&gamma, &beta}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == D && t->scalar_type() == at::kFloat, op,
                ": gamma and beta must be float32 [", D, "], got ", t->scalar_type(), " ",
                t->sizes());
  }
}

// x with unit column stride (the GEMMs read its rows in place).
Tensor unit_columns(const Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// A whole 16-column panel's gradients from its M (m [O, 16]): grad_W's 16 columns of every row
// (gw, row stride D) = m * gamma + gsum * beta, and grad_gamma / grad_beta's 16 columns = the sums
// over rows, in row order, of m * W and gsum * W (w, row stride D). Every product rounded, then
// added (no fused multiply-add: the short panels' scalar loop gives the same bits).
__attribute__((target("avx2"))) void panel_gradients(const float* m, int64_t O, const float* w,
                                                      int64_t D, const float* gamma,
                                                      const float* beta, const float* gsum,
                                                      float* gw, float* gg, float* gb) {
  const __m256 g0 = _mm256_loadu_ps(gamma), g1 = _mm256_loadu_ps(gamma + 8);
  const __m256 b0 = _mm256_loadu_ps(beta), b1 = _mm256_loadu_ps(beta + 8);
  __m256 sg0 = _mm256_setzero_ps(), sg1 = _mm256_setzero_ps();
  __m256 sb0 = _mm256_setzero_ps(), sb1 = _mm256_setzero_ps();
  for (int64_t o = 0; o < O; ++o) {
    const __m256 m0 = _mm256_loadu_ps(m + o * kPanel), m1 = _mm256_loadu_ps(m + o * kPanel + 8);
    const __m256 w0 = _mm256_loadu_ps(w + o * D), w1 = _mm256_loadu_ps(w + o * D + 8);
    const __m256 s = _mm256_set1_ps(gsum[o]);
    _mm256_storeu_ps(gw + o * D, _mm256_add_ps(_mm256_mul_ps(m0, g0), _mm256_mul_ps(s, b0)));
    _mm256_storeu_ps(gw + o * D + 8, _mm256_add_ps(_mm256_mul_ps(m1, g1), _mm256_mul_ps(s, b1)));
    sg0 = _mm256_add_ps(sg0, _mm256_mul_ps(m0, w0));
    sg1 = _mm256_add_ps(sg1, _mm256_mul_ps(m1, w1));
    sb0 = _mm256_add_ps(sb0, _mm256_mul_ps(s, w0));
    sb1 = _mm256_add_ps(sb1, _mm256_mul_ps(s, w1));
  }
  _mm256_storeu_ps(gg, sg0);
  _mm256_storeu_ps(gg + 8, sg1);
  _mm256_storeu_ps(gb, sb0);
  _mm256_storeu_ps(gb + 8, sb1);
}
#else
void panel_gradients(const float*, int64_t, const float*, int64_t, const float*, const float*,
                     const float*, float*, float*, float*) {
  TORCH_CHECK(false, "care_ext: the AVX2 float32 GEMM is not built for this CPU");
}
#endif

// One 16-column panel of the backward: column c0 of block `block` (x̂ column d0 of the layer).
struct BackPanel {
  int64_t block, c0, d0, cols;
};

}  // namespace

Tensor bn_linear_forward_cpu(at::TensorList xhat, const Tensor& weight, const Tensor& bias,
                             const Tensor& gamma, const Tensor& beta) {
  const char* op = "care_ext._bn_linear_forward";
  check_layer(op, xhat, weight, gamma, beta);
  const int64_t O = weight.size(0), D = weight.size(1), N = xhat[0].size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == O && bias.scalar_type() == at::kFloat, op,
              ": bias must be float32 [", O, "], got ", bias.scalar_type(), " ", bias.sizes());
  const bool avx2 = cpu_f32_gemm_selected(D);
  Tensor out = at::addmv(bias, weight, beta).unsqueeze(0);  // [1, O]: broadcast into block 0
  int64_t c = 0;
  for (size_t i = 0; i < xhat.size(); ++i) {
    const int64_t d = xhat[i].size(1);
    const Tensor wg = at::mul(weight.narrow(1, c, d), gamma.narrow(0, c, d));  // W diag(gamma)
    if (avx2 && i == 0) {
      const Tensor x = unit_columns(xhat[i]);
      const F32Panels f = pack_f32_panels({{wg.t(), out.squeeze(0).contiguous()}});
      const int64_t ld = f.panels * kPanel;
      Tensor o = at::empty({N, ld}, x.options());
      f32_gemm_panels_parallel(x.const_data_ptr<float>(), x.stride(0), N, f, 0, f.panels,
                               o.data_ptr<float>(), ld);
      out = o.narrow(1, 0, O);
    } else {
      out = at::addmm(out, xhat[i], wg.t());
    }
    c += d;
  }
  return out.contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_linear_backward_cpu(const Tensor& grad_out,
                                                                  at::TensorList xhat,
                                                                  const Tensor& weight,
                                                                  const Tensor& gamma,
                                                                  const Tensor& beta) {
  const char* op = "care_ext._bn_linear_backward";
  check_layer(op, xhat, weight, gamma, beta);
  const int64_t O = weight.size(0), D = weight.size(1), N = xhat[0].size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == O &&
                  grad_out.scalar_type() == at::kFloat,
              op, ": grad_out must be float32 [", N, ", ", O, "], got ", grad_out.scalar_type(),
              " ", grad_out.sizes());
  const Tensor g = grad_out.contiguous();
  if (!cpu_f32_gemm_selected(D)) {  // the twin's ATen calls, in its order
    const Tensor gsum = g.sum(0);
    std::vector<Tensor> ms;
    for (const Tensor& x : xhat) ms.push_back(g.t().mm(x));
    Tensor m = ms.size() > 1 ? at::cat(ms, 1) : ms[0];
    Tensor grad_w = at::mul(m, gamma).addr_(gsum, beta);
    Tensor grad_gamma = m.mul_(weight).sum(0);
    Tensor grad_beta = at::matmul(gsum, weight);
    return {grad_w, gsum, grad_gamma, grad_beta};
  }
  const auto f32 = g.options();
  const Tensor w = weight.contiguous(), gam = gamma.contiguous(), bet = beta.contiguous();
  std::vector<Tensor> xs;
  for (const Tensor& x : xhat) xs.push_back(unit_columns(x));
  // g^T in padded rows (the GEMM's A: O rows of N), and gsum: a float64 sum in row order
  const int64_t lda = f32_row_stride(N);
  Tensor gt = pooled_floats(std::max<int64_t>(O * lda, 1));
  Tensor gsum = at::empty({O}, f32);
  {
    const float* gp = g.const_data_ptr<float>();
    float* t = gt.data_ptr<float>();
    std::vector<double> s(O, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t o = 0; o < O; ++o) {
        const float v = gp[n * O + o];
        t[o * lda + n] = v;
        s[o] += v;
      }
    }
    std::copy(s.begin(), s.end(), gsum.data_ptr<float>());  // rounded once
  }
  std::vector<BackPanel> panels;
  for (int64_t b = 0, d0 = 0; b < static_cast<int64_t>(xs.size()); d0 += xs[b].size(1), ++b) {
    const int64_t d = xs[b].size(1);
    for (int64_t c0 = 0; c0 < d; c0 += kPanel) {
      panels.push_back({b, c0, d0 + c0, std::min(kPanel, d - c0)});
    }
  }
  Tensor grad_w = at::empty({O, D}, f32), grad_gamma = at::empty({D}, f32),
         grad_beta = at::empty({D}, f32);
  const float* a = gt.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* gm = gam.const_data_ptr<float>();
  const float* bt = bet.const_data_ptr<float>();
  const float* gs = gsum.const_data_ptr<float>();
  float* gw = grad_w.data_ptr<float>();
  float* gg = grad_gamma.data_ptr<float>();
  float* gb = grad_beta.data_ptr<float>();
  // Items of up to kGroupPanels panels of one block: for each slab of kSlabRows rows of x̂, the
  // item's panels are copied together (rows of 8 x 64 bytes: read in place, x̂'s rows 16 KB apart
  // at D = 4096 fall into a few L1 sets and every 6 rows of g^T missed L1 on them; ~40 GFLOP/s a
  // core on a Zen 3), then multiplied panel after panel by the slab of g^T (which stays in L2
  // across them); after the last slab each panel's gradients are finished from its M.
  std::vector<std::pair<int64_t, int64_t>> items;  // [first panel, end panel) within one block
  for (int64_t p = 0; p < static_cast<int64_t>(panels.size());) {
    int64_t e = p + 1;
    while (e < static_cast<int64_t>(panels.size()) && e - p < kGroupPanels &&
           panels[e].block == panels[p].block) {
      ++e;
    }
    items.emplace_back(p, e);
    p = e;
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    // the thread's pooled buffers: a fresh 128 KB vector per call was mmap'd, page faults each time
    Tensor m_buf = pooled_floats(O * kPanel * kGroupPanels);
    Tensor slab_buf = pooled_floats(kSlabRows * kPanel * kGroupPanels);
    float* const m = m_buf.data_ptr<float>();
    float* const slab = slab_buf.data_ptr<float>();
    for (int64_t it = i0; it < i1; ++it) {
      const auto [pa, pe] = items[it];
      const int64_t np = pe - pa;
      const Tensor& x = xs[panels[pa].block];
      const int64_t ldx = x.stride(0), c0 = panels[pa].c0;
      const int64_t cols = panels[pe - 1].c0 + panels[pe - 1].cols - c0;  // the item's columns
      const float* src = x.const_data_ptr<float>() + c0;
      for (int64_t k0 = 0; k0 < N || k0 == 0; k0 += kSlabRows) {
        const int64_t kc = std::min(kSlabRows, N - k0);
        for (int64_t n = 0; n < kc; ++n) {  // panel j's rows at slab + j * kc * 16
          const float* row = src + (k0 + n) * ldx;
          if (n + kPrefetchRows < kc) {  // each row's 512 bytes start a stream of their own
            const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * ldx);
            for (int64_t byte = 0; byte < cols * 4; byte += 64) __builtin_prefetch(ahead + byte);
          }
          for (int64_t j = 0; j < np; ++j) {
            float* d = slab + (j * kc + n) * kPanel;
            const int64_t w = std::min(kPanel, cols - j * kPanel);
            std::copy_n(row + j * kPanel, w, d);
            std::fill(d + w, d + kPanel, 0.0f);  // past the block's last column
          }
        }
        for (int64_t j = 0; j < np; ++j) {
          f32_gemm_strided_panel(a + k0, lda, O, kc, slab + j * kc * kPanel, kPanel,
                                 m + j * O * kPanel, kPanel, k0 > 0);
        }
      }
      for (int64_t j = 0; j < np; ++j) {
        const BackPanel& q = panels[pa + j];
        const float* mq = m + j * O * kPanel;
        const int64_t d0 = q.d0;
        if (q.cols == kPanel) {
          panel_gradients(mq, O, wp + d0, D, gm + d0, bt + d0, gs, gw + d0, gg + d0, gb + d0);
          continue;
        }
        float sg[kPanel] = {}, sb[kPanel] = {};  // a short panel, element by element, same sums
        for (int64_t o = 0; o < O; ++o) {
          const float* mo = mq + o * kPanel;
          const float* wo = wp + o * D + d0;
          float* go = gw + o * D + d0;
          for (int64_t c = 0; c < q.cols; ++c) {
            const float mg = mo[c] * gm[d0 + c], sbt = gs[o] * bt[d0 + c];
            go[c] = mg + sbt;
            const float mw = mo[c] * wo[c], sw = gs[o] * wo[c];
            sg[c] += mw;
            sb[c] += sw;
          }
        }
        std::copy_n(sg, q.cols, gg + d0);
        std::copy_n(sb, q.cols, gb + d0);
      }
    }
  });
  return {grad_w, gsum, grad_gamma, grad_beta};
}

}  // namespace care_ext
