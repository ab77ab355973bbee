// The per-prompt tail of the fused acquisition step, compiled for host and device.
//
// After the two big first-layer GEMMs (rollouts: h_resp @ resp1_w[:, :H]^T, prompts:
// h_prompt @ prompt_w[:, :H]^T, for both classifiers), everything else of the step is small,
// per-prompt work: feature columns, biases and ReLUs of the first layers, the 64 -> 512 rollout
// layer, the (masked) mean pool, the head, the Stage-I softmax and Stage-II's expected CAG over the
// admissible classes. step_tail runs all of it for one prompt, cooperatively over the threads of
// one block (CUDA: one block per prompt, sync = __syncthreads) or on one thread (CPU: tid 0,
// nth 1, sync = no-op), so the CPU build tests the kernel's arithmetic: the same operations in
// the same order. Not the same bits: nvcc contracts `v += w * x` into one FMA (-fmad=true, its
// default) where the x86 host build (no -mfma) rounds the product first, so CUDA vs CPU outputs
// compare to float32 tolerance, never exactly.
// Semantics are those of care_ext.reference.acquisition_step (see classifier_parts.h).
//
// Memory access on the GPU: every loop gives one output unit per thread and sums over that unit's
// inputs in order, so thread t reads element (t, j) of a weight matrix at step j. Weights are read
// through their strides (Mat): stored column-major ([in, out] in memory, what
// care_ext.ops.fused_step_layout and the trainer on CUDA provide) the 32 threads of a warp read 32
// consecutive floats, one 128-byte line per load; row-major they read 32 lines per load (correct,
// and ~32x the L1 traffic). The two classifiers are independent: the CUDA kernel runs them in two
// blocks per prompt (blockIdx.y = stage), which halves the serial work of a block. Lines tagged
// `// sass: <name>` are the hot loops whose compiled code bench/sass_report.py checks (CI).
#pragma once

#include "group_math.h"

namespace care_ext {

// A float32 matrix read through its strides: element (r, c) is p[r * rs + c * cs]. The strides
// are 32-bit: the host keeps every element's offset below 2^31 (mat() in step_fused.cpp), so an
// address costs 32-bit integer work, and the hot loops step a pointer along a row (row(), cs)
// instead of recomputing r * rs + c * cs for every weight (bench/sass_report.py counts it).
struct Mat {
  const float* p;
  int rs, cs;
  CARE_HD float at(int r, int c) const { return p[r * rs + c * cs]; }
  CARE_HD const float* row(int r) const { return p + r * rs; }
};

// One classifier's folded weights (matrices through their strides, biases contiguous) and sizes.
struct HeadWeights {
  Mat pw, r1w, r2w, h1w, h2w;
  const float *pb, *r1b, *r2b, *h1b, *h2b;
  int H, Fp, Fr, P, R1, R2, K, C;
  // Rollout layer 2's weight split into TF32 pieces in tensor-core fragment order (the layout at
  // r2w_frag_unit_tiles; written by the CUDA launch before the tail, CARE_EXT_TAIL_MMA_PRESPLIT),
  // or nullptr. Set only with l2_mma and R1 % 8 == 0; then layer 1 also writes its outputs split
  // (HeadScratch::r1lo).
  const uint32_t* r2w_frag;
};

// A first-layer GEMM output without bias (float32, row-major with leading dimension ld): the
// layer's value at (row r, unit k) is the sum over t < terms of p[r * ld + t * term_stride + k].
// terms = 1 is a plain fp32 GEMM output; terms > 1 are the products of bf16 hidden states with the
// bf16 pieces of a split float32 weight (hi, mid, lo: see care_ext/bf16_split.py), summed here
// smallest piece first (each piece is ~2^-8 of the one before: the small ones meet first).
struct PreAct {
  static constexpr int kMaxTerms = 3;  // plain: 1; split: 1..3 pieces (check_split)
  const float* p;
  int64_t ld;
  int terms;
  int64_t term_stride;
  // The terms of (r, k) into x[0 .. terms-1] (loads only: a caller can have many in flight).
  CARE_HD void load(int64_t r, int k, float (&x)[kMaxTerms]) const {
    const float* q = p + r * ld + k;
    CARE_UNROLL
    for (int t = 0; t < kMaxTerms; ++t) x[t] = t < terms ? q[t * term_stride] : 0.f;
  }
  // Their sum, smallest piece first: x[terms-1] + ... + x[0] (compile-time indices: on the GPU
  // x stays in registers; a run-time index would put it in local memory).
  CARE_HD float sum(const float (&x)[kMaxTerms]) const {
    static_assert(kMaxTerms == 3, "sum() spells out up to 3 terms");
    float v = terms >= 3 ? x[2] : (terms == 2 ? x[1] : x[0]);
    if (terms >= 3) v += x[1];
    if (terms >= 2) v += x[0];
    return v;
  }
  CARE_HD float at(int64_t r, int k) const {
    float x[kMaxTerms];
    load(r, k, x);
    return sum(x);
  }
};

// Items of rollout layer 1 a thread loads before it computes them (branches): their GEMM outputs
// in flight together, not one memory latency per item.
constexpr int kL1Chunk = 4;

// Rollout layer 1's items in warp tiles (branches): 32 consecutive items are kL1TileUnits
// consecutive units k (one 32-byte sector of a GEMM output row) of kL1TileRows consecutive slots c,
// tiles along k first. r1t_ld(G) is 8 or 24 modulo 32, so a tile's stores r1t[k * ld + c] fall in
// 16 distinct banks, two stores each (k and k + 4).
constexpr int kL1TileUnits = 8;
constexpr int kL1TileRows = 4;
static_assert(kL1TileUnits * kL1TileRows == 32, "a layer-1 tile is one warp's items");

// Item i of rollout layer 1 (0 <= i < rows * n_ktiles * kL1TileUnits) as its slot c and unit k
// (k may pass R1 in the last tile along k: the caller skips it).
CARE_HD void l1_item(int i, int n_ktiles, int& c, int& k) {
  const int tile = i / 32, lane = i % 32;
  const int tk = tile % n_ktiles, tc = tile / n_ktiles;
  k = tk * kL1TileUnits + lane % kL1TileUnits;
  c = tc * kL1TileRows + lane / kL1TileUnits;
}

// Rollout layer 2 in register tiles, the mean pool in registers: layer 1 writes the pooled
// rollouts' outputs transposed and compacted (r1t[k * ld + c] for the c-th pooled rollout, ld a
// multiple of 4, zeros past the last one), so the kL2TileRows consecutive rollouts of a tile are
// kL2TileRows / 4 aligned float4 reads (shared-memory broadcasts) per step of the sum over R1.
// Each thread computes kL2TileRows x kL2TileUnits (rollout, unit) outputs (units 32 apart: one
// line per weight load), one weight load serving kL2TileRows rollouts; it adds their ReLUs to its
// units' pool sums in registers, so no output is staged and no barrier is needed between tiles.
// The tiles go round-robin to kL2RowGroups row groups (tile t to group t % kL2RowGroups); each
// group's partial pool is stored once and the groups are added in group order: the same sums in
// the same order on any number of threads (the CPU's one thread included).
constexpr int kL2TileRows = 8;
constexpr int kL2TileUnits = 4;
constexpr int kL2RowGroups = 2;
static_assert(kL2TileRows % 4 == 0, "a tile's rollouts are read as float4");

// Steps of the k sum whose weights a rollout layer-2 tile loads before using them, and of a head
// dot product (dot_in_order): on the GPU each thread then has kL2Steps * kL2TileUnits, or
// kDotChunk, independent loads in flight instead of one per multiply-add (latency-bound L2 reads
// otherwise: at 64x8 one 256-thread block per SM streams the head's 655 KB).
constexpr int kL2Steps = 4;
constexpr int kDotChunk = 32;

// Prompts one block may run together: their rollout and prompt branches one after another, then
// their head layers side by side, so each head weight is read once for all of them (the weights,
// ~0.8 MB per classifier at CARE's sizes, are what every block streams from L2).
constexpr int kMaxTailPrompts = 4;

// Scratch of one classifier for a block of nb prompts: r1t [R1][r1t_ld(G)] (first, at the 16-byte
// aligned base: its float4 reads), with a pre-split layer-2 weight (HeadWeights::r2w_frag) r1lo of
// the same shape after it (r1t then holds the TF32 high pieces' bits, r1lo the low ones'), rows [G]
// (the pooled rollouts' indices, as floats) and part [kL2RowGroups][R2] (the row groups' pool
// sums), reused prompt after prompt; per prompt slot q: p [nb][ldp], pool [nb][ldpool],
// z [nb][ldz], logits [nb][C]; then (8-byte aligned, one float of padding at most) e [nb][C]
// doubles: the expected CAG's exponentials and probabilities, a row per prompt team
// (stage_outputs). Every region up to logits starts 16-byte aligned and the rows of p, pool and z
// are padded to whole float4s, so the head's dot products (dot_in_order) read their inputs as
// float4 on the GPU.
struct HeadScratch {
  float *r1t, *r1lo, *rows, *part, *p, *pool, *z, *logits;
  int ldp, ldpool, ldz;  // row strides of p, pool and z: P, R2 and K rounded up to 4 (al4)
  double* e;
  const float* r2w;  // rollout layer 2's weight staged k-major (stage_r2w), or nullptr
  const float* h2w;  // head layer 2's weight staged k-major (stage_h2w), or nullptr
};

// Rows of r1t that layer 1 writes for `count` pooled rollouts: up to whole 16-row tiles of the
// tensor-core layer 2 (layer2_pool_parts_mma; the FFMA tiles of kL2TileRows fit in them), zeros
// past the last rollout.
CARE_HD int r1t_rows(int count) { return (count + 15) / 16 * 16; }

// r1t's leading dimension: G rounded up to 16-row tiles, plus 8: a multiple of 4 (the FFMA path's
// float4 reads) that is 8 or 24 modulo the 32 shared-memory banks, so the tensor-core path's
// fragment reads (lanes at 4 steps k x 8 rows) touch 32 distinct banks; layer 1's column writes
// conflict 8-way at most (a small loop).
CARE_HD int r1t_ld(int G) { return (G + 15) / 16 * 16 + 8; }

// Leading dimension of rollout layer 2's weight staged k-major (stage_r2w: [R1][R2 + 8]): the
// tensor-core path reads it at 4 steps k x 8 units per fragment, 8 banks apart row to row.
CARE_HD int staged_r2w_ld(int R2) { return R2 + 8; }
CARE_HD int staged_r2w_floats(int R1, int R2) { return R1 * staged_r2w_ld(R2); }

// Floats of r1t, and of r1lo when the weight comes pre-split (a multiple of 4: r1lo stays 16-byte
// aligned).
CARE_HD int r1t_floats(const HeadWeights& w, int G) {
  return (w.r2w_frag != nullptr ? 2 : 1) * w.R1 * r1t_ld(G);
}

CARE_HD int al4(int n) { return (n + 3) / 4 * 4; }  // floats up to a whole float4

CARE_HD int head_scratch_float_part(const HeadWeights& w, int G, int nb) {  // r1t .. logits
  return r1t_floats(w, G) + al4(G) + al4(kL2RowGroups * w.R2) +
         nb * (al4(w.P) + al4(w.R2) + al4(w.K) + w.C);
}

CARE_HD int head_scratch_floats(const HeadWeights& w, int G, int nb) {  // + e: nb * C doubles
  return head_scratch_float_part(w, G, nb) + 1 + 2 * w.C * nb;
}

CARE_HD HeadScratch head_scratch(float* base, const HeadWeights& w, int G, int nb,
                                 const float* r2w = nullptr, const float* h2w = nullptr) {
  HeadScratch s;
  s.r1t = base;
  s.r1lo = w.r2w_frag != nullptr ? base + w.R1 * r1t_ld(G) : nullptr;
  s.rows = s.r1t + r1t_floats(w, G);
  s.part = s.rows + al4(G);
  s.p = s.part + al4(kL2RowGroups * w.R2);
  s.ldp = al4(w.P);
  s.ldpool = al4(w.R2);
  s.ldz = al4(w.K);
  s.pool = s.p + nb * s.ldp;
  s.z = s.pool + nb * s.ldpool;
  s.logits = s.z + nb * s.ldz;
  const int floats = head_scratch_float_part(w, G, nb);
  s.e = reinterpret_cast<double*>(base + floats + (floats & 1));  // base is 16-byte aligned
  s.r2w = r2w;
  s.h2w = h2w;
  return s;
}

// Copies into shared memory that land later (cp.async from sm_80; elsewhere, the CPU twins
// included, plain copies): copy_async_f32 (4 bytes, through L1) and copy_async_f4_l2 (16 bytes,
// 16-byte aligned, through L2 only: data other blocks of the running kernel wrote) issue,
// async_commit closes this thread's group of them, async_wait<N> waits until at most N of its
// groups are pending; a block barrier after that makes every thread's copies visible.
CARE_HD void copy_async_f32(float* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
#else
  *dst = *src;
#endif
}

CARE_HD void copy_async_f4_l2(float* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
#elif defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(dst) = __ldcg(reinterpret_cast<const float4*>(src));
#else
  for (int e = 0; e < 4; ++e) dst[e] = src[e];
#endif
}

CARE_HD void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
CARE_HD void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Copies rollout layer 2's weight (element (j, k) = unit j's weight of input k, any strides) into
// dst [R1][staged_r2w_ld(R2)] (k-major): read there, a warp's 32 consecutive units at one k are
// 32 consecutive floats, as in a column-major weight. The CUDA kernel may stage it so in shared
// memory once per block (CARE_EXT_TAIL_STAGE_R2=1): each 8-rollout tile of layer 2 reads all of
// it, 1 MB per prompt and classifier at G = 64, from L2 when it does not stay in L1. Same values,
// so the same sums: results do not depend on staging.
CARE_HD void stage_r2w(const Mat& r2w, int R1, int R2, float* dst, int tid, int nth) {
  const int ld = staged_r2w_ld(R2);
  for (int i = tid; i < R1 * R2; i += nth) {
    const int k = i / R2, j = i - k * R2;
    dst[k * ld + j] = r2w.at(j, k);
  }
}

