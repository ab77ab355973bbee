// CPU kernel: the rollout branch of the CARE classifiers, blocked over whole prompts.
//
// The rollout branch is nearly all of the acquisition step's FLOPs: for every branch (Stage-I,
// Stage-II) a [rows, H] x [H, R1] GEMM over the hidden states, then [rows, R1] x [R1, R2]. The
// dense composite runs each layer once over all B*G rows, which on the CPU means a full float32
// copy of a bf16 input (128 MiB at 512x16x4096), intermediates that leave the cache, and Stage-II
// GEMM rows that its masked mean then multiplies by zero. Here:
//   * blocks of whole prompts (about kBlockRows rows) are converted to float32 once, into a buffer
//     each thread reuses, and consumed by every branch while they are in cache;
//   * the conversion writes the rows of the masked branch (Stage-II: the valid non-majority
//     rollouts; at most one branch has a mask) first, so that branch multiplies a leading slice
//     of the buffer and an unmasked branch the whole buffer: no row is gathered or multiplied
//     twice; a prompt with an empty mask pools to zero without any GEMM;
//   * where the unmasked and the masked branch's hidden columns lie side by side in one row-major
//     buffer (the CARE core's CPU layout), the masked rows are multiplied by both branches in one
//     [rows, H] x [H, R1u + R1m] GEMM and the other rows by the unmasked branch's columns only;
//   * every pool sums its rows in the block's row order whatever their place in the buffer;
//   * blocks run in parallel on the intra-op pool (at::parallel_for), each with single-threaded
//     BLAS calls, when there are at least as many blocks as threads (else one after the other,
//     each GEMM on BLAS's threads), in a fixed block layout (results do not depend on how blocks
//     meet threads).
//   * with the AVX2 GEMM (CARE_EXT_CPU_GEMM, cpu/f32_gemm.cpp) both layers of every branch are
//     packed once per call and every block multiplies them in place: the Stage-II rows by every
//     panel, the others by Stage-I's panels only, whatever the weights' layout.
// Results equal rollout_pools_dense up to float32 summation order. Unlike the dense path (and the
// reference), which multiplies masked-out rows by zero, a non-finite hidden state outside a
// branch's mask cannot reach that branch's pool.
#include "../classifier_parts.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace care_ext {
namespace {

// Rows per block: a float32 block of 256 x 4096 is 4 MiB, which stays in the last-level cache
// while both branches read it, and keeps the per-block GEMMs large enough to run near peak.
// (On the 2-core EPYC, 128..1024 rows measured within the machine's noise at 512x16x4096.)
constexpr int64_t kBlockRows = 256;

// Rows under which CARE_EXT_CPU_SMALL_BLOCKS does not shrink a block (GEMMs of fewer rows reread
// the first layers' weights, 1 MB per branch at H = 4096, for too little work).
constexpr int64_t kMinBlockRows = 32;

// CARE_EXT_CPU_SMALL_BLOCKS (run time): unset or "1" (the default) gives the blocks
// ceil(B / threads) prompts (never under kMinBlockRows rows) when kBlockRows-row blocks would be
// fewer than the threads (64x8 on a many-core controller: two blocks), so that every thread runs
// blocks of its own with single-threaded GEMMs; "0": kBlockRows-row blocks, run one after the
// other on MKL's threads when they are too few. Measured on the 16-core host of the H200 machine
// (2026-11-27, bench/RESULTS.md, ninth session): the CPU step at 64x8x4096 took 2.63 / 1.81 /
// 1.47 ms on 4 / 8 / 16 threads with small blocks, 3.07 / 2.51 / 3.36 ms without. On 2 threads
// it changes nothing (64x8 makes two blocks). Results within float32 rounding of "0", not always
// its bits: a block's few masked (Stage-II) rows may take another MKL kernel than the same rows
// among more, and the blocks depend on the thread count.
bool small_blocks_requested() { return !env_switch("CARE_EXT_CPU_SMALL_BLOCKS", "1", "0"); }

// Prompts per block of B prompts of G rollouts on `threads` threads (see kBlockRows and
// small_blocks_requested).
int64_t prompts_per_block(int64_t B, int64_t G, int64_t threads, bool small) {
  int64_t per = std::max<int64_t>(1, kBlockRows / G);
  if (small && (B + per - 1) / per < threads) {
    const int64_t want = std::max((B + threads - 1) / threads, (kMinBlockRows + G - 1) / G);
    per = std::min(per, want);
  }
  return per;
}

struct BranchPlan {
  Tensor w1h_t;  // [H, R1] view of resp1_w's hidden columns, transposed
  Tensor w1f_t;  // [Fr, R1] view of resp1_w's feature columns, transposed
  Tensor b1, w2_t, b2;
  Tensor feat;         // [B*G, Fr] float32
  const bool* mask;    // [B, G] row-major, or nullptr
  float* pool;         // [B, R2] row-major, zero-initialised
  int64_t Fr, R2;
  // layer 2 on the AVX2 GEMM: w2_t packed (no bias: b2 is added below), and whether its GEMMs
  // run over torch's threads (blocks one after another); nullptr: MKL
  const F32Panels* l2 = nullptr;
  bool l2_parallel = false;
};

// One block of rows in float32, in buffer order: the rows of the masked branch's mask first, then
// the others, each group in block order. order[k] is the block row at buffer row k; pos is its
// inverse.
struct BlockRows {
  Tensor x;  // [capacity, H] float32, reused from block to block
  std::vector<int64_t> order, pos;
};

// The buffer order of a block of `rows` rows for `lead` ([rows] bool, or nullptr: block order).
void order_block(int64_t rows, const bool* lead, BlockRows& br) {
  br.order.clear();
  br.pos.assign(static_cast<size_t>(rows), 0);
  for (int pass = 0; pass < (lead != nullptr ? 2 : 1); ++pass) {
    for (int64_t j = 0; j < rows; ++j) {
      if (lead == nullptr || lead[j] == (pass == 0)) {
        br.pos[static_cast<size_t>(j)] = static_cast<int64_t>(br.order.size());
        br.order.push_back(j);
      }
    }
  }
}

// Converts rows [row0, row0 + rows) of h [*, H] (float32/bfloat16/float16, any strides) into
// br.x's first `rows` rows, in buffer order for `lead` ([rows] bool, or nullptr: block order).
void load_block(const Tensor& h, int64_t row0, int64_t rows, const bool* lead, BlockRows& br) {
  order_block(rows, lead, br);
  const int64_t H = h.size(1), rs = h.stride(0), cs = h.stride(1), ld = br.x.stride(0);
  float* dst = br.x.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(),
                                  "care_ext.rollout_pools", [&] {
    const scalar_t* src = h.const_data_ptr<scalar_t>() + row0 * rs;
    for (int64_t k = 0; k < rows; ++k) {
      const scalar_t* s = src + br.order[static_cast<size_t>(k)] * rs;
      float* d = dst + k * ld;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (cs == 1) {
          bf16_to_float(reinterpret_cast<const at::BFloat16*>(s), d, H);
          continue;
        }
      }
      if (cs == 1) {
        for (int64_t c = 0; c < H; ++c) d[c] = static_cast<float>(s[c]);
      } else {
        for (int64_t c = 0; c < H; ++c) d[c] = static_cast<float>(s[c * cs]);
      }
    }
  });
}

