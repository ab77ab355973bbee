// CPU kernel: the rollout branch of the CARE classifiers, blocked over whole prompts.
//
// The rollout branch is nearly all of the acquisition step's FLOPs: for every branch (Stage-I,
// Stage-II) a [rows, H] x [H, R1] GEMM over the hidden states, then [rows, R1] x [R1, R2]. The
// dense composite runs each layer once over all B*G rows, which on the CPU means a full float32
// copy of a bf16 input (128 MiB at 512x16x4096), intermediates that leave the cache, and Stage-II
// GEMM rows that its masked mean then multiplies by zero. Here:
//   * blocks of whole prompts (about kBlockRows rows) are converted to float32 once and consumed by
//     every branch while they are in cache;
//   * a masked branch (Stage-II: the valid non-majority rollouts) multiplies only its masked rows,
//     gathered per block; a prompt with an empty mask pools to zero without any GEMM;
//   * blocks run in parallel on the intra-op pool (at::parallel_for), each with single-threaded
//     BLAS calls, in a fixed block layout (results do not depend on how blocks meet threads).
// Results equal rollout_pools_dense up to float32 summation order. Unlike the dense path (and the
// reference), which multiplies masked-out rows by zero, a non-finite hidden state outside a
// branch's mask cannot reach that branch's pool.
#include "../classifier_parts.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace care_ext {
namespace {

// Rows per block: a float32 block of 256 x 4096 is 4 MiB, which stays in the last-level cache
// while both branches read it, and keeps the per-block GEMMs large enough to run near peak.
// (On the 2-core EPYC, 128..1024 rows measured within the machine's noise at 512x16x4096.)
constexpr int64_t kBlockRows = 256;

struct BranchPlan {
  Tensor w1h_t;  // [H, R1] view of resp1_w's hidden columns, transposed
  Tensor w1f_t;  // [Fr, R1] view of resp1_w's feature columns, transposed
  Tensor b1, w2_t, b2;
  Tensor feat;         // [B*G, Fr] float32
  const bool* mask;    // [B, G] row-major, or nullptr
  float* pool;         // [B, R2] row-major, zero-initialised
  int64_t Fr, R2;
};

void run_block(const Tensor& x, int64_t p0, int64_t n, int64_t G, const BranchPlan& bp) {
  const int64_t rows = n * G;
  // The rows that enter this branch's pool: all rows of the block, or only its masked rows,
  // gathered so that nothing else is multiplied.
  Tensor xs = x;
  Tensor fs = bp.Fr > 0 ? bp.feat.narrow(0, p0 * G, rows) : Tensor();
  std::vector<int64_t> idx;
  if (bp.mask != nullptr) {
    const bool* m = bp.mask + p0 * G;
    for (int64_t j = 0; j < rows; ++j) {
      if (m[j]) idx.push_back(j);
    }
    if (idx.empty()) return;  // every prompt of the block pools to zero
    Tensor it = x.new_empty({static_cast<int64_t>(idx.size())}, x.options().dtype(at::kLong));
    std::copy(idx.begin(), idx.end(), it.data_ptr<int64_t>());
    xs = x.index_select(0, it);
    if (bp.Fr > 0) fs = fs.index_select(0, it);
  }
  Tensor a = bp.b1.addmm(xs, bp.w1h_t);
  if (bp.Fr > 0) a.addmm_(fs, bp.w1f_t);
  a.relu_();
  const Tensor r = bp.b2.addmm(a, bp.w2_t).relu_().contiguous();
  const float* rp = r.data_ptr<float>();
  // (masked) mean per prompt: sum the rows in order, then divide by the count clamped to >= 1
  std::vector<int64_t> count(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < r.size(0); ++j) {
    const int64_t i = (bp.mask == nullptr ? j : idx[static_cast<size_t>(j)]) / G;
    ++count[static_cast<size_t>(i)];
    float* out = bp.pool + (p0 + i) * bp.R2;
    const float* row = rp + j * bp.R2;
    for (int64_t c = 0; c < bp.R2; ++c) out[c] += row[c];
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c_i = count[static_cast<size_t>(i)];
    if (c_i <= 1) continue;  // one row or none needs no division
    const float inv = 1.0f / static_cast<float>(c_i);
    float* out = bp.pool + (p0 + i) * bp.R2;
    for (int64_t c = 0; c < bp.R2; ++c) out[c] *= inv;
  }
}

}  // namespace

void rollout_pools_cpu(const Tensor& h_resp, int64_t B, int64_t G,
                       std::vector<RolloutBranch>& branches) {
  TORCH_INTERNAL_ASSERT(h_resp.dim() == 2 && h_resp.size(0) == B * G && G >= 1);
  const int64_t H = h_resp.size(1);
  std::vector<BranchPlan> plans;
  std::vector<Tensor> masks;  // keeps contiguous mask copies alive
  plans.reserve(branches.size());
  for (RolloutBranch& br : branches) {
    const Weights& w = *br.w;
    br.pool = h_resp.new_zeros({B, w.R2}, h_resp.options().dtype(at::kFloat));
    const int64_t Fr = br.feat.size(1);
    const bool* mask = nullptr;
    if (br.mask.defined()) {
      masks.push_back(br.mask.contiguous());
      mask = masks.back().data_ptr<bool>();
    }
    plans.push_back(BranchPlan{w.r1w.narrow(1, 0, H).t(), w.r1w.narrow(1, H, Fr).t(), w.r1b,
                               w.r2w.t(), w.r2b, br.feat, mask, br.pool.data_ptr<float>(), Fr,
                               w.R2});
  }
  const int64_t per_block = std::max<int64_t>(1, kBlockRows / G);
  const int64_t nblocks = (B + per_block - 1) / per_block;
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t kb = k0; kb < k1; ++kb) {
      const int64_t p0 = kb * per_block, n = std::min(per_block, B - p0);
      Tensor x = h_resp.narrow(0, p0 * G, n * G);
      if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);  // block-sized, stays in cache
      for (const BranchPlan& bp : plans) run_block(x, p0, n, G, bp);
    }
  });
}

}  // namespace care_ext