// Issues the copies of head layer 2's weight (element (c, k) = class c's weight of input k, any
// strides) into dst [K][C] (k-major: at one k a warp's consecutive classes c read consecutive
// floats), as one cp.async group of this thread (async_commit; the CPU twins: plain copies). The
// CUDA kernel may issue them at its start (CARE_EXT_TAIL_STAGE_H2=1), so they land during the
// branches and head layer 1, and head layer 2 (classifier_tail: async_wait, then the barrier
// after layer 1) reads shared memory instead of a chain of L2 round trips: C threads each run K
// multiply-adds while the others wait at the barrier. Same values, so the same sums. The split
// head's finish (head_finish) stages its layer-2 weight with it too.
CARE_HD void stage_h2w(const Mat& h2w, int K, int C, float* dst, int tid, int nth) {
  for (int i = tid; i < K * C; i += nth) {
    const int k = i / C, c = i - k * C;
    copy_async_f32(dst + i, h2w.row(c) + k * h2w.cs);
  }
  async_commit();
}

// Diagnostics of the CUDA tail (CARE_EXT_TAIL_STAMPS=1): thread 0 of each block writes clock64()
// at the start and at the end of each phase into the block's row of kTailStampSlots in `base`
// ([2][gridDim.x][kTailStampSlots], row blockIdx.y * gridDim.x + blockIdx.x; nullptr: off, and
// always on the CPU). Slots: 0 start, 1 branches done, 2 head layer 1 done, 3 head layer 2 done,
// 4 outputs done; each after the phase's closing barrier where it has one. The row is computed at
// each stamp from the kernel's parameter and the block's index (nothing held in registers: the
// tail is at its 128-register bound).
constexpr int kTailStampSlots = 5;
struct TailStamps {
  long long* base;
  CARE_HD void operator()(int slot, int tid) const {
#if defined(__CUDA_ARCH__)
    if (base != nullptr && tid == 0) {
      base[(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kTailStampSlots + slot] =
          clock64();
    }
#else
    (void)slot;
    (void)tid;
#endif
  }
};

CARE_HD float relu_f(float v) { return v > 0.f ? v : 0.f; }

// xs[q][e] = x[q * ldx + j + e] for q < M, e < 4: each prompt's 4 inputs as one float4 on the GPU
// (a broadcast shared-memory read: x 16-byte aligned, ldx and j multiples of 4).
template <int M>
CARE_HD void load_inputs4(const float* x, int ldx, int j, float (&xs)[M][4]) {
  CARE_UNROLL
  for (int q = 0; q < M; ++q) {
#if defined(__CUDA_ARCH__)
    const float4 xv = *reinterpret_cast<const float4*>(x + q * ldx + j);
    xs[q][0] = xv.x;
    xs[q][1] = xv.y;
    xs[q][2] = xv.z;
    xs[q][3] = xv.w;
#else
    for (int e = 0; e < 4; ++e) xs[q][e] = x[q * ldx + j + e];
#endif
  }
}

// One chunk's multiply-adds of dot_in_order: v[q] += w[t] * x_q[j + t] for
// t < kDotChunk, in order for every sum. kAll (nb == M): all M sums side by side, weight by
// weight (M independent FFMA chains; on the GPU x read as float4, one broadcast shared-memory read
// per 4 weights); else one sum after another for the nb < M prompts.
template <int M, bool kAll>
CARE_HD void dot_chunk_fmas(const float (&w)[kDotChunk], const float* x, int ldx, int j, int nb,
                            float (&v)[M]) {
  if (kAll) {
#if defined(__CUDA_ARCH__)
    CARE_UNROLL
    for (int t = 0; t < kDotChunk; t += 4) {
      float xs[M][4];
      load_inputs4(x, ldx, j + t, xs);
      CARE_UNROLL
      for (int e = 0; e < 4; ++e) {
        CARE_UNROLL
        for (int q = 0; q < M; ++q) v[q] += w[t + e] * xs[q][e];  // sass: dot-fma
      }
    }
#else
    for (int t = 0; t < kDotChunk; ++t) {
      for (int q = 0; q < M; ++q) v[q] += w[t] * x[q * ldx + j + t];
    }
#endif
  } else {
    CARE_UNROLL
    for (int q = 0; q < M; ++q) {
      if (q >= nb) break;
      const float* xq = x + q * ldx + j;
      CARE_UNROLL
      for (int t = 0; t < kDotChunk; ++t) v[q] += w[t] * xq[t];
    }
  }
}

// The columns j .. n-1 past a dot product's whole chunks, one weight (at wp, stepped by cs) at a
// time for the nb <= M sums, in order.
template <int M>
CARE_HD void dot_rest(const float* wp, int cs, const float* x, int ldx, int j, int n, int nb,
                      float (&v)[M]) {
  for (; j < n; ++j, wp += cs) {
    const float wj = *wp;
    CARE_UNROLL
    for (int q = 0; q < M; ++q) {
      if (M == 1 || q < nb) v[q] += wj * x[q * ldx + j];
    }
  }
}

// The chunks of dot_in_order (below) from column j on: kAll (nb == M) advances all M sums side by
// side, else one sum after another (a short last block of prompts). Returns the first column
// past the last whole chunk; wp is left there.
template <int M, bool kAll>
CARE_HD int dot_chunks(const float*& wp, int cs, const float* x, int ldx, int n, int nb,
                       float (&v)[M]) {
  int j = 0;
  for (; j + kDotChunk <= n; j += kDotChunk) {
    float wv[kDotChunk];
    CARE_UNROLL
    for (int t = 0; t < kDotChunk; ++t, wp += cs) wv[t] = *wp;
    dot_chunk_fmas<M, kAll>(wv, x, ldx, j, nb, v);
  }
  return j;
}

// dot_chunks with all M sums side by side (kAll), software-pipelined (CARE_EXT_TAIL_DOT_AHEAD=1):
// the next chunk's kDotChunk weights are loaded before this chunk's multiply-adds, so on the GPU a
// chunk's FFMA chain runs while the next chunk's loads are in flight instead of after them. The
// H200's stamps (2026-11-28) put a head layer-1 chunk at 745 cycles at 64 x 8 x 4096, of which
// ~335 are the L2 round trip and the rest the chain. The same multiply-adds in the same order: the
// same bits. Returns the first column past the last whole chunk; wp is left there.
template <int M>
CARE_HD int dot_chunks_ahead(const float*& wp, int cs, const float* x, int ldx, int n, int nb,
                             float (&v)[M]) {
  if (n < kDotChunk) return 0;
  float a[kDotChunk], b[kDotChunk];  // two buffers in turn: no register copies between chunks
  auto load = [&](float (&w)[kDotChunk]) {
    CARE_UNROLL
    for (int t = 0; t < kDotChunk; ++t, wp += cs) w[t] = *wp;
  };
  load(a);
  for (int j = 0;; j += 2 * kDotChunk) {  // chunk j in a, chunk j + kDotChunk (if any) into b
    if (j + 2 * kDotChunk > n) {
      dot_chunk_fmas<M, true>(a, x, ldx, j, nb, v);
      return j + kDotChunk;
    }
    load(b);
    dot_chunk_fmas<M, true>(a, x, ldx, j, nb, v);
    if (j + 3 * kDotChunk > n) {
      dot_chunk_fmas<M, true>(b, x, ldx, j + kDotChunk, nb, v);
      return j + 2 * kDotChunk;
    }
    load(a);
    dot_chunk_fmas<M, true>(b, x, ldx, j + kDotChunk, nb, v);
  }
}

// For each of nb <= M vectors x_q = x + q * ldx: v[q] + sum over j < n, in order, of
// W(r, c0 + j) * x_q[j]. Each weight is loaded once for all nb sums, through a pointer stepped
// along the row (one address add per weight), kDotChunk weights before they are used (loads in
// flight); every sum keeps the order of a single dot product. M is a compile-time bound (the
// accumulators stay in registers). With nb = M the M sums advance side by side, weight by weight:
// M independent FFMA chains (one after another, each sum waited on its previous FFMA: ncu's
// "wait" stall, 48% of this loop's samples at 1024x64x4096). On the GPU x is then read as float4
// (one broadcast shared-memory read per 4 multiply-adds): x must be 16-byte aligned and ldx a
// multiple of 4, as head_scratch lays out p, pool and z (one prompt after another in a short last
// block of prompts, nb < M). kAhead: the side-by-side chunks software-pipelined
// (dot_chunks_ahead; the same bits).
template <int M, bool kAhead = false>
CARE_HD void dot_in_order(const Mat& W, int r, int c0, const float* x, int ldx, int n, int nb,
                          float (&v)[M]) {
  const int cs = W.cs;
  const float* wp = W.row(r) + c0 * cs;
  int j = 0;
  if (M == 1 || nb == M) {
    j = kAhead ? dot_chunks_ahead<M>(wp, cs, x, ldx, n, nb, v)
               : dot_chunks<M, true>(wp, cs, x, ldx, n, nb, v);
  } else {
    j = dot_chunks<M, false>(wp, cs, x, ldx, n, nb, v);
  }
  dot_rest(wp, cs, x, ldx, j, n, nb, v);
}

// x[a] = p[a] for a < kL2TileRows: a tile's rollouts at one step of the k sum (p 16-byte aligned;
// float4 shared-memory reads on the GPU, broadcast to the warp).
CARE_HD void load_tile_rows(const float* p, float (&x)[kL2TileRows]) {
#if defined(__CUDA_ARCH__)
  CARE_UNROLL
  for (int a = 0; a < kL2TileRows; a += 4) {
    const float4 v = *reinterpret_cast<const float4*>(p + a);
    x[a] = v.x;
    x[a + 1] = v.y;
    x[a + 2] = v.z;
    x[a + 3] = v.w;
  }
#else
  for (int a = 0; a < kL2TileRows; ++a) x[a] = p[a];
#endif
}

// Adds the next Q steps of rollout layer 2's sums to a tile: wp[u] points at the weight of unit
// u's next step (consecutive steps cs apart), r1p at the tile's first rollout in r1t at the next
// step (consecutive steps ld apart); both are advanced past the Q steps. The tile's weights of
// all Q steps are loaded before they are used.
template <int Q>
CARE_HD void l2_steps(const float* (&wp)[kL2TileUnits], int cs, const float*& r1p, int ld,
                      float (&v)[kL2TileRows][kL2TileUnits]) {
  float wv[Q][kL2TileUnits];
  CARE_UNROLL
  for (int q = 0; q < Q; ++q) {
    CARE_UNROLL
    for (int u = 0; u < kL2TileUnits; ++u) {
      wv[q][u] = *wp[u];
      wp[u] += cs;
    }
  }
  CARE_UNROLL
  for (int q = 0; q < Q; ++q) {
    float x[kL2TileRows];
    load_tile_rows(r1p + q * ld, x);
    CARE_UNROLL
    for (int a = 0; a < kL2TileRows; ++a) {
      CARE_UNROLL
      for (int u = 0; u < kL2TileUnits; ++u) v[a][u] += wv[q][u] * x[a];  // sass: l2-fma
    }
  }
  r1p += Q * ld;
}

// Rollout layer 2 + ReLU + the row groups' pool sums into s.part (see branches), its weight read
// through r2w: the classifier's own, or the copy stage_r2w made. branches calls it once for each
// case, so each call reads one kind of memory (on the GPU: LDG or LDS, not a generic LD).
CARE_HD void layer2_pool_parts(const HeadWeights& w, const Mat& r2w, const HeadScratch& s,
                               int count, int n_tiles, int ld, int tid, int nth) {
  // rollout layer 2 + ReLU + (masked) mean pool:
  //   out(c, j) = relu(r2b[j] + sum_k r2w(j, k) r1(c, k)), each summed over k in order;
  //   part[r][j] = sum over the tiles t = r, r + kL2RowGroups, ... in order, of the tile's
  //   rollouts in order, of out(c, j); pool[j] = inv * (part[0][j] + part[1][j] + ...)
  // Consecutive items take consecutive j0, so for each u the 32 threads of a warp touch 32
  // consecutive units: one line per weight load.
  constexpr int kGroup = 32 * kL2TileUnits;  // units covered by 32 consecutive items
  const int n_tj = (w.R2 + kGroup - 1) / kGroup * 32;  // items per row group
  const int cs = r2w.cs;
  for (int it = tid; it < kL2RowGroups * n_tj; it += nth) {
    const int rg = it / n_tj, jt = it - rg * n_tj;
    const int j0 = (jt / 32) * kGroup + jt % 32;
    const float* wrow[kL2TileUnits];  // each unit's weight row (a unit past R2: row 0, not stored)
    float bias[kL2TileUnits], pacc[kL2TileUnits];
    CARE_UNROLL
    for (int u = 0; u < kL2TileUnits; ++u) {
      const bool in = j0 + 32 * u < w.R2;
      bias[u] = in ? w.r2b[j0 + 32 * u] : 0.f;
      wrow[u] = r2w.row(in ? j0 + 32 * u : 0);
      pacc[u] = 0.f;
    }
    for (int t = rg; t < n_tiles; t += kL2RowGroups) {
      const int t0 = t * kL2TileRows;
      const float* wp[kL2TileUnits];
      float v[kL2TileRows][kL2TileUnits];
      CARE_UNROLL
      for (int u = 0; u < kL2TileUnits; ++u) {
        wp[u] = wrow[u];
        CARE_UNROLL
        for (int a = 0; a < kL2TileRows; ++a) v[a][u] = bias[u];
      }
      const float* r1p = s.r1t + t0;
      int k = 0;
      for (; k + kL2Steps <= w.R1; k += kL2Steps) l2_steps<kL2Steps>(wp, cs, r1p, ld, v);
      for (; k < w.R1; ++k) l2_steps<1>(wp, cs, r1p, ld, v);  // the last R1 % kL2Steps steps
      CARE_UNROLL
      for (int a = 0; a < kL2TileRows; ++a) {  // rows past count (zero inputs) are not pooled
        if (t0 + a < count) {
          CARE_UNROLL
          for (int u = 0; u < kL2TileUnits; ++u) pacc[u] += relu_f(v[a][u]);
        }
      }
    }
    CARE_UNROLL
    for (int u = 0; u < kL2TileUnits; ++u) {
      if (j0 + 32 * u < w.R2) s.part[rg * w.R2 + j0 + 32 * u] = pacc[u];
    }
  }
}

// Units of rollout layer 2 one warp takes at a time in layer2_pool_parts_mma (kMmaUnitTiles tiles
// of 8) and its 16-row tiles of pooled rollouts held at once (kMmaRowTiles): accumulators of 4
// floats per (row tile, unit tile) and lane, 32 registers. (4 row tiles, 64 accumulators, spilled
// under the kernel's 128-register cap.)
constexpr int kMmaUnitTiles = 4;
constexpr int kMmaRowTiles = 2;
// The pre-split layer 2's other tile shape (CARE_EXT_TAIL_MMA_TILES=4x2, StepTailArgs::l2_mma = 2):
// 4 row tiles x 2 unit tiles, the same 32 accumulators, each weight fragment loaded once for all
// 4 row tiles (G = 64: a prompt's rows) where 2x4 loads it twice: half the weight's L2 traffic (33
// of the 52 M L2 sectors of the 1024x64x4096 tail in ncu), twice the shared-memory loads of A.
constexpr int kMmaRowTilesTall = 4;
constexpr int kMmaUnitTilesTall = 2;
static_assert(kMmaUnitTiles % kMmaUnitTilesTall == 0, "the pre-split weight pads to kMmaUnitTiles");

// The pre-split layer-2 weight (HeadWeights::r2w_frag, CARE_EXT_TAIL_MMA_PRESPLIT): for each step
// of 8 k (ks < R1 / 8), unit tile of 8 (ut < r2w_frag_unit_tiles(R2): whole warp passes of
// kMmaUnitTiles tiles; units past R2 repeat unit R2 - 1, never stored) and lane (g = lane / 4,
// t = lane % 4), 4 words: the TF32 bits of hi(W(u, k0)), hi(W(u, k0 + 4)), lo(W(u, k0)),
// lo(W(u, k0 + 4)) with u = 8 ut + g, k0 = 8 ks + t: one lane's B fragments of the high and low
// pieces (split_tf32), so a warp reads a unit tile's step as one coalesced 512-byte uint4 load.
CARE_HD int r2w_frag_unit_tiles(int R2) {
  return (R2 + 8 * kMmaUnitTiles - 1) / (8 * kMmaUnitTiles) * kMmaUnitTiles;
}
CARE_HD int64_t r2w_frag_words(int R1, int R2) {
  return static_cast<int64_t>(R1 / 8) * r2w_frag_unit_tiles(R2) * 32 * 4;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Rollout layer 2 on tensor cores, float32-accurate: mma.sync m16n8k8 in TF32 (10-bit mantissas)
// three times per product, each operand x split as hi = tf32(x), lo = tf32(x - hi) and
// a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi (small terms first; a_lo b_lo, ~2^-22 of a b, dropped),
// accumulated in float32: the "3xTF32" of CUTLASS's fast-accurate GEMMs, ~float32's error, on units
// with ~8x the FFMA rate. The sums' order is the tensor core's, not the FFMA tiles': results match
// the reference to float32 tolerance, not the CPU twin bit for bit.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = tf32_bits(x);
  lo = tf32_bits(x - __uint_as_float(hi));
}

// d += a b for one 16x8 (rows x units) tile over 8 steps k: a as the row-major A fragment (a[0]:
// (row g, k t), a[1]: (g + 8, t), a[2]: (g, t + 4), a[3]: (g + 8, t + 4); g = lane / 4,
// t = lane % 4), b as the column-major B fragment (b[0]: (k t, unit g), b[1]: (t + 4, g)), d as
// the accumulator fragment (d[0], d[1]: row g, units 2t and 2t + 1; d[2], d[3]: row g + 8).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));  // sass: l2-mma
}

