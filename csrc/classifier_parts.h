// The pieces of the CARE classifier forward (BatchNorm folded into the Linear layers) shared by the
// device-generic composite (classifier.cpp) and the blocked CPU rollout branch (cpu/rollout_pool.cpp).
//
//   p      = relu(prompt_w [h_p ; f_p] + prompt_b)                       prompt branch   [B, P]
//   r_i    = relu(resp2_w relu(resp1_w [h_i ; f_i] + resp1_b) + resp2_b) rollout branch  [B, G, R2]
//   pool   = (masked) mean of r_i over the G rollouts of each prompt                     [B, R2]
//   logits = head2_w relu(head1_w [p ; pool] + head1_b) + head2_b                        [B, C]
#pragma once

#include "care_ext.h"
#include "step_tail.h"

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace care_ext {

// A run-time switch read from the environment variable `name`: false when unset, empty or `off`,
// true when `on`; any other value is an error naming the variable and both values.
inline bool env_switch(const char* name, const char* off, const char* on) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == 0 || std::strcmp(env, off) == 0) return false;
  TORCH_CHECK(std::strcmp(env, on) == 0, name, " must be ", off, " or ", on, ", got '", env, "'");
  return true;
}

// A run-time choice read from the environment variable `name`: -1 when unset, empty or "auto",
// else the index of its value in `choices`; any other value is an error naming the variable and
// the values ("NAME must be a, b or auto").
template <size_t N>
int env_choice(const char* name, const char* const (&choices)[N]) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) return -1;
  for (size_t i = 0; i < N; ++i) {
    if (std::strcmp(env, choices[i]) == 0) return static_cast<int>(i);
  }
  std::string list;
  for (size_t i = 0; i < N; ++i) list += std::string(choices[i]) + (i + 1 < N ? ", " : "");
  TORCH_CHECK(false, name, " must be ", list, " or auto, got '", env, "'");
  return -1;
}

// CARE_EXT_TAIL_STAGE_R2 (run time): "1" makes each block of the fused step's tail stage its rollout
// layer-2 weight first (stage_r2w; CUDA: in shared memory, opting in above 48 KB; the CPU's
// _acquisition_step_fused_block: a buffer of the block's), unset or "0" reads it where it is.
// Off by default: on the H200 (2026-11-27) it made the tail slower, 714.8 against 512.9 us at
// 1024x64x4096 and 31.7 against 24.1 us at 64x8x4096 (one block per SM with 128 KB staged).
inline bool tail_stage_r2w_requested() { return env_switch("CARE_EXT_TAIL_STAGE_R2", "0", "1"); }

// CARE_EXT_TAIL_STAGE_H2 (run time): "1" (the default: also when unset or empty) makes each
// one-prompt block of the fused step's tail issue the copies of its head layer-2 weight (K x C
// floats, stage_h2w) into shared memory at its start (cp.async: they land during the branches),
// where the block's whole shared memory stays within the default 48 KB (the CUDA launch skips it
// elsewhere: at G = 64 the 65 KB alone are too much; the CPU's _acquisition_step_fused_block: a
// buffer of the block's), and head layer 2 reads it there; "0" reads it where it is. Same values,
// so the same bits. On the H200 (2026-11-28, bench/RESULTS.md, twenty-first session; split2 step,
// 0 / 1 alternated twice) head layer 2 went from 2.9 / 3.1 to 1.5 / 1.3 us (Stage-I / Stage-II,
// CARE_EXT_TAIL_STAMPS), the tail kernel from 23.5 to 22.2 us and the replayed step at 64 x 8 x
// 4096 from 40.8 / 40.8 to 39.9 / 39.4 us; 256 x 32 and 1024 x 64 (more prompts per block: not
// staged) unchanged.
inline bool tail_stage_h2w_requested() {
  const char* env = std::getenv("CARE_EXT_TAIL_STAGE_H2");
  if (env == nullptr || *env == 0) return true;
  return env_switch("CARE_EXT_TAIL_STAGE_H2", "0", "1");
}