// The block rows that enter a branch's pool, in block order: all rows, or the rows of the block's
// leading mask. Either way they fill the buffer's first sel.size() rows, so the branch multiplies
// those in place; block row j's product is row br.pos[j].
std::vector<int64_t> selected_rows(const BranchPlan& bp, int64_t p0, int64_t rows, int64_t G) {
  std::vector<int64_t> sel;
  const bool* m = bp.mask != nullptr ? bp.mask + p0 * G : nullptr;
  for (int64_t j = 0; j < rows; ++j) {
    if (m == nullptr || m[j]) sel.push_back(j);
  }
  return sel;
}

// The rest of a branch after the first layer's hidden columns: `a` [used, R1] (unit column
// stride, any row stride) holds b1 + x W1h^T for the buffer's first `used` rows. One pass over
// `a` adds the feature columns and applies relu; layer 2 is one GEMM without its bias (MKL,
// beta = 0); one pass over its output adds b2, applies relu and sums each row into its prompt's
// (masked) mean. The same sums as addmm + relu_ + addmm + relu_ + a sum (each product rounded,
// then added; b2 added after the GEMM's sum as MKL does with beta = 1), without the feature
// GEMM, the bias copies and the relu passes (the step 2-4.5% faster at 64x8x4096 and
// 512x16x4096; bench/RESULTS.md, eleventh session). relu keeps NaN (std::max(NaN, 0) is NaN).
void finish_branch(const BlockRows& br, int64_t p0, int64_t n, int64_t G, const BranchPlan& bp,
                   const std::vector<int64_t>& sel, Tensor a) {
  const int64_t used = static_cast<int64_t>(sel.size()), R1 = a.size(1), R2 = bp.R2;
  TORCH_INTERNAL_ASSERT(a.scalar_type() == at::kFloat && a.stride(1) == 1 && a.size(0) == used);
  float* ap = a.data_ptr<float>();
  const int64_t lda = a.stride(0), Fr = bp.Fr;
  const std::vector<float> wf = feature_weights(bp.w1f_t);  // resp1_w's feature columns
  const float* feat = bp.feat.const_data_ptr<float>();     // [B*G, Fr]
  const int64_t fs0 = bp.feat.stride(0), fs1 = bp.feat.stride(1);
  for (int64_t k = 0; k < used; ++k) {
    const int64_t g = p0 * G + br.order[static_cast<size_t>(k)];  // the row of the batch
    add_features_relu(ap + k * lda, R1, Fr > 0 ? feat + g * fs0 : nullptr, fs1, Fr, wf.data());
  }
  Tensor r;  // [used, R2] at row stride ldr
  int64_t ldr = R2;
  if (bp.l2 != nullptr) {
    ldr = bp.l2->panels * kF32Panel;
    r = at::empty({used, ldr}, a.options());
    (bp.l2_parallel ? f32_gemm_panels_parallel : f32_gemm_panels)(
        ap, lda, used, *bp.l2, 0, bp.l2->panels, r.data_ptr<float>(), ldr);
  } else {
    r = at::mm(a, bp.w2_t);
  }
  const Tensor b2 = bp.b2.contiguous();
  const float* rp = r.const_data_ptr<float>();
  const float* bias = b2.const_data_ptr<float>();
  // (masked) mean per prompt: sum the rows in block order, then divide by the count clamped to >= 1
  std::vector<int64_t> count(static_cast<size_t>(n), 0);
  for (const int64_t j : sel) {
    const int64_t i = j / G;
    ++count[static_cast<size_t>(i)];
    float* __restrict__ out = bp.pool + (p0 + i) * R2;
    const float* __restrict__ row = rp + br.pos[static_cast<size_t>(j)] * ldr;
    for (int64_t c = 0; c < R2; ++c) out[c] += std::max(row[c] + bias[c], 0.0f);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c_i = count[static_cast<size_t>(i)];
    if (c_i <= 1) continue;  // one row or none needs no division
    const float inv = 1.0f / static_cast<float>(c_i);
    float* out = bp.pool + (p0 + i) * R2;
    for (int64_t c = 0; c < R2; ++c) out[c] *= inv;
  }
}