// Item i = (ks * r2w_frag_unit_tiles(R2) + ut) * 32 + lane of the pre-split weight (layout above)
// from the classifier's weight r2w (element (j, k): unit j's weight of input k): the same values,
// split as layer2_pool_parts_mma splits them in place, so both give the same bits.
__device__ __forceinline__ void split_r2w_frag(const Mat& r2w, int R2, uint32_t* out, int64_t i) {
  const int n_ut = r2w_frag_unit_tiles(R2);
  const int lane = static_cast<int>(i % 32);
  const int64_t q = i / 32;
  const int ut = static_cast<int>(q % n_ut), ks = static_cast<int>(q / n_ut);
  const int unit = min(8 * ut + (lane >> 2), R2 - 1), k0 = 8 * ks + (lane & 3);
  uint4 v;
  split_tf32(r2w.at(unit, k0), v.x, v.z);
  split_tf32(r2w.at(unit, k0 + 4), v.y, v.w);
  reinterpret_cast<uint4*>(out)[i] = v;
}

// Rollout layer 2 + ReLU + the pool sums into s.part[0] (part[1..] zeroed), on tensor cores, for
// R1 a multiple of 8 (the caller checks). Each warp takes kMmaUnitTiles * 8 consecutive units and
// up to kMmaRowTiles 16-row tiles of pooled rollouts at once (r1t holds zeros up to
// r1t_rows(count)); per 8 steps of k it loads and splits its kMmaUnitTiles B fragments of the
// weight (through r2w; staged: [R1][R2 + 8], conflict-free) once and uses them for all of its row
// tiles, each one A fragment of r1t (conflict-free: r1t_ld). So the weight is read once per
// prompt, warp pass and kMmaRowTiles row tiles, not once per row tile.
// kPre (HeadWeights::r2w_frag set, CARE_EXT_TAIL_MMA_PRESPLIT): no splitting here. The B
// fragments come pre-split (one uint4 load per unit tile and step) and the A
// fragments' pieces from r1t and r1lo, where layer 1 stored them: the same pieces, so the same
// products in the same order and the same bits as splitting here. Per step of 8 k that saves the
// warp 8 weight splits and 4 per row tile (two cvt.rna.tf32 and a subtraction each).
// Rows past count are not pooled; units past R2 read unit R2 - 1's weights and are not stored.
// Each lane sums its units over its rows (row tiles in order), then the 8 lanes of a unit pair
// add theirs (shuffles).
template <bool kPre, int kRT = kMmaRowTiles, int kUT = kMmaUnitTiles>
__device__ __forceinline__ void layer2_pool_parts_mma(const HeadWeights& w, const Mat& r2w,
                                                      const HeadScratch& s, int count, int ld,
                                                      int tid, int nth) {
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int warps = nth >> 5, n_mt = r1t_rows(count) / 16, ksteps = w.R1 / 8;
  constexpr int kUnits = 8 * kUT;
  const int n_ut = r2w_frag_unit_tiles(w.R2);
  const uint4* frag = reinterpret_cast<const uint4*>(w.r2w_frag);
  for (int u0 = (tid >> 5) * kUnits; u0 < w.R2; u0 += warps * kUnits) {
    const float* bcol[kUT];  // unit u0 + 8 n + g's weights (clamped into the matrix)
    CARE_UNROLL
    for (int n = 0; n < kUT; ++n) {
      const int unit = u0 + 8 * n + g;
      bcol[n] = kPre ? nullptr : r2w.row(unit < w.R2 ? unit : w.R2 - 1);
    }
    // pre-split: this warp's fragments of step ks are fp[ks * n_ut * 32 + n * 32]
    const uint4* fp = kPre ? frag + static_cast<int64_t>(u0 / 8) * 32 + lane : nullptr;
    float pacc[kUT][2];
    CARE_UNROLL
    for (int n = 0; n < kUT; ++n) pacc[n][0] = pacc[n][1] = 0.f;
    for (int mt0 = 0; mt0 < n_mt; mt0 += kRT) {
      float acc[kRT][kUT][4];
      CARE_UNROLL
      for (int m = 0; m < kRT; ++m) {
        CARE_UNROLL
        for (int n = 0; n < kUT; ++n) {
          acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
        }
      }
      for (int ks = 0; ks < ksteps; ++ks) {
        const int k0 = ks * 8 + t;
        // the A fragment's elements (rows g, g + 8 at steps k0, k0 + 4) from a tile's row g
        const int o[4] = {k0 * ld, k0 * ld + 8, (k0 + 4) * ld, (k0 + 4) * ld + 8};
        uint32_t bhi[kUT][2], blo[kUT][2];
        if (kPre) {
          const uint4* np = fp + static_cast<int64_t>(ks) * n_ut * 32;
          CARE_UNROLL
          for (int n = 0; n < kUT; ++n) {
            const uint4 v = np[n * 32];
            bhi[n][0] = v.x;
            bhi[n][1] = v.y;
            blo[n][0] = v.z;
            blo[n][1] = v.w;
          }
        } else {
          CARE_UNROLL
          for (int n = 0; n < kUT; ++n) {
            split_tf32(bcol[n][k0 * r2w.cs], bhi[n][0], blo[n][0]);
            split_tf32(bcol[n][(k0 + 4) * r2w.cs], bhi[n][1], blo[n][1]);
          }
        }
        // Each accumulator takes its three products small ones first: a_lo b_hi, a_hi b_lo,
        // a_hi b_hi. Pre-split, with all kRT row tiles present (the same for the whole
        // warp), the tiles' products are interleaved: kRT * kUT independent
        // accumulators between two dependent HMMAs, where one tile at a time left kUT
        // (ncu at 1024x64: "wait", a fixed-latency dependency, was 37% of this loop's stall
        // samples). The low pieces of all tiles first, then the high ones into the same
        // registers (both at once spilled under the 128-register cap). Same order per
        // accumulator on every path, so pre-split and in-loop splits give the same bits.
        if (kPre && mt0 + kRT <= n_mt) {
          uint32_t a[kRT][4];
          const int a0 = mt0 * 16 + g;  // row g of tile m at step k: [a0 + 16 m + k * ld]
          auto load = [&](const float* pieces) {  // every tile's A fragment of r1lo or r1t
            CARE_UNROLL
            for (int m = 0; m < kRT; ++m) {
              CARE_UNROLL
              for (int i = 0; i < 4; ++i) a[m][i] = __float_as_uint(pieces[a0 + 16 * m + o[i]]);
            }
          };
          auto products = [&](const uint32_t (&b)[kUT][2]) {  // a b for every tile pair
            CARE_UNROLL
            for (int n = 0; n < kUT; ++n) {
              CARE_UNROLL
              for (int m = 0; m < kRT; ++m) mma_tf32(acc[m][n], a[m], b[n]);
            }
          };
          load(s.r1lo);
          products(bhi);
          load(s.r1t);
          products(blo);
          products(bhi);
        } else {  // one row tile at a time: splitting in the loop, or the last, partial group
          CARE_UNROLL
          for (int m = 0; m < kRT; ++m) {
            if (mt0 + m < n_mt) {
              const int a0 = (mt0 + m) * 16 + g;  // (row g of the tile, step k): [a0 + k * ld]
              uint32_t ahi[4], alo[4];
              CARE_UNROLL
              for (int i = 0; i < 4; ++i) {
                if (kPre) {  // layer 1 stored the pieces: r1t the high ones, r1lo the low ones
                  ahi[i] = __float_as_uint(s.r1t[a0 + o[i]]);
                  alo[i] = __float_as_uint(s.r1lo[a0 + o[i]]);
                } else {
                  split_tf32(s.r1t[a0 + o[i]], ahi[i], alo[i]);
                }
              }
              CARE_UNROLL
              for (int n = 0; n < kUT; ++n) {
                mma_tf32(acc[m][n], alo, bhi[n]);
                mma_tf32(acc[m][n], ahi, blo[n]);
                mma_tf32(acc[m][n], ahi, bhi[n]);
              }
            }
          }
        }
      }
      CARE_UNROLL
      for (int m = 0; m < kRT; ++m) {
        const int row = (mt0 + m) * 16 + g;  // rows past count (zeros or past the tiles): unpooled
        const bool in0 = row < count, in1 = row + 8 < count;
        CARE_UNROLL
        for (int n = 0; n < kUT; ++n) {
          CARE_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int unit = u0 + 8 * n + 2 * t + e;
            const float bias = unit < w.R2 ? w.r2b[unit] : 0.f;
            pacc[n][e] += (in0 ? relu_f(acc[m][n][e] + bias) : 0.f) +
                          (in1 ? relu_f(acc[m][n][2 + e] + bias) : 0.f);
          }
        }
      }
    }
    CARE_UNROLL
    for (int n = 0; n < kUT; ++n) {
      CARE_UNROLL
      for (int e = 0; e < 2; ++e) {
        float v = pacc[n][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        const int unit = u0 + 8 * n + 2 * t + e;
        if (g == 0 && unit < w.R2) {
          s.part[unit] = v;
          for (int r = 1; r < kL2RowGroups; ++r) s.part[r * w.R2 + unit] = 0.f;
        }
      }
    }
  }
}
#endif