// CARE_EXT_TAIL_DOT_AHEAD (run time): "1" runs the one-prompt tail (the CUDA kernel, and the CPU's
// _acquisition_step_fused_block with one prompt per block) with its head's dot products
// software-pipelined (dot_chunks_ahead, step_tail.h: the next 32 weights loaded before this
// chunk's multiply-adds); unset or "0" the plain chunks. The same bits. Prepared on 2026-11-28
// without device time left to measure it: off until a GPU session has.
inline bool tail_dot_ahead_requested() { return env_switch("CARE_EXT_TAIL_DOT_AHEAD", "0", "1"); }

// CARE_EXT_TAIL_STAMPS (run time, CUDA): "1" has thread 0 of every tail block write clock64() at
// the tail's phase boundaries (TailStamps, step_tail.h); after each launch the host waits for the
// stream (not while it is captured) and prints per stage the phases' median and slowest block in
// cycles and microseconds to stderr. A diagnostic: never set it in a timed run.
inline bool tail_stamps_requested() { return env_switch("CARE_EXT_TAIL_STAMPS", "0", "1"); }

// CARE_EXT_TAIL_L2 (run time): how the CUDA tail runs rollout layer 2 (the step's largest
// arithmetic: B * G * R1 * R2 multiply-adds per classifier). "ffma": float32 FFMA register tiles,
// the same sums in the same order as the CPU twin; "mma": tensor cores, three TF32 products per
// float32 one (layer2_pool_parts_mma: float32-accurate, another summation order), where the
// device has them (sm_80+) and R1 is a multiple of 8, else the FFMA tiles; "auto" (the default,
// also when unset or empty): mma for groups of at least kTailL2MmaMinG rollouts, ffma below. On
// the H200 (2026-11-27, bench/RESULTS.md, thirteenth session; graph replays of the split2 step,
// one run) mma with pre-split operands (CARE_EXT_TAIL_MMA_PRESPLIT, below) against ffma took 558
// vs 704 us at 1024x64x4096, 127 vs 143 at 256x32, 153 vs 162 at 512x16, but 46.5 vs 44.0 at
// 64x8 (one 16-row tile, half of it padding). Splitting in the loop, mma had lost at 512x16 (173)
// and 64x8 (47.9), so the threshold was 32 before. The CPU always runs the FFMA tiles (the value
// is checked).
constexpr int64_t kTailL2MmaMinG = 16;

// Whether the CUDA tail asks for tensor-core layer 2 at group size G (CARE_EXT_TAIL_L2, above);
// any value but ffma, mma, auto, empty or unset is an error naming the variable.
inline bool tail_l2_mma_requested(int64_t G) {
  const int asked = env_choice("CARE_EXT_TAIL_L2", {"ffma", "mma"});
  return asked < 0 ? G >= kTailL2MmaMinG : asked == 1;
}

// CARE_EXT_TAIL_MMA_PRESPLIT (run time): "1" (the default, also when unset or empty) lets the
// tensor-core layer 2 (above) read its operands split into TF32 pieces once per call: the weight
// by a small kernel before the tail (HeadWeights::r2w_frag, fragment order), the layer-1 outputs
// by layer 1 as it writes them (HeadScratch::r1lo); "0" splits both inside layer 2's loop, the
// weight again for every prompt and pair of row tiles, each activation again for every warp pass.
// The same pieces either way, so the same bits; it costs R1 * r1t_ld(G) floats more shared memory
// per block. Ignored where layer 2 runs FFMA tiles.
inline bool tail_mma_presplit_requested() {
  const char* env = std::getenv("CARE_EXT_TAIL_MMA_PRESPLIT");
  if (env == nullptr || *env == 0 || std::strcmp(env, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "0") == 0, "CARE_EXT_TAIL_MMA_PRESPLIT must be 0 or 1, got '", env,
              "'");
  return false;
}

// CARE_EXT_TAIL_MMA_TILES (run time): the pre-split tensor-core layer 2's register tiles per warp,
// row tiles x unit tiles of 16 x 8: "2x4" (the default, also when unset or empty; each weight
// fragment serves 2 row tiles) or "4x2" (kMmaRowTilesTall: each serves 4, half the weight's L2
// traffic, twice the input fragments' shared loads). The same products per accumulator in the
// same order, so the same bits. Prepared on 2026-11-27 from ncu's view of the 1024x64x4096 tail;
// it lost on the H200 (2026-11-28, graph replays of the split2 step, two rounds: 1024x64 565.8 /
// 567.9 against 556.0 / 556.1 us, 256x32 130.7 / 130.4 against 118.1 / 118.0), hence off.
// Ignored where layer 2 does not read pre-split operands.
inline bool tail_mma_tall_tiles_requested() {
  return env_switch("CARE_EXT_TAIL_MMA_TILES", "2x4", "4x2");
}