void run_block(const BlockRows& br, int64_t p0, int64_t n, int64_t G, const BranchPlan& bp) {
  const std::vector<int64_t> sel = selected_rows(bp, p0, n * G, G);
  const int64_t used = static_cast<int64_t>(sel.size());
  if (used == 0) return;  // every prompt of the block pools to zero
  finish_branch(br, p0, n, G, bp, sel, bp.b1.addmm(br.x.narrow(0, 0, used), bp.w1h_t));
}

// An unmasked branch u and a masked branch m whose hidden columns lie side by side in one
// row-major buffer (adjacent_columns): the masked rows -- the buffer's leading rows -- are
// multiplied once by both ([used_m, H] x [H, R1u + R1m]), the other rows by u's columns only.
struct SharedFirstLayer {
  AdjacentColumns both;  // a = u's hidden columns, b = m's
  size_t u = 0, m = 0;   // the branches' plan indices
};

void run_block_shared(const BlockRows& br, int64_t p0, int64_t n, int64_t G,
                      const std::vector<BranchPlan>& plans, const SharedFirstLayer& sh) {
  const BranchPlan &u = plans[sh.u], &m = plans[sh.m];
  const int64_t rows = n * G;
  const std::vector<int64_t> sel_m = selected_rows(m, p0, rows, G);
  const int64_t used_m = static_cast<int64_t>(sel_m.size());
  if (used_m == 0) {  // no masked row in this block: u alone; m pools to zero
    run_block(br, p0, n, G, u);
    return;
  }
  const Tensor lead = sh.both.bias.addmm(br.x.narrow(0, 0, used_m), sh.both.w);
  Tensor a_u = at::empty({rows, u.w1h_t.size(1)}, br.x.options());
  a_u.narrow(0, 0, used_m).copy_(lead.narrow(1, sh.both.off_a, u.w1h_t.size(1)));
  if (rows > used_m) {
    Tensor rest = a_u.narrow(0, used_m, rows - used_m);
    at::addmm_out(rest, u.b1, br.x.narrow(0, used_m, rows - used_m), u.w1h_t);
  }
  finish_branch(br, p0, n, G, u, selected_rows(u, p0, rows, G), a_u);
  finish_branch(br, p0, n, G, m, sel_m, lead.narrow(1, sh.both.off_b, m.w1h_t.size(1)));
}