// The rollout and prompt branches of one classifier for one prompt b: the prompt branch's output
// into p [P] and the (masked) mean pool of rollout layer 2 into pool [R2] (all threads may read
// them after the final sync). pre_r (rows b*G .. b*G+G-1) and pre_p (row b) are the first-layer
// GEMM outputs without bias; rfeat [G, Fr] (nullptr when Fr = 0), pfeat [Fp]; mask [G] or nullptr
// (pool all G). Uses s.r1t, s.rows and s.part, and reads layer 2's weight from s.r2w when staged.
// l2_mma (StepTailArgs::l2_mma): nonzero runs layer 2 on tensor cores where it can run (CUDA on
// sm_80+, R1 a multiple of 8), else the FFMA tiles; 2 takes the pre-split path's 4x2 tiles. The CPU
// twin always runs the FFMA tiles.
template <class Sync>
CARE_HD void branches(const HeadWeights& w, int G, int64_t b, PreAct pre_r, const float* rfeat,
                      const bool* mask, PreAct pre_p, const float* pfeat, const HeadScratch& s,
                      float* p, float* pool, int l2_mma, int tid, int nth, Sync sync) {
  // the pooled rollouts in order (the mask's true entries, or all G) into s.rows, and their count
  int count = 0;
#if defined(__CUDA_ARCH__)
  {  // every warp reads the mask 32 entries at a time and counts by ballot; warp 0 writes rows
     // (one load per lane and step, where a serial loop paid one memory latency per entry)
    const int lane = tid & 31;
    for (int g0 = 0; g0 < G; g0 += 32) {
      const int g = g0 + lane;
      const bool in = g < G && (mask == nullptr || mask[g]);
      const unsigned bal = __ballot_sync(0xffffffffu, in);
      const int before = __popc(bal & ((1u << lane) - 1u));  // true entries below this lane
      if (tid < 32 && in) s.rows[count + before] = static_cast<float>(g);
      count += __popc(bal);
    }
  }
#else
  for (int g = 0; g < G; ++g) {
    if (mask == nullptr || mask[g]) {
      if (tid == 0) s.rows[count] = static_cast<float>(g);
      ++count;
    }
  }
#endif
  const float inv = count > 0 ? 1.f / static_cast<float>(count) : 0.f;  // empty mask: pool 0
  const int n_tiles = (count + kL2TileRows - 1) / kL2TileRows;
  const int ld = r1t_ld(G), rows = r1t_rows(count);
  for (int i = tid; i < w.P; i += nth) {  // prompt branch: bias, features, ReLU
    float v = pre_p.at(b, i) + w.pb[i];
    for (int f = 0; f < w.Fp; ++f) v += w.pw.at(i, w.H + f) * pfeat[f];
    p[i] = relu_f(v);
  }
  sync();  // rows
  // rollout layer 1 of the pooled rollouts: bias, features, ReLU, into r1t (zeros up to whole
  // tiles). Items go in warp tiles of kL1TileUnits consecutive units k x kL1TileRows consecutive
  // slots c (l1_item): a warp reads the GEMM output in whole 32-byte sectors and writes r1t with
  // 2-way bank conflicts at most (32 consecutive units, the earlier order, conflicted 8-way: 88%
  // of the shared-memory wavefronts of these stores were excess in ncu at 1024x64).
  // Each thread takes kL1Chunk items at a time (items tid, tid + nth, ...): first all their loads,
  // then their sums, each in the order of PreAct::at.
  const int n_ktiles = (w.R1 + kL1TileUnits - 1) / kL1TileUnits;
  const int n_items = rows * n_ktiles * kL1TileUnits;  // rows: whole tiles of kL1TileRows
  for (int i0 = tid; i0 < n_items; i0 += kL1Chunk * nth) {
    float x[kL1Chunk][PreAct::kMaxTerms];
    int cu[kL1Chunk], ku[kL1Chunk], gu[kL1Chunk];  // rollout slot, unit, rollout (-1: zero row)
    CARE_UNROLL
    for (int u = 0; u < kL1Chunk; ++u) {
      const int i = i0 + u * nth;
      l1_item(i, n_ktiles, cu[u], ku[u]);
      gu[u] = i < n_items && ku[u] < w.R1 && cu[u] < count ? static_cast<int>(s.rows[cu[u]]) : -1;
      if (gu[u] >= 0) pre_r.load(b * G + gu[u], ku[u], x[u]);
    }
    CARE_UNROLL
    for (int u = 0; u < kL1Chunk; ++u) {
      if (i0 + u * nth >= n_items) break;
      const int c = cu[u], k = ku[u], g = gu[u];
      if (k >= w.R1) continue;  // a tile's units past R1
      float v = 0.f;
      if (g >= 0) {
        v = pre_r.sum(x[u]) + w.r1b[k];
        for (int f = 0; f < w.Fr; ++f) v += w.r1w.at(k, w.H + f) * rfeat[g * w.Fr + f];
        v = relu_f(v);
      }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      if (s.r1lo != nullptr) {  // the tensor-core layer 2's A pieces, split once here
        uint32_t hi, lo;
        split_tf32(v, hi, lo);
        s.r1t[k * ld + c] = __uint_as_float(hi);
        s.r1lo[k * ld + c] = __uint_as_float(lo);
        continue;
      }
#endif
      s.r1t[k * ld + c] = v;
    }
  }
  sync();
  // rollout layer 2 + ReLU + (masked) mean pool (layer2_pool_parts), then the row groups added
  const Mat staged{s.r2w, 1, staged_r2w_ld(w.R2)};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
  (void)l2_mma;
#else
  if (s.r1lo != nullptr) {  // pre-split operands (host: only with l2_mma and R1 % 8 == 0)
    if (l2_mma == 2) {
      layer2_pool_parts_mma<true, kMmaRowTilesTall, kMmaUnitTilesTall>(w, w.r2w, s, count, ld, tid,
                                                                       nth);
    } else {
      layer2_pool_parts_mma<true>(w, w.r2w, s, count, ld, tid, nth);
    }
  } else if (l2_mma && w.R1 % 8 == 0) {  // tensor cores (CARE_EXT_TAIL_L2=mma): CUDA only
    if (s.r2w != nullptr) {
      layer2_pool_parts_mma<false>(w, staged, s, count, ld, tid, nth);
    } else {
      layer2_pool_parts_mma<false>(w, w.r2w, s, count, ld, tid, nth);
    }
  } else
#endif
  if (s.r2w != nullptr) {
    layer2_pool_parts(w, staged, s, count, n_tiles, ld, tid, nth);
  } else {
    layer2_pool_parts(w, w.r2w, s, count, n_tiles, ld, tid, nth);
  }
  sync();
  for (int j = tid; j < w.R2; j += nth) {
    float acc = s.part[j];
    for (int r = 1; r < kL2RowGroups; ++r) acc += s.part[r * w.R2 + j];
    pool[j] = acc * inv;
  }
  sync();
}