// CARE_EXT_TAIL_HEAD (run time): where the fused step's head (both head layers and the stage's
// outputs) runs. "tail" (the default, also when unset or empty): in each tail block, for its one
// to four prompts, each block streaming its classifier's whole head layer 1 from L2; "split": in
// a kernel of its own after the tail (step_head_kernel: blocks of kHeadUnits units x up to
// kMaxHeadPrompts prompts, the last block of a group finishing it; step_tail.h), the tail writing
// each prompt's head input to global memory. The same sums in the same order, so the same bits.
// The CPU's block twin (_acquisition_step_fused_block) runs the split head too, block after block,
// so its arithmetic and counters are tested on every machine; the per-prompt CPU twin ignores it.
// Lost on the H200 (2026-11-28, graph replays of the split2 step): 80.5-87.0 against 39.9-41.5 us
// at 64 x 8 x 4096, 686.6-694.4 against 553-558 at 1024 x 64 (the head kernel alone 49.5 and
// 209.6 us, the tail without its head 13.5 and 250), hence off. Since then (not measured): its
// finish stages the layer-2 weight in shared memory and runs its prompts' outputs on teams of
// lanes (stage_outputs), side by side.
inline bool tail_head_split_requested() { return env_switch("CARE_EXT_TAIL_HEAD", "tail", "split"); }

// CARE_EXT_STEP_OVERLAP (run time): whether the CUDA fused step runs group_features and the prompt
// branches' first-layer GEMM(s) on a second stream beside the rollout GEMM(s) (SideWork, below;
// the policy is in csrc/cuda/step_fused.cu): "0" never, "1" always, "auto" (the default, also when
// unset or empty) by the launch's rule. Returns 0, 1, or -1 for auto; any other value is an error
// naming the variable. The CPU twin runs everything in order whatever it says (the value is
// checked).
inline int step_overlap_requested() { return env_choice("CARE_EXT_STEP_OVERLAP", {"0", "1"}); }

// Held for the whole of every op that runs ATen GEMMs (classifier_forward, acquisition_step, the
// fused step's host part):
//   * Autocast keys excluded: the ops compute in float32 whatever a caller's torch.autocast
//     region says. Without it their inner mm/addmm calls re-dispatch through the Autocast keys,
//     come back in bfloat16 and fail (a dtype mismatch, or data_ptr<float> on a bf16 tensor).
//   * Autograd and ADInplaceOrView keys excluded (what torch's own kernels run under,
//     at::AutoDispatchBelowADInplaceOrView): the ops a kernel calls are never recorded (none of
//     these ops has a derivative), so their narrow/t/empty skip the autograd layer and the view
//     tracking. The public step at 1x8x64 on one thread: -11% (bench/RESULTS.md, eleventh
//     session).
// at::parallel_for carries the exclusions into the CPU step's worker threads (thread-local state
// propagates).
struct KernelDispatchGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset |
                                          c10::autograd_dispatch_keyset_with_ADInplaceOrView};
};

// The 10 folded weights of one classifier (float32, on the inputs' device) and their sizes.
struct Weights {
  Tensor pw, pb, r1w, r1b, r2w, r2b, h1w, h1b, h2w, h2b;
  int64_t P, R1, R2, K, C;
};

// Checks the 10 folded weights against the input sizes H, Fp (prompt features) and Fr (rollout
// features); expect_classes < 0 accepts any number of output classes. Messages name `op` and `arg`.
Weights check_weights(at::TensorList w, int64_t H, int64_t Fp, int64_t Fr, int64_t expect_classes,
                      const at::Device& device, const char* op, const char* arg);

// Checks a float32/bfloat16/float16 hidden-state tensor of rank `dim`.
void check_hidden(const Tensor& t, int64_t dim, const char* op, const char* name, const char* shape);