// The branches' first layers (hidden columns) packed for the AVX2 GEMM (cpu/f32_gemm.cpp): the
// unmasked branches' groups first, the masked branch's last, so that the rows outside the mask
// (the buffer's trailing rows) multiply one leading panel range.
struct PanelPlan {
  F32Panels f;
  std::vector<size_t> group;  // plan i's group
  int64_t masked = -1;        // the masked plan's index, or -1
  std::vector<F32Panels> l2;  // plan i's layer 2 (BranchPlan::l2 points here: moving the plan
                              // moves the vector's buffer, so the pointers stay valid)
};

// Packs the first layers (and each plan's layer 2, which `plans` are pointed at), or with `f32`
// takes them from the step's packing (plans: Stage-I unmasked, then Stage-II masked).
PanelPlan plan_panels(std::vector<BranchPlan>& plans, bool parallel, const StepF32Panels* f32) {
  PanelPlan pp;
  if (f32 != nullptr) {
    TORCH_INTERNAL_ASSERT(plans.size() == 2 && plans[0].mask == nullptr &&
                          plans[1].mask != nullptr);
    pp.l2 = {f32->l2[0], f32->l2[1]};
    pp.f = f32->rollout;
    pp.group = {0, 1};
    pp.masked = 1;
  } else {
    for (const BranchPlan& bp : plans) pp.l2.push_back(pack_f32_panels({{bp.w2_t, Tensor()}}));
    std::vector<std::pair<Tensor, Tensor>> groups;
    pp.group.assign(plans.size(), 0);
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t i = 0; i < plans.size(); ++i) {
        if ((plans[i].mask != nullptr) != (pass == 1)) continue;
        if (pass == 1) pp.masked = static_cast<int64_t>(i);
        pp.group[i] = groups.size();
        groups.emplace_back(plans[i].w1h_t, plans[i].b1);
      }
    }
    pp.f = pack_f32_panels(groups);
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    plans[i].l2 = &pp.l2[i];
    plans[i].l2_parallel = parallel;
  }
  return pp;
}