// Logits of one classifier for the nb prompts b0 .. b0+nb-1 (nb <= M), left in
// s.logits [nb][C] (all threads may read them after the final sync): each prompt's branches one
// after another, then both head layers for all of them at once (each head weight loaded once per
// block). rfeat [B*G, Fr] (nullptr when Fr = 0), mask [B, G] (nullptr: pool all), pfeat [B, Fp].
// head = false (the head in a kernel of its own, CARE_EXT_TAIL_HEAD=split): only the branches,
// their p and pool left in s (the last prompt's written by all threads: sync before reading).
// kAhead: the head's dot products software-pipelined (dot_in_order; the same bits).
template <int M, bool kAhead = false, class Sync>
CARE_HD void classifier_tail(const HeadWeights& w, int G, int64_t b0, int nb, PreAct pre_r,
                             const float* rfeat, const bool* mask, PreAct pre_p,
                             const float* pfeat, const HeadScratch& s, int l2_mma, int tid,
                             int nth, Sync sync, bool head = true,
                             TailStamps stamp = TailStamps{nullptr}) {
  for (int q = 0; q < nb; ++q) {
    const int64_t b = b0 + q;
    branches(w, G, b, pre_r, rfeat != nullptr ? rfeat + b * G * w.Fr : nullptr,
             mask != nullptr ? mask + b * G : nullptr, pre_p, pfeat + b * w.Fp, s, s.p + q * s.ldp,
             s.pool + q * s.ldpool, l2_mma, tid, nth, sync);
  }
  stamp(1, tid);
  if (!head) return;  // the head kernel's (CARE_EXT_TAIL_HEAD=split): p and pool stay in s
  for (int i = tid; i < w.K; i += nth) {  // head layer 1 on [p ; pool] of every prompt
    float v[M];
    CARE_UNROLL
    for (int q = 0; q < M; ++q) v[q] = w.h1b[i];
    dot_in_order<M, kAhead>(w.h1w, i, 0, s.p, s.ldp, w.P, nb, v);
    dot_in_order<M, kAhead>(w.h1w, i, w.P, s.pool, s.ldpool, w.R2, nb, v);
    CARE_UNROLL
    for (int q = 0; q < M; ++q) {  // compile-time indices: v stays in registers
      if (q < nb) s.z[q * s.ldz + i] = relu_f(v[q]);
    }
  }
  // head layer 2's weight staged (stage_h2w): one prompt per block only (the 4-prompt kernel is at
  // its register bound; its C x K weight serves 4 prompts per read anyway)
  const bool h2w_staged = M == 1 && s.h2w != nullptr;
  if (h2w_staged) async_wait<0>();  // this thread's stage_h2w copies landed (the sync: all)
  sync();
  stamp(2, tid);
  for (int c = tid; c < w.C; c += nth) {  // head layer 2
    float v[M];
    CARE_UNROLL
    for (int q = 0; q < M; ++q) v[q] = w.h2b[c];
    if (h2w_staged) {  // each call reads one kind of memory (GPU: LDS or LDG)
      dot_in_order<M, kAhead>(Mat{s.h2w, 1, w.C}, c, 0, s.z, s.ldz, w.K, nb, v);
    } else {
      dot_in_order<M, kAhead>(w.h2w, c, 0, s.z, s.ldz, w.K, nb, v);
    }
    CARE_UNROLL
    for (int q = 0; q < M; ++q) {
      if (q < nb) s.logits[q * w.C + c] = v[q];
    }
  }
  sync();
  stamp(3, tid);
}