// Prompt branch and head: float32 [B, C] logits from h_prompt [B, H] (any float dtype), prompt
// features [B, Fp] float32 and the pooled rollout branch [B, R2] float32.
Tensor prompt_and_head(const Weights& w, const Tensor& h_prompt, const Tensor& prompt_feat,
                       const Tensor& pool);

// CPU passes over a first layer's output, shared by the rollout branch (cpu/rollout_pool.cpp)
// and the head (classifier.cpp). feature_weights: a first layer's feature columns, given as the
// [F, U] view w.narrow(1, H, F).t() of its weight w [U, H + F] (float32), copied contiguous.
// add_features_relu: row[u] = relu(row[u] + sum_f v[f * vs] * wf[f * U + u]) for u < U, one
// pass (relu keeps NaN: std::max(NaN, 0) is NaN); v is not read when F = 0 (may be null).
std::vector<float> feature_weights(const Tensor& wf_t);
inline void add_features_relu(float* __restrict__ row, int64_t U, const float* v, int64_t vs,
                              int64_t F, const float* wf) {
  for (int64_t f = 0; f < F; ++f) {
    const float x = v[f * vs];
    const float* __restrict__ w = wf + f * U;
    for (int64_t u = 0; u < U; ++u) row[u] += x * w[u];
  }
  for (int64_t u = 0; u < U; ++u) row[u] = std::max(row[u], 0.0f);
}

// The same from the prompt branch's hidden-column pre-activation pre = prompt_b + h_p W_h^T
// ([B, P] float32, any strides): adds the feature columns, then relu and the head. On the CPU in
// fused passes with head layer 1 as one GEMM over [p ; pool] (pre is not written); elsewhere ATen
// ops (pre is updated in place). `h1`: head layer 1 already packed for the AVX2 GEMM
// (step_f32_panels; CPU only), else packed per call where cpu_f32_gemm_selected(H).
struct F32Panels;
Tensor head_from_prompt_pre(const Weights& w, Tensor pre, const Tensor& prompt_feat,
                            const Tensor& pool, const F32Panels* h1 = nullptr);

// Two weight views a [K, Na] and b [K, Nb] (float32, unit column stride, the same row stride ld)
// that are adjacent column blocks of one row-major matrix -- b's columns start right after a's
// (or a's after b's) in the same storage, ld >= Na + Nb -- with their biases [Na] and [Nb]:
// `w` is one [K, Na + Nb] view over both, `bias` the two biases in the same column order, and
// a's and b's columns start at off_a and off_b. `w` is undefined when they are not adjacent
// (then multiply them apart). The CARE core stores both stages' first layers so on the CPU
// (care_ext.ops.core_step_layout): one GEMM over both is ~17% cheaper on MKL than two
// (bench/RESULTS.md, 2026-11-27, third session).
struct AdjacentColumns {
  Tensor w, bias;
  int64_t off_a = 0, off_b = 0;
};
AdjacentColumns adjacent_columns(const Tensor& a, const Tensor& bias_a, const Tensor& b,
                                 const Tensor& bias_b);

// One classifier's rollout branch as input to the pooled computation:
//   w    its weights;
//   feat float32 [B*G, Fr] rollout features (Fr may be 0);
//   mask bool [B, G] rollouts that enter the pool (masked mean, count clamped to >= 1), or an
//        undefined tensor for the plain mean over all G;
//   pool output, float32 [B, R2], written by the functions below.
struct RolloutBranch {
  const Weights* w;
  Tensor feat;
  Tensor mask;
  Tensor pool;
};

// Dense rollout branch on any device (ATen ops over all B*G rows: what the CUDA path runs).
// h_resp: [B*G, H] any float dtype.
void rollout_pools_dense(const Tensor& h_resp, int64_t B, int64_t G,
                         std::vector<RolloutBranch>& branches);