// A block on the AVX2 GEMM: the masked rows (the buffer's leading rows) times every panel, the
// other rows times the unmasked groups' panels; then each branch as run_block does. With
// `parallel`, the GEMMs run over torch's threads (same bits).
void run_block_panels(const BlockRows& br, int64_t p0, int64_t n, int64_t G,
                      const std::vector<BranchPlan>& plans, const PanelPlan& pp, bool parallel) {
  const int64_t rows = n * G;
  std::vector<std::vector<int64_t>> sels;
  for (const BranchPlan& bp : plans) sels.push_back(selected_rows(bp, p0, rows, G));
  const F32Panels& f = pp.f;
  const int64_t ld = f.panels * kF32Panel, lda = br.x.stride(0);
  Tensor c = at::empty({rows, ld}, br.x.options());
  const float* x = br.x.const_data_ptr<float>();
  float* cp = c.data_ptr<float>();
  auto gemm = parallel ? f32_gemm_panels_parallel : f32_gemm_panels;
  const int64_t lead =
      pp.masked >= 0 ? static_cast<int64_t>(sels[static_cast<size_t>(pp.masked)].size()) : rows;
  gemm(x, lda, lead, f, 0, f.panels, cp, ld);
  if (lead < rows) {
    gemm(x + lead * lda, lda, rows - lead, f, 0, f.first[f.first.size() - 2], cp + lead * ld, ld);
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    const int64_t used = static_cast<int64_t>(sels[i].size());
    if (used == 0) continue;  // every prompt of the block pools to zero
    const size_t g = pp.group[i];
    finish_branch(br, p0, n, G, plans[i], sels[i],
                  c.narrow(0, 0, used).narrow(1, f.first[g] * kF32Panel, f.cols[g]));
  }
}

// The column blocks of packed split pieces (packed_block_cols() columns each, over all T terms'
// Rt units): `masked` those whose every column is a unit of the masked branch (Stage-II with the
// CARE core's 64 units per stage: 3 of the 6 blocks), which only that branch's rows need; `all`
// the others. Without a masked branch every block is in `all`.
struct PackedBlocks {
  std::vector<int64_t> all, masked;
  size_t masked_plan = 0;
};

PackedBlocks packed_blocks(const std::vector<BranchPlan>& plans, const std::vector<int64_t>& cols,
                           int64_t T, int64_t Rt) {
  PackedBlocks pb;
  int64_t m = -1;
  for (size_t i = 0; i < plans.size(); ++i) {
    if (plans[i].mask != nullptr) m = static_cast<int64_t>(i);
  }
  const int64_t N = T * Rt, bc = packed_block_cols();
  for (int64_t j = 0; j * bc < N; ++j) {
    bool masked_only = m >= 0;
    for (int64_t col = j * bc; masked_only && col < std::min(N, (j + 1) * bc); ++col) {
      const int64_t u = col % Rt - cols[static_cast<size_t>(m)];
      masked_only = u >= 0 && u < plans[static_cast<size_t>(m)].b1.size(0);
    }
    (masked_only ? pb.masked : pb.all).push_back(j);
  }
  pb.masked_plan = static_cast<size_t>(std::max<int64_t>(m, 0));
  return pb;
}

// bf16 x [rows, H] (unit column stride) times the packed pieces -> float32 [rows, T * Rt]: the
// `all` column blocks for every row, the `masked` ones only for the masked branch's rows of this
// block (gathered, multiplied, scattered back; their other rows are never read): at 64x8 the
// Stage-II units need 41% of the rows.
Tensor packed_block_products(const Tensor& x, const Tensor& packed, int64_t N,
                             const PackedBlocks& pb, const std::vector<int64_t>& sel_m) {
  const int64_t rows = x.size(0), H = x.size(1), bc = packed_block_cols();
  Tensor c = at::empty({rows, N}, x.options().dtype(at::kFloat));
  const auto* xp = x.const_data_ptr<at::BFloat16>();
  const auto* pp = packed.const_data_ptr<at::BFloat16>();
  float* cp = c.data_ptr<float>();
  bf16_products_packed_into(xp, rows, x.stride(0), pp, N, H, cp, N, &pb.all);
  const int64_t used = static_cast<int64_t>(sel_m.size());
  if (pb.masked.empty() || used == 0) return c;
  Tensor xm = at::empty({used, H}, x.options());
  auto* xmp = xm.mutable_data_ptr<at::BFloat16>();
  for (int64_t g = 0; g < used; ++g) {
    std::memcpy(xmp + g * H, xp + sel_m[static_cast<size_t>(g)] * x.stride(0),
                static_cast<size_t>(H) * sizeof(at::BFloat16));
  }
  Tensor cm = at::empty({used, N}, c.options());
  const float* cmp = cm.const_data_ptr<float>();
  bf16_products_packed_into(xmp, used, H, pp, N, H, cm.data_ptr<float>(), N, &pb.masked);
  for (int64_t g = 0; g < used; ++g) {
    for (const int64_t j : pb.masked) {
      const int64_t n0 = j * bc, nb = std::min(bc, N - n0);
      std::memcpy(cp + sel_m[static_cast<size_t>(g)] * N + n0, cmp + g * N + n0,
                  static_cast<size_t>(nb) * sizeof(float));
    }
  }
  return c;
}