// Inputs and outputs of the tail for all B prompts (row-major, contiguous).
struct StepTailArgs {
  HeadWeights w1, w2;  // Stage-I (Fr = 1, C = 2) and Stage-II (Fr = 0, C = G+1)
  int G;
  int prompts_per_block;     // 1 .. kMaxTailPrompts: block k runs prompts k*n .. k*n+n-1
  int l2_mma;                // 1: rollout layer 2 on tensor cores where it can run (branches);
                             // 2: also, pre-split, in 4x2 tiles (CARE_EXT_TAIL_MMA_TILES)
  PreAct pre_r1, pre_r2;     // rows B*G: [., R1] of stage 1 and of stage 2
  PreAct pre_p1, pre_p2;     // rows B: [., P] of stage 1 and of stage 2
  const float* prompt_feat;  // [B, G+1]
  const float* len_norm;     // [B, G]
  const bool* minority;      // [B, G]
  const float* cag;          // [B, G+1]
  const bool* admissible;    // [B, G+1]
  float* reliability;        // [B]
  float* logits1;            // [B, 2]
  float* probs;              // [B, G+1]
  float* ecag;               // [B]
  // The head in a kernel of its own (CARE_EXT_TAIL_HEAD=split), else all nullptr: head_in
  // [2][head_rows = B][head_ld] (the tail writes each stage's [p ; pool] there), head_z
  // [2][B][head_ldz] (head layer 1's outputs), head_count [2][head_groups] (blocks of a group of
  // head_prompts prompts done; the tail zeroes them, head blocks count, the last one finishes).
  float* head_in;
  float* head_z;
  int* head_count;
  int64_t head_rows;  // B
  int head_ld, head_ldz, head_prompts, head_groups;
  // CARE_EXT_TAIL_STAMPS=1 (CUDA): [2][blocks][kTailStampSlots] clock64 stamps (TailStamps), row
  // (stage * blocks + block); else nullptr
  long long* stamps;
};

// Scratch floats one block needs (the larger stage's: one scratch serves either stage).
CARE_HD int step_tail_scratch_floats(const StepTailArgs& a) {
  const int n = a.prompts_per_block;
  const int s1 = head_scratch_floats(a.w1, a.G, n), s2 = head_scratch_floats(a.w2, a.G, n);
  return s1 > s2 ? s1 : s2;
}

// Floats of the staged rollout layer-2 weight (stage_r2w) the larger stage needs.
CARE_HD int step_tail_staged_r2w_floats(const StepTailArgs& a) {
  const int s1 = staged_r2w_floats(a.w1.R1, a.w1.R2), s2 = staged_r2w_floats(a.w2.R1, a.w2.R2);
  return s1 > s2 ? s1 : s2;
}

// Floats of the staged head layer-2 weight (stage_h2w) the larger stage needs: K * C.
CARE_HD int step_tail_staged_h2w_floats(const StepTailArgs& a) {
  const int s1 = a.w1.K * a.w1.C, s2 = a.w2.K * a.w2.C;
  return s1 > s2 ? s1 : s2;
}

// A team of lanes for one prompt's Stage-II outputs (stage_outputs): on the GPU `size` lanes of
// one warp (size a power of two), synced by __syncwarp on their mask; on the CPU a single thread
// (nothing to sync).
struct LaneTeamSync {
  unsigned mask;
  CARE_HD void operator()() const {
#if defined(__CUDA_ARCH__)
    __syncwarp(mask);
#endif
  }
};

// Lanes per prompt team for nb prompts on nth threads: on the GPU the most of 32, 16, .. 1 that
// gives every prompt a team of its own where the block has the threads; on the CPU 1.
CARE_HD int output_team_size(int nb, int nth) {
#if defined(__CUDA_ARCH__)
  int size = 32;
  while (size > 1 && size * nb > nth) size /= 2;
  return size;
#else
  (void)nb;
  (void)nth;
  return 1;
#endif
}

// The outputs of one stage for the nb prompts b0 .. from their logits (logits [nb][C]): stage 0
// (Stage-I) the reliability and its logits, stage 1 (Stage-II) the probs over the admissible
// classes and the expected CAG (e: nb * C doubles of scratch). All threads must call it (it
// syncs). Stage-II: one prompt on the whole block (expected_cag_spread over all threads); several
// prompts side by side, each on a team of lanes (output_team_size) with C doubles of e of its
// own (teams take prompts t, t + teams, ..). The split head's finish has 16 prompts: one after
// another, 5 block barriers and two serial C-term FP64 sums each; after its layer 1 moved to
// shared memory the head kernel still took 49.5 us at 64 x 8 and 209.6 us at 1024 x 64 (H200,
// 2026-11-28), which points here (not measured apart yet). The sums keep expected_cag_row's
// order on any team, so the same bits. kMaxNb: nb's bound (1: the one-prompt tail, compiled
// without the teams).
template <int kMaxNb, class Sync>
CARE_HD void stage_outputs(const StepTailArgs& a, int stage, int64_t b0, int nb,
                           const float* logits, double* e, int tid, int nth, Sync sync) {
  const int C2 = a.G + 1;
  if (stage == 0) {
    for (int q = tid; q < nb; q += nth) {
      const int64_t b = b0 + q;
      const float l0 = logits[q * 2], l1 = logits[q * 2 + 1];
      const float m = l0 > l1 ? l0 : l1;
      const float e0 = expf(l0 - m), e1 = expf(l1 - m);
      a.logits1[2 * b] = l0;
      a.logits1[2 * b + 1] = l1;
      a.reliability[b] = e1 / (e0 + e1);
    }
  } else if (kMaxNb == 1 || nb == 1) {
    for (int q = 0; q < nb; ++q) {
      const int64_t o1 = (b0 + q) * C2;
      expected_cag_spread(logits + q * C2, a.cag + o1, a.admissible + o1, C2, a.probs + o1,
                          a.ecag + b0 + q, e, tid, nth, sync);
    }
  } else {
    const int size = output_team_size(nb, nth);
    const int teams = nb < nth / size ? nb : nth / size;
    const int team = tid / size, lane = tid - team * size;
    if (team >= teams) return;
    const int first = (tid & 31) & ~(size - 1);  // the team's first lane in its warp (GPU)
    const LaneTeamSync team_sync{size == 32 ? 0xffffffffu : ((1u << size) - 1u) << first};
    double* te = e + team * C2;
    for (int q = team; q < nb; q += teams) {
      const int64_t o1 = (b0 + q) * C2;
      if (q > team) team_sync();  // the team's last reads of te (previous prompt) come first
      expected_cag_spread(logits + q * C2, a.cag + o1, a.admissible + o1, C2, a.probs + o1,
                          a.ecag + b0 + q, te, lane, size, team_sync);
    }
  }
}