// Blocked CPU rollout branch (cpu/rollout_pool.cpp): the hidden states are read once, a block of
// whole prompts at a time (converted to float32 per block, so a bf16 input never exists as a full
// float32 copy), every branch consumes the block while it is in cache, rows outside a branch's mask
// are skipped (never multiplied), and blocks run in parallel on the intra-op thread pool.
// Same results as rollout_pools_dense up to float32 summation order.
// With `split` defined (bf16 [T, Rt, H], care_ext.bf16_split.first_layer_split's rollout part;
// h_resp bfloat16): the first layers' hidden products come from bf16_products of each block's
// rows with all T * Rt split rows, branch i's units at columns split_cols[i] .. + R1 of each
// term; the float32 buffer and its conversion are skipped.
// With `packed` also defined (split packed by care_ext::_pack_bf16_split), those products run
// as oneDNN BRGeMM calls on the packed pieces (bf16_products_packed) instead of MKL's GEMM.
// With `f32` (the step's weights packed once, step_f32_panels; branches = {Stage-I unmasked,
// Stage-II masked}; no split): the first layers and layer 2 run on the AVX2 GEMM on those panels,
// whatever CARE_EXT_CPU_GEMM says, with the same bits as the per-call packing.
struct StepF32Panels;
void rollout_pools_cpu(const Tensor& h_resp, int64_t B, int64_t G,
                       std::vector<RolloutBranch>& branches, const Tensor& split = Tensor(),
                       const std::vector<int64_t>& split_cols = {},
                       const Tensor& packed = Tensor(), const StepF32Panels* f32 = nullptr);

// The float32 first-layer GEMMs on AVX2 + FMA (cpu/f32_gemm.cpp), for CPUs where MKL's SGEMM is
// slow (measured on AMD Zen 3).
// cpu_f32_gemm_available(): this build and CPU have the kernel (x86 with AVX2 and FMA).
// cpu_f32_gemm_auto() (care_ext.h): whether auto picks it on this CPU at hidden sizes >=
//   kF32GemmAutoMinK (care_ext.h): available and no AVX-512F (build_info's cpu_f32_gemm).
// cpu_f32_gemm_selected(K): whether a call with hidden size K uses it: CARE_EXT_CPU_GEMM = avx2 |
//   mkl | auto (unset: auto; below kF32GemmAutoMinK auto keeps MKL, whose float order the CPU lab's
//   recorded numbers at H = 128 were made with); avx2 where it is not available is an error.
// F32Panels: column groups (weights [K, N_g] at any strides, biases [N_g] or undefined for
//   none) packed by
//   pack_f32_panels into 16-column panels; group g owns panels [first[g], first[g + 1]), its
//   columns at panel first[g] * 16 onwards of an output row, cols[g] of them (the rest of its last
//   panel is padding). f32_panels_layout: everything but the packed data (K, panels, first, cols
//   and the bias); pack_f32_panels_into: the data into out (f32_panels_numel floats, 32-byte
//   aligned) on torch's threads; pack_f32_panels: both, the data in a pooled buffer.
// f32_gemm_panels: c[i, q * 16 + j] = bias + the sum over k of a[i, k] * w[k, .] (per slab of 256
//   k one FMA after another from zero, the slabs' sums added in order) for rows [0, M) of a
//   (float32, row stride lda) and panels [p0, p1), on the calling thread; c has row stride ldc >= p1 * 16. f32_gemm_panels_parallel: the same over
//   torch's threads, with the same bits. f32_row_stride(K): the row stride (floats) to give A.
// pooled_floats(n): a float32 CPU buffer of n elements from the calling thread's pool (up to 8
//   buffers, each handed out again only when nothing else holds its storage): large scratch
//   buffers without a fresh allocation's page faults on every call (the step's packed weights
//   and its float32 copies of the hidden states; measured: packing [4096, 256] on one thread took
//   1.06 ms into fresh memory against 0.39 ms without mmap'd allocations).
Tensor pooled_floats(int64_t n);
// d[i] = float(s[i]) for i < n (exact; AVX2 where the CPU has it; cpu/f32_gemm.cpp).
void bf16_to_float(const at::BFloat16* s, float* d, int64_t n);
constexpr int64_t kF32Panel = 16;
struct F32Panels {
  Tensor data, bias;  // float32 packed panels; bias [panels * 16], zero in the padding
  int64_t K = 0, panels = 0;
  std::vector<int64_t> first, cols;
};
bool cpu_f32_gemm_available();
bool cpu_f32_gemm_selected(int64_t K);
int64_t f32_row_stride(int64_t K);
F32Panels f32_panels_layout(const std::vector<std::pair<Tensor, Tensor>>& groups);
inline int64_t f32_panels_numel(const F32Panels& p) { return p.K * p.panels * kF32Panel; }
void pack_f32_panels_into(const std::vector<std::pair<Tensor, Tensor>>& groups,
                          const F32Panels& p, float* out);