// A block on the split first layers: the block's bf16 rows times all T * Rt split rows in one
// bf16 GEMM (exact products, float32 sums; no float32 copy of the block; on `packed`, when
// defined, BRGeMM calls instead of MKL's GEMM and its per-call packing), then each branch's
// pre-activations, in buffer order, summed from its T terms plus its bias.
void run_block_split(const Tensor& h_resp, int64_t p0, int64_t n, int64_t G, BlockRows& br,
                     const bool* lead, const std::vector<BranchPlan>& plans, const Tensor& split2d,
                     const Tensor& packed, const PackedBlocks& pb, int64_t T, int64_t Rt,
                     const std::vector<int64_t>& cols) {
  const int64_t rows = n * G;
  order_block(rows, lead, br);
  std::vector<std::vector<int64_t>> sels;  // each branch's rows of this block, block order
  sels.reserve(plans.size());
  for (const BranchPlan& bp : plans) sels.push_back(selected_rows(bp, p0, rows, G));
  Tensor x = h_resp.narrow(0, p0 * G, rows);
  Tensor c;  // [rows, T * Rt]
  if (packed.defined()) {
    if (x.stride(1) != 1) x = x.contiguous();
    c = packed_block_products(x, packed, T * Rt, pb, sels[pb.masked_plan]);
  } else {
    c = bf16_products(x, split2d);
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    const BranchPlan& bp = plans[i];
    const std::vector<int64_t>& sel = sels[i];
    const int64_t used = static_cast<int64_t>(sel.size());
    if (used == 0) continue;  // every prompt of the block pools to zero
    const int64_t R1 = bp.b1.size(0);
    Tensor a = at::empty({used, R1}, c.options());
    const Tensor b1 = bp.b1.contiguous();
    sum_split_terms(c.const_data_ptr<float>(), T * Rt, T, Rt, cols[i], b1.const_data_ptr<float>(),
                    R1, br.order.data(), used, a.data_ptr<float>(), R1);
    finish_branch(br, p0, n, G, bp, sel, a);
  }
}

}  // namespace