// The head kernel's inputs (CARE_EXT_TAIL_HEAD=split) after classifier_tail's branches: each of
// the nb prompts' [p ; pool] into this stage's head_in rows (head_input_ld), read after a sync
// (the last prompt's pool was summed by every thread); thread 0 zeroes the counters of the head
// groups g with b0 <= g * head_prompts < b0 + nb (each group's exactly once over the tail).
template <class Sync>
CARE_HD void write_head_inputs(const StepTailArgs& a, const HeadWeights& w, const HeadScratch& s,
                               int stage, int64_t b0, int nb, int tid, int nth, Sync sync) {
  sync();
  float* head_in = a.head_in + stage * a.head_rows * a.head_ld;
  for (int q = 0; q < nb; ++q) {
    float* row = head_in + (b0 + q) * a.head_ld;
    for (int j = tid; j < w.P; j += nth) row[j] = s.p[q * s.ldp + j];
    for (int j = tid; j < w.R2; j += nth) row[s.ldp + j] = s.pool[q * s.ldpool + j];
  }
  if (tid == 0) {
    for (int64_t g = (b0 + a.head_prompts - 1) / a.head_prompts; g * a.head_prompts < b0 + nb;
         ++g) {
      a.head_count[stage * a.head_groups + g] = 0;
    }
  }
}

// One stage of the nb prompts b0 .. b0+nb-1 (nb <= M <= kMaxTailPrompts, the scratch sized for
// at least nb; M = 1 is the one-prompt layout, compiled apart for its smaller register count):
// stage 0 = Stage-I (reliability and its logits), 1 = Stage-II (probs over the admissible classes
// and expected CAG). The stages share nothing but read-only inputs. r2w_staged: this stage's
// rollout layer-2 weight as stage_r2w wrote it (complete before the first sync), or nullptr;
// h2w_staged: this stage's head layer-2 weight as stage_h2w issued it (M = 1), or nullptr;
// stamp: TailStamps (CARE_EXT_TAIL_STAMPS).
// With a.head_in the head is left to the head kernel (head_block_layer1, head_finish): this
// writes the head inputs and zeroes the counters of the head groups that start in its prompts.
// kHeadHere: -1 reads that from a.head_in at run time (the CPU twins); 1 (head in the tail) or 0
// (split) fixes it at compile time (the CUDA kernels: each variant keeps only its own code, and
// the register allocation of the tail with its head stays what it was). kAhead: the head's dot
// products software-pipelined (CARE_EXT_TAIL_DOT_AHEAD; the same bits).
template <int M, class Sync, int kHeadHere = -1, bool kAhead = false>
CARE_HD void step_tail(const StepTailArgs& a, int64_t b0, int nb, int stage, float* scratch,
                       int tid, int nth, Sync sync, const float* r2w_staged = nullptr,
                       const float* h2w_staged = nullptr,
                       TailStamps stamp = TailStamps{nullptr}) {
  const int G = a.G;
  const bool head = kHeadHere < 0 ? a.head_in == nullptr : kHeadHere == 1;
  // each stage in a branch of its own, its weights named there (a.w1 / a.w2): selecting them by
  // a run-time reference made nvcc copy the kernel's parameters to local memory (spills)
  if (stage == 0) {
    const HeadScratch s = head_scratch(scratch, a.w1, G, nb, r2w_staged, h2w_staged);
    classifier_tail<M, kAhead>(a.w1, G, b0, nb, a.pre_r1, a.len_norm, nullptr, a.pre_p1,
                               a.prompt_feat, s, a.l2_mma, tid, nth, sync, head, stamp);
    if (head) {
      stage_outputs<M>(a, 0, b0, nb, s.logits, s.e, tid, nth, sync);
      stamp(4, tid);
    } else {
      write_head_inputs(a, a.w1, s, 0, b0, nb, tid, nth, sync);
    }
  } else {
    const HeadScratch s = head_scratch(scratch, a.w2, G, nb, r2w_staged, h2w_staged);
    classifier_tail<M, kAhead>(a.w2, G, b0, nb, a.pre_r2, nullptr, a.minority, a.pre_p2,
                               a.prompt_feat, s, a.l2_mma, tid, nth, sync, head, stamp);
    if (head) {
      stage_outputs<M>(a, 1, b0, nb, s.logits, s.e, tid, nth, sync);
      stamp(4, tid);
    } else {
      write_head_inputs(a, a.w2, s, 1, b0, nb, tid, nth, sync);
    }
  }
}

// The head in a kernel of its own (CARE_EXT_TAIL_HEAD=split). In the tail each block streams its
// classifier's whole head layer 1 (K x (P + R2) floats, 655 KB at CARE's sizes) for one to four
// prompts: at 64 x 8 x 4096, 128 blocks read 84 MB of head weights from L2 (ncu, H200: the head's
// dot products waited on those loads, 35% of the tail's stall samples). Here a block takes
// kHeadUnits units of head layer 1 for up to head_prompts prompts (each weight read once for all
// of them), and the last block of a group of prompts to finish (a counter) runs head layer 2 and
// the stage's outputs for the group. Every sum has the order of the tail's head (dot_in_order:
// bias, then the inputs in order), so the outputs are the same bits.
// The first version (2026-11-28: 64 units, 256 threads each advancing 4 prompts' sums through the
// weights in global memory, 32 loads ahead) lost on the H200: 55.8 us of head kernel at 64 x 8
// against the tail's ~10 us of head, 209.4 at 1024 x 64. Now a block is one warp-wide unit slice
// (32 units) x 4 warps of 4 prompts, 128 threads, twice the blocks, and its weights come through
// shared memory kHeadStages chunks ahead (cp.async): a sum's multiply-adds wait on shared memory,
// not L2. That alone left the kernel at 49.5 and 209.6 us (H200, the same day): layer 1 was not
// the bound. The last block's finish of its group, prompt after prompt, is the suspect; it now
// stages its layer-2 weight too and runs the prompts' outputs side by side (not measured yet).
constexpr int kHeadUnits = 32;  // head layer-1 units per head block (a warp's lanes)
constexpr int kHeadSub = 4;     // prompts whose sums one thread advances side by side
constexpr int kMaxHeadPrompts = 16;
constexpr int kHeadThreads = kHeadUnits * kMaxHeadPrompts / kHeadSub;  // one (unit, 4 prompts) each
constexpr int kHeadStages = 4;  // weight chunks of kDotChunk inputs in flight
constexpr int kHeadChunkFloats = kDotChunk * kHeadUnits;

// Row length of head_in for weights w: [p ; pool], pool starting at al4(P) (whole float4s).
CARE_HD int head_input_ld(const HeadWeights& w) { return al4(w.P) + al4(w.R2); }

// The row lengths both stages share (the longer stage's): head_in's, and head_z's (al4(K)).
CARE_HD int head_in_ld(const HeadWeights& w1, const HeadWeights& w2) {
  const int l1 = head_input_ld(w1), l2 = head_input_ld(w2);
  return l1 > l2 ? l1 : l2;
}

CARE_HD int head_z_ld(const HeadWeights& w1, const HeadWeights& w2) {
  return al4(w1.K) > al4(w2.K) ? al4(w1.K) : al4(w2.K);
}

// The finish's scratch (head_finish) for n prompts, in floats from the block's base: z [n][ldz]
// (copied in from head_z), the stage's head layer-2 weight staged k-major, w2s [K][C], logits
// [n][C], then e [n][C] doubles (8-byte aligned; stage_outputs' teams). floats: the whole.
struct HeadFinishLayout {
  int w2s, logits, e, floats;
};

CARE_HD HeadFinishLayout head_finish_layout(int n, int ldz, int K, int C) {
  HeadFinishLayout l;
  l.w2s = n * ldz;
  l.logits = l.w2s + K * C;
  const int end = l.logits + n * C;
  l.e = end + (end & 1);
  l.floats = l.e + 2 * n * C;
  return l;
}

// Scratch floats of a head block for n prompts of either stage: head layer 1's inputs (n rows of
// the longer stage's head_input_ld) and kHeadStages weight chunks, or (in the same place) the
// finish's (head_finish_layout, z rows at the longer al4(K)).
CARE_HD int head_block_floats(const HeadWeights& w1, const HeadWeights& w2, int n) {
  const int l1 = n * head_in_ld(w1, w2) + kHeadStages * kHeadChunkFloats;
  const int ldz = head_z_ld(w1, w2);
  const int f1 = head_finish_layout(n, ldz, w1.K, w1.C).floats;
  const int f2 = head_finish_layout(n, ldz, w2.K, w2.C).floats;
  const int fin = f1 > f2 ? f1 : f2;
  return l1 > fin ? l1 : fin;
}

// Head blocks of weights w along the units: kHeadUnits units each.
CARE_HD int head_unit_blocks(const HeadWeights& w) { return (w.K + kHeadUnits - 1) / kHeadUnits; }

// The prompts of head group g: g * head_prompts .. (returned: how many, the last group short).
CARE_HD int head_group_prompts(const StepTailArgs& a, int g) {
  const int64_t left = a.head_rows - static_cast<int64_t>(g) * a.head_prompts;
  return static_cast<int>(left < a.head_prompts ? left : a.head_prompts);
}

// Floats of the head kernel's buffers for B prompts in groups of `prompts`, whose layout this sets
// in a (head_rows, head_ld, head_ldz, head_prompts, head_groups; place_head_buffers points into
// them): head_in [2][B][head_ld], head_z [2][B][head_ldz], then head_count's 2 * head_groups ints,
// a float's room each.
CARE_HD int64_t head_layout(StepTailArgs& a, int64_t B, int prompts) {
  a.head_rows = B;
  a.head_ld = head_in_ld(a.w1, a.w2);
  a.head_ldz = head_z_ld(a.w1, a.w2);
  a.head_prompts = prompts;
  a.head_groups = static_cast<int>((B + prompts - 1) / prompts);
  return 2 * B * (a.head_ld + a.head_ldz) + 2 * static_cast<int64_t>(a.head_groups);
}

// Points a.head_in, head_z and head_count into `base` (head_layout's floats, 16-byte aligned).
CARE_HD void place_head_buffers(StepTailArgs& a, float* base) {
  a.head_in = base;
  a.head_z = base + 2 * a.head_rows * a.head_ld;
  a.head_count = reinterpret_cast<int*>(a.head_z + 2 * a.head_rows * a.head_ldz);
}