F32Panels pack_f32_panels(const std::vector<std::pair<Tensor, Tensor>>& groups);
void f32_gemm_panels(const float* a, int64_t lda, int64_t M, const F32Panels& b, int64_t p0,
                     int64_t p1, float* c, int64_t ldc);
void f32_gemm_panels_parallel(const float* a, int64_t lda, int64_t M, const F32Panels& b,
                              int64_t p0, int64_t p1, float* c, int64_t ldc);
// f32_gemm_strided_panel: c[i, j] (row stride ldc, 16 columns written) = (accumulate ? c[i, j] :
// 0) + the sum over k < K of a[i, k] * b[k, j] for i < M, j < 16, with b's rows ldb floats apart
// and read in place (16 of each readable), summed as f32_gemm_panels sums (per slab of 256 k from
// zero, each slab's sum added in order), on the calling thread; no bias. For a B that is data,
// not a weight to pack once (the training layer's backward, cpu/bn_linear.cpp, which calls it a
// slab at a time with accumulate after the first).
void f32_gemm_strided_panel(const float* a, int64_t lda, int64_t M, int64_t K, const float* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate);
// x [M, K] (float32, bfloat16 or float16, any strides; converted into padded float32 rows) times
// each group's weight plus its bias, on torch's threads: one float32 [M, N_g] view per group
// (views of one buffer, row stride panels * 16).
// f32_linear_panels: the same on panels packed before, the output [M, panels * 16] whole.
std::vector<Tensor> f32_linear_groups(const Tensor& x,
                                      const std::vector<std::pair<Tensor, Tensor>>& groups);
Tensor f32_linear_panels(const Tensor& x, const F32Panels& f);

// The acquisition step's float32 weights packed once for the AVX2 GEMM (cpu/f32_step_pack.cpp;
// care_ext::_pack_f32_step, then care_ext::_acquisition_step_f32_packed): one 1-D float32 buffer
// holding, in this order, both stages' rollout first layers (hidden columns; Stage-I's panels
// first), Stage-I's and Stage-II's rollout layer 2, both prompt first layers (hidden columns;
// Stage-I's first), Stage-I's and Stage-II's head layer 1. step_f32_panels checks the buffer and
// points each section's data into it; the biases are copied per call (they are small).
struct StepF32Panels {
  F32Panels rollout, l2[2], prompt, head[2];
};
StepF32Panels step_f32_panels(const Weights& w1, const Weights& w2, int64_t H,
                              const Tensor& packed, const char* op);

// bf16 x bf16 -> float32 products on the CPU (cpu/bf16_gemm.cpp): a [M, K] times b [N, K]^T,
// both bfloat16 (unit column stride), as a float32 [M, N]. Every product is exact in float32;
// MKL's cblas_gemm_bf16bf16f32 (AMX / AVX512-BF16) sums them where torch exports it, otherwise a
// float32 GEMM on converted copies does. cpu_bf16_gemm_available() says which (build_info).
bool cpu_bf16_gemm_available();
Tensor bf16_products(const Tensor& a, const Tensor& b);