void rollout_pools_cpu(const Tensor& h_resp, int64_t B, int64_t G,
                       std::vector<RolloutBranch>& branches, const Tensor& split,
                       const std::vector<int64_t>& split_cols, const Tensor& packed,
                       const StepF32Panels* f32) {
  TORCH_INTERNAL_ASSERT(f32 == nullptr || !split.defined());
  TORCH_INTERNAL_ASSERT(h_resp.dim() == 2 && h_resp.size(0) == B * G && G >= 1);
  const int64_t H = h_resp.size(1);
  std::vector<BranchPlan> plans;
  std::vector<Tensor> masks;  // keeps contiguous mask copies alive
  plans.reserve(branches.size());
  const bool* lead = nullptr;  // the masked branch's mask orders every block's buffer
  for (RolloutBranch& br : branches) {
    const Weights& w = *br.w;
    br.pool = h_resp.new_zeros({B, w.R2}, h_resp.options().dtype(at::kFloat));
    const int64_t Fr = br.feat.size(1);
    const bool* mask = nullptr;
    if (br.mask.defined()) {
      masks.push_back(br.mask.contiguous());
      mask = masks.back().data_ptr<bool>();
      TORCH_INTERNAL_ASSERT(lead == nullptr, "rollout_pools_cpu: at most one masked branch");
      lead = mask;
    }
    plans.push_back(BranchPlan{w.r1w.narrow(1, 0, H).t(), w.r1w.narrow(1, H, Fr).t(), w.r1b,
                               w.r2w.t(), w.r2b, br.feat, mask, br.pool.data_ptr<float>(), Fr,
                               w.R2});
  }
  // Stage-I (unmasked) and Stage-II (masked) with their hidden columns in one buffer: one GEMM
  // over both for the masked rows (the CARE core's CPU layout, care_ext.ops.core_step_layout).
  // the float32 rollout layers on the AVX2 GEMM (CARE_EXT_CPU_GEMM), packed once for every block
  // below; it takes any layout, so the shared first layer is MKL's only
  const bool f32_panels =
      !split.defined() && B > 0 && (f32 != nullptr || cpu_f32_gemm_selected(H));
  std::optional<SharedFirstLayer> shared;
  if (!split.defined() && !f32_panels && plans.size() == 2 &&
      (plans[0].mask == nullptr) != (plans[1].mask == nullptr)) {
    SharedFirstLayer sh;
    sh.u = plans[0].mask == nullptr ? 0 : 1;
    sh.m = 1 - sh.u;
    sh.both = adjacent_columns(plans[sh.u].w1h_t, plans[sh.u].b1, plans[sh.m].w1h_t,
                               plans[sh.m].b1);
    if (sh.both.w.defined()) shared = sh;
  }
  Tensor split2d;  // [T * Rt, H]: every term's rows, for one bf16 GEMM per block
  int64_t T = 0, Rt = 0;
  if (split.defined()) {
    TORCH_INTERNAL_ASSERT(split.dim() == 3 && split.size(2) == H &&
                          split_cols.size() == plans.size() &&
                          h_resp.scalar_type() == at::kBFloat16);
    T = split.size(0);
    Rt = split.size(1);
    split2d = split.reshape({T * Rt, H});
  }
  const PackedBlocks pblocks =
      packed.defined() ? packed_blocks(plans, split_cols, T, Rt) : PackedBlocks{};
  const int64_t per_block = prompts_per_block(B, G, at::get_num_threads(),
                                              small_blocks_requested());
  const int64_t nblocks = (B + per_block - 1) / per_block;
  const bool block_parallel = nblocks >= at::get_num_threads();
  std::optional<PanelPlan> panels;
  if (f32_panels) panels = plan_panels(plans, !block_parallel, f32);
  auto blocks = [&](int64_t k0, int64_t k1) {
    BlockRows br;  // one buffer per task, reused by its blocks (the split path reads the bf16
                   // rows in place and uses only the buffer order)
    if (!split.defined()) {  // rows padded for the AVX2 GEMM (f32_row_stride), MKL reads any
      const int64_t ld = panels.has_value() ? f32_row_stride(H) : H;
      const int64_t cap = std::min(per_block, B) * G;
      br.x = pooled_floats(cap * ld).view({cap, ld}).narrow(1, 0, H);
    }
    for (int64_t kb = k0; kb < k1; ++kb) {
      const int64_t p0 = kb * per_block, n = std::min(per_block, B - p0);
      const bool* block_lead = lead != nullptr ? lead + p0 * G : nullptr;
      if (split.defined()) {
        run_block_split(h_resp, p0, n, G, br, block_lead, plans, split2d, packed, pblocks, T,
                        Rt, split_cols);
        continue;
      }
      load_block(h_resp, p0 * G, n * G, block_lead, br);
      if (panels.has_value()) {
        run_block_panels(br, p0, n, G, plans, *panels, !block_parallel);
      } else if (shared.has_value()) {
        run_block_shared(br, p0, n, G, plans, *shared);
      } else {
        for (const BranchPlan& bp : plans) run_block(br, p0, n, G, bp);
      }
    }
  };
  if (block_parallel) {
    at::parallel_for(0, nblocks, 1, blocks);  // every thread gets a block: BLAS single-threaded
  } else {
    // Fewer blocks than threads (64x8 makes two blocks; a controller may have 16 cores): one
    // block at a time, outside any parallel region, so BLAS threads each GEMM over all cores, as
    // before the library was built with OpenMP. Smaller blocks instead measured no better on two
    // threads (bench/RESULTS.md, 2026-11-27); only with CARE_EXT_CPU_SMALL_BLOCKS=0 (by default
    // small blocks are made whenever the 256-row ones are fewer than the threads).
    blocks(0, nblocks);
  }
}

}  // namespace care_ext