// Head layer 1's input columns in chunks of at most kDotChunk: p's, then the pool's. Chunk c is
// the weight columns col .. col+n-1, the inputs at xoff .. in a head_in row (pool at al4(P)).
struct HeadChunk {
  int col, xoff, n;
};

CARE_HD int head_chunk_count(const HeadWeights& w) {
  return (w.P + kDotChunk - 1) / kDotChunk + (w.R2 + kDotChunk - 1) / kDotChunk;
}

CARE_HD HeadChunk head_chunk(const HeadWeights& w, int c) {
  const int np = (w.P + kDotChunk - 1) / kDotChunk;
  if (c < np) {
    const int j = c * kDotChunk;
    return {j, j, w.P - j < kDotChunk ? w.P - j : kDotChunk};
  }
  const int j = (c - np) * kDotChunk;
  return {w.P + j, al4(w.P) + j, w.R2 - j < kDotChunk ? w.R2 - j : kDotChunk};
}

// Issues the copy of chunk ch of units u0 .. u0+nu-1 of W into buf [kDotChunk][kHeadUnits]
// (consecutive threads take consecutive units: coalesced reads of the column-major CUDA layout).
CARE_HD void head_stage_chunk(const Mat& W, int u0, int nu, HeadChunk ch, float* buf, int tid,
                              int nth) {
  for (int e = tid; e < ch.n * kHeadUnits; e += nth) {
    const int t = e / kHeadUnits, u = e - t * kHeadUnits;
    if (u < nu) copy_async_f32(buf + e, W.row(u0 + u) + (ch.col + t) * W.cs);
  }
}

// One chunk's multiply-adds of a head item: v[q] += wb[t * ws] * x_q[j + t] for t < n, in order
// for every sum (x_q = x + q * ldx; wb in shared memory, ws: kHeadUnits in layer 1, C in layer
// 2). On the GPU a whole chunk for kHeadSub prompts is unrolled: its weights from shared memory
// one by one (consecutive lanes, consecutive units: no bank conflict), the prompts' inputs as
// float4 (broadcast); j and ldx are multiples of 4, x 16-byte aligned.
CARE_HD void head_chunk_fmas(const float* wb, int ws, int n, const float* x, int ldx, int j,
                             int nq, float (&v)[kHeadSub]) {
#if defined(__CUDA_ARCH__)
  if (n == kDotChunk && nq == kHeadSub) {
    CARE_UNROLL
    for (int t = 0; t < kDotChunk; t += 4) {
      float xs[kHeadSub][4];
      load_inputs4(x, ldx, j + t, xs);
      CARE_UNROLL
      for (int e = 0; e < 4; ++e) {
        const float wt = wb[(t + e) * ws];
        CARE_UNROLL
        for (int q = 0; q < kHeadSub; ++q) v[q] += wt * xs[q][e];  // sass: head-fma
      }
    }
    return;
  }
#endif
  for (int t = 0; t < n; ++t) {
    const float wt = wb[t * ws];
    CARE_UNROLL
    for (int q = 0; q < kHeadSub; ++q) {
      if (q < nq) v[q] += wt * x[q * ldx + j + t];
    }
  }
}

// Head layer 1 of head block (unit block ug, prompt group g, stage): for its nb prompts b0 .. and
// units u0 .. u0+nu-1, z[b][i] = relu(h1b[i] + h1w[i, :] . [p_b ; pool_b]) from this stage's
// head_in rows into its head_z rows. Item (subgroup of kHeadSub prompts, unit): kItems per thread
// at most (the CUDA kernel: 1, kHeadThreads threads; the CPU twin: kHeadThreads, any team), its
// sums in registers across the chunks. The head_in rows and the weight chunks come into scratch
// (head_block_floats) by asynchronous copies, kHeadStages - 1 chunks ahead of the multiply-adds;
// every thread waits for its own copies, then a barrier for everyone's.
template <int kItems, class Sync>
CARE_HD void head_block_layer1(const StepTailArgs& a, int stage, int g, int ug, float* scratch,
                               int tid, int nth, Sync sync) {
  const HeadWeights& w = stage == 0 ? a.w1 : a.w2;
  const int64_t b0 = static_cast<int64_t>(g) * a.head_prompts;
  const int nb = head_group_prompts(a, g);
  const int u0 = ug * kHeadUnits, nu = w.K - u0 < kHeadUnits ? w.K - u0 : kHeadUnits;
  const int ldx = a.head_ld;  // a multiple of 4: whole float4s per row
  float* x = scratch;
  float* wbuf = scratch + nb * ldx;
  const float* rows = a.head_in + (stage * a.head_rows + b0) * ldx;
  for (int i = 4 * tid; i < nb * ldx; i += 4 * nth) copy_async_f4_l2(x + i, rows + i);
  const int nc = head_chunk_count(w);
  for (int c = 0; c < kHeadStages - 1; ++c) {  // group c: chunk c (group 0 also the inputs)
    if (c < nc) head_stage_chunk(w.h1w, u0, nu, head_chunk(w, c), wbuf + c * kHeadChunkFloats,
                                 tid, nth);
    async_commit();
  }
  const int nsub = (nb + kHeadSub - 1) / kHeadSub, items = nsub * nu;
  float v[kItems][kHeadSub];
  CARE_UNROLL
  for (int it = 0; it < kItems; ++it) {
    const int item = tid + it * nth;
    const float bias = item < items ? w.h1b[u0 + item % nu] : 0.f;
    CARE_UNROLL
    for (int q = 0; q < kHeadSub; ++q) v[it][q] = bias;
  }
  for (int c = 0; c < nc; ++c) {
    const int ahead = c + kHeadStages - 1;  // into the buffer chunk c - 1 used (barrier below)
    if (ahead < nc) head_stage_chunk(w.h1w, u0, nu, head_chunk(w, ahead),
                                     wbuf + (ahead % kHeadStages) * kHeadChunkFloats, tid, nth);
    async_commit();
    async_wait<kHeadStages - 1>();  // this thread's copies of chunk c (and of the inputs) landed
    sync();
    const HeadChunk ch = head_chunk(w, c);
    const float* wb = wbuf + (c % kHeadStages) * kHeadChunkFloats;
    CARE_UNROLL
    for (int it = 0; it < kItems; ++it) {
      const int item = tid + it * nth;
      if (item >= items) break;
      const int sg = item / nu, u = item - sg * nu;
      const int q0 = sg * kHeadSub, nq = nb - q0 < kHeadSub ? nb - q0 : kHeadSub;
      head_chunk_fmas(wb + u, kHeadUnits, ch.n, x + q0 * ldx, ldx, ch.xoff, nq, v[it]);
    }
    sync();
  }
  float* zg = a.head_z + stage * a.head_rows * a.head_ldz;
  CARE_UNROLL
  for (int it = 0; it < kItems; ++it) {
    const int item = tid + it * nth;
    if (item >= items) break;
    const int sg = item / nu, u = item - sg * nu;
    const int q0 = sg * kHeadSub, nq = nb - q0 < kHeadSub ? nb - q0 : kHeadSub;
    CARE_UNROLL
    for (int q = 0; q < kHeadSub; ++q) {
      if (q < nq) zg[(b0 + q0 + q) * a.head_ldz + u0 + u] = relu_f(v[it][q]);
    }
  }
}

// Head layer 2 and the stage's outputs for prompt group g, once all of its head layer 1 is in
// this stage's head_z rows (written by other blocks: copied in through L2, past this SM's L1).
// The layer-2 weight (C x K, 66 KB at G = 64) comes into shared memory with them, so the C
// classes' sums wait on shared memory, not on L2, chunk after chunk (the first split head, which
// read it from global memory 32 weights ahead, finished each group serially; 209 us of head
// kernel at 1024 x 64 on the H200). scratch: head_finish_layout (z's padding is never read).
template <class Sync>
CARE_HD void head_finish(const StepTailArgs& a, int stage, int g, float* scratch, int tid,
                         int nth, Sync sync) {
  const HeadWeights& w = stage == 0 ? a.w1 : a.w2;
  const int64_t b0 = static_cast<int64_t>(g) * a.head_prompts;
  const int nb = head_group_prompts(a, g);
  const int ldz = a.head_ldz, C = w.C;
  const HeadFinishLayout l = head_finish_layout(nb, ldz, w.K, C);
  float* z = scratch;
  float* w2s = scratch + l.w2s;
  float* logits = scratch + l.logits;
  double* e = reinterpret_cast<double*>(scratch + l.e);
  const float* rows = a.head_z + (stage * a.head_rows + b0) * ldz;
  for (int i = 4 * tid; i < nb * ldz; i += 4 * nth) copy_async_f4_l2(z + i, rows + i);
  stage_h2w(w.h2w, w.K, C, w2s, tid, nth);  // k-major; commits the z copies' group with its own
  async_wait<0>();
  sync();
  const int nsub = (nb + kHeadSub - 1) / kHeadSub;
  for (int item = tid; item < nsub * C; item += nth) {
    const int sg = item / C, c = item - sg * C;
    const int q0 = sg * kHeadSub, nq = nb - q0 < kHeadSub ? nb - q0 : kHeadSub;
    float v[kHeadSub];
    CARE_UNROLL
    for (int q = 0; q < kHeadSub; ++q) v[q] = w.h2b[c];
    for (int k0 = 0; k0 < w.K; k0 += kDotChunk) {
      const int n = w.K - k0 < kDotChunk ? w.K - k0 : kDotChunk;
      head_chunk_fmas(w2s + k0 * C + c, C, n, z + q0 * ldz, ldz, k0, nq, v);
    }
    CARE_UNROLL
    for (int q = 0; q < kHeadSub; ++q) {
      if (q < nq) logits[(q0 + q) * C + c] = v[q];
    }
  }
  sync();
  stage_outputs<kMaxHeadPrompts>(a, stage, b0, nb, logits, e, tid, nth, sync);
}

}  // namespace care_ext