// The same products on pieces packed once (cpu/bf16_brgemm.cpp): a bf16 [M, K] (unit column
// stride, else copied) times the N split rows packed by care_ext::_pack_bf16_split, float32
// [M, N], by oneDNN's BRGeMM on AMX. Every product exact, float32 sums in another order than
// MKL's. cpu_brgemm_available(): whether this CPU and torch have it (AMX bf16; the packed layout
// checked against oneDNN's once; CARE_EXT_CPU_BRGEMM=0 turns it off). packed_bf16_numel: the
// packed size of N rows of K (even) bf16 values.
// cpu_brgemm_enabled(): available and torch.backends.mkldnn.enabled now (torch's BRGeMM needs
// it at every call; with it off the split step ignores packed pieces and runs MKL's GEMM).
bool cpu_brgemm_enabled();
int64_t packed_bf16_numel(int64_t N, int64_t K);
Tensor bf16_products_packed(const Tensor& a, const Tensor& packed, int64_t N);
// The same into c (float32, row stride ldc) from a (bf16 rows, row stride lda); with `only`, just
// those column blocks (indices of packed_block_cols()-column blocks), the rest of c untouched.
int64_t packed_block_cols();
void bf16_products_packed_into(const at::BFloat16* a, int64_t M, int64_t lda,
                               const at::BFloat16* packed, int64_t N, int64_t K, float* c,
                               int64_t ldc, const std::vector<int64_t>* only = nullptr);

// Pre-activations from split-term products: out[k, u] = sum_t c[r_k, t * Rt + col + u] + bias[u]
// for k < n (r_k = rows[k], or k when rows is null), u < units; c row stride ldc, out ldo.
void sum_split_terms(const float* c, int64_t ldc, int64_t T, int64_t Rt, int64_t col,
                     const float* bias, int64_t units, const int64_t* rows, int64_t n, float* out,
                     int64_t ldo);

// The checks of a first_layer_split argument (care_ext.bf16_split.first_layer_split: rollout
// bf16 [T, rollout_units, H] and prompt bf16 [T, prompt_units, H], 1 <= T <= 3, bf16 hidden
// states), messages naming `op`. With `packed_ok`, 4 tensors are accepted too: the two pieces and
// their packing (care_ext.bf16_split.pack_first_layer_split: 1-D bf16 of packed_bf16_numel).
void check_split(at::TensorList split, const Tensor& h_prompt, const Tensor& h_resp, int64_t H,
                 int64_t rollout_units, int64_t prompt_units, const char* op,
                 bool packed_ok = false);

// group_features through the dispatcher (the inputs' device's kernel).
FeatureTuple group_features_dispatch(const Tensor& ids, const Tensor& lengths, double max_len,
                                     double cag_eps, bool cag_unbiased, double adv_eps,
                                     bool adv_unbiased);

// Shape, device and dtype checks shared by acquisition_step and _acquisition_step_fused.
void check_step_inputs(const Tensor& ids, const Tensor& h_prompt, const Tensor& h_resp,
                       const char* op);

// The fused acquisition step after its host-side part (step_fused.cpp): features from the
// device's group_features kernel, the first-layer GEMM outputs (float32: four plain ones, or with
// first_layer_split two stacked ones in pre_r1 / pre_p1 holding T terms per unit), the
// allocated outputs, and the raw-pointer arguments of the per-prompt tail (step_tail.h). `keep`
// holds the contiguous bias vectors the pointers refer to (weight matrices are read in place,
// through their strides).
struct FusedStep {
  Tensor rank, sizes, prompt_feat, len_norm, minority, cag, admissible, pseudo, pseudo_adv;
  Tensor pre_r1, pre_r2, pre_p1, pre_p2;
  Tensor reliability, logits1, probs, ecag;
  std::vector<Tensor> keep;
  StepTailArgs args{};
  int64_t B = 0;
  StepTuple outputs() const;
};

// Where prepare_fused_step may send the work that the rollout GEMM does not wait for (the CUDA
// launch's second stream, CARE_EXT_STEP_OVERLAP in csrc/cuda/step_fused.cu): begin() comes before
// group_features and the prompt branches' first-layer GEMM(s), end() after them; the rollout
// GEMM(s) follow on the caller's stream. Both sides read only the inputs and write only their own
// outputs, so the results are the same bits either way; the launcher joins the streams before
// anything reads them.
struct SideWork {
  virtual ~SideWork() = default;
  virtual void begin() = 0;
  virtual void end() = 0;
};

// The host part of the fused step: checks, features, first-layer GEMMs and outputs (FusedStep).
// `side`: nullptr runs everything on the caller's stream, in order; else see SideWork.
FusedStep prepare_fused_step(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                             const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                             double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                             bool adv_unbiased, at::TensorList first_layer_split,
                             SideWork* side = nullptr);

}  // namespace care_ext
