// Per-prompt ("row") math shared by the CPU and CUDA kernels.
//
// Every function here works on one prompt's G rollouts and is compiled both for the host
// (csrc/cpu/*.cpp) and for the device (csrc/cuda/*.cu), so the two backends cannot drift apart.
// Semantics are those of ARCHITECTURE.md §3 and of care_ext/reference.py; keep the three in sync.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CARE_HD __host__ __device__ __forceinline__
#define CARE_UNROLL _Pragma("unroll")  // loops over compile-time tile sizes: registers, not memory
#else
#define CARE_HD inline
#define CARE_UNROLL
#endif

namespace care_ext {

// Largest supported group size G (rollouts per prompt). Kernels keep per-row scratch of this size.
constexpr int kMaxGroupSize = 64;

// Mean and the divisor (std + eps) of one row of rewards, in double.
// constant == true when every value equals the first one (then std == 0 and the advantage row is
// exactly zero, whatever eps is). unbiased selects the sample (n-1) over the population (n) std.
struct RowMoments {
  double mean;
  double denom;
  bool constant;
};

template <typename T>
CARE_HD RowMoments row_moments(const T* r, int G, double eps, bool unbiased) {
  RowMoments m{0.0, 1.0, true};
  double sum = 0.0;
  for (int i = 0; i < G; ++i) {
    sum += static_cast<double>(r[i]);
    if (!(r[i] == r[0])) m.constant = false;  // NaN is never equal: a NaN row is not constant
  }
  if (m.constant || G < 2) {
    m.constant = true;
    return m;
  }
  m.mean = sum / G;
  double ss = 0.0;
  for (int i = 0; i < G; ++i) {
    const double d = static_cast<double>(r[i]) - m.mean;
    ss += d * d;
  }
  const double var = ss / (unbiased ? (G - 1) : G);
  m.denom = sqrt(var) + eps;
  return m;
}

template <typename T>
CARE_HD double advantage_of(const RowMoments& m, T r) {
  return m.constant ? 0.0 : (static_cast<double>(r) - m.mean) / m.denom;
}

// A = (r - mean) / (std + eps); a constant row gives exactly 0.
template <typename T>
CARE_HD void advantage_row(const T* r, int G, double eps, bool unbiased, T* out) {
  const RowMoments m = row_moments(r, G, eps, unbiased);
  for (int i = 0; i < G; ++i) out[i] = static_cast<T>(advantage_of(m, r[i]));
}

// ||A(r_gt) - A(r_ps)||_2 over the row (paper Eq. 4).
template <typename T>
CARE_HD double cag_row(const T* r_gt, const T* r_ps, int G, double eps, bool unbiased) {
  const RowMoments mg = row_moments(r_gt, G, eps, unbiased);
  const RowMoments mp = row_moments(r_ps, G, eps, unbiased);
  double ss = 0.0;
  for (int i = 0; i < G; ++i) {
    const double d = advantage_of(mg, r_gt[i]) - advantage_of(mp, r_ps[i]);
    ss += d * d;
  }
  return sqrt(ss);
}

// Advantages of a 0/1 reward vector with `ones` ones out of G: (value at a 1, value at a 0).
struct BinaryAdvantage {
  double at_one;
  double at_zero;
};

CARE_HD BinaryAdvantage binary_advantage(int G, int ones, double eps, bool unbiased) {
  if (ones <= 0 || ones >= G) return {0.0, 0.0};  // constant row
  const double mean = static_cast<double>(ones) / G;
  const double ss = static_cast<double>(ones) * (G - ones) / G;  // sum of squared deviations
  const double denom = sqrt(ss / (unbiased ? (G - 1) : G)) + eps;
  return {(1.0 - mean) / denom, -mean / denom};
}

// CAG between a pseudo reward vector with x ones (the majority) and a true reward vector with k
// ones on k *other* positions, under the same advantage convention. Requires 0 <= x, 0 <= k,
// x + k <= G. Three position groups: majority (x), the correct cluster (k), the rest.
CARE_HD double binary_cag(int G, int x, int k, double eps, bool unbiased) {
  const BinaryAdvantage p = binary_advantage(G, x, eps, unbiased);
  const BinaryAdvantage t = binary_advantage(G, k, eps, unbiased);
  const double d_major = t.at_zero - p.at_one;
  const double d_true = t.at_one - p.at_zero;
  const double d_rest = t.at_zero - p.at_zero;
  const double ss = x * d_major * d_major + k * d_true * d_true + (G - x - k) * d_rest * d_rest;
  return sqrt(ss);
}

// Answer clusters of one row. ids: G answer ids, negative = invalid. Clusters are the sets of equal
// valid ids, ordered by size descending, ties by smaller first-occurrence index. Writes
// rank[i] (cluster rank of response i, -1 if invalid) and sizes[0..G) (sizes in rank order,
// zero-padded). Returns the number of clusters.
CARE_HD int cluster_row(const int64_t* ids, int G, int64_t* rank, int64_t* sizes) {
  int first[kMaxGroupSize];  // first occurrence of response i's id, -1 if invalid
  int count[kMaxGroupSize];  // size of the cluster represented by index i (0 unless i is a rep)
  for (int i = 0; i < G; ++i) {
    count[i] = 0;
    first[i] = -1;
    if (ids[i] < 0) continue;
    int f = i;
    for (int j = 0; j < i; ++j) {
      if (ids[j] == ids[i]) {
        f = j;
        break;
      }
    }
    first[i] = f;
    count[f] += 1;
  }
  int n_clusters = 0;
  int crank[kMaxGroupSize];
  for (int r = 0; r < G; ++r) {
    sizes[r] = 0;
    crank[r] = -1;
    if (first[r] != r) continue;
    int above = 0;
    for (int q = 0; q < G; ++q) {
      if (first[q] != q || q == r) continue;
      if (count[q] > count[r] || (count[q] == count[r] && q < r)) ++above;
    }
    crank[r] = above;
    ++n_clusters;
  }
  for (int r = 0; r < G; ++r) {
    if (crank[r] >= 0) sizes[crank[r]] = count[r];
  }
  for (int i = 0; i < G; ++i) rank[i] = first[i] < 0 ? -1 : crank[first[i]];
  return n_clusters;
}

// Class-wise CAG of one row. sizes: G cluster sizes in rank order (as cluster_row writes them);
// writes cag[0..G] and admissible[0..G]. Class k = number of correct responses outside a wrong
// majority of size x = sizes[0]. Admissible: k = 0 always; k = sizes[j] (j >= 1) when
// 0 < k <= x and x + k <= G (always true for a real partition). Inadmissible entries are 0.
// An x outside [0, G] is treated as 0 (no valid answer), so no input reads out of bounds.
//
// Split in two for the warp-cooperative group_features kernel: classwise_cag_clear zeroes the
// row, classwise_cag_fill sets the admissible classes; both take the calling lane and the number
// of lanes (lane 0 of 1 on one thread). Every class's value depends only on k, so lanes that meet
// the same k (two clusters of one size) write the same bits, in any order.
template <typename F>
CARE_HD void classwise_cag_clear(int G, F* cag, bool* admissible, int lane, int nlanes) {
  for (int k = lane; k <= G; k += nlanes) {
    cag[k] = F(0);
    admissible[k] = false;
  }
}

template <typename F>
CARE_HD void classwise_cag_fill(const int64_t* sizes, int G, double eps, bool unbiased, F* cag,
                                bool* admissible, int lane, int nlanes) {
  int64_t x = sizes[0];
  if (x < 0 || x > G) x = 0;
  if (lane == 0) {
    admissible[0] = true;
    cag[0] = static_cast<F>(binary_cag(G, static_cast<int>(x), 0, eps, unbiased));
  }
  for (int j = 1 + lane; j < G; j += nlanes) {
    const int64_t k = sizes[j];
    if (k <= 0 || k > x || x + k > G) continue;
    admissible[k] = true;
    cag[k] = static_cast<F>(binary_cag(G, static_cast<int>(x), static_cast<int>(k), eps, unbiased));
  }
}

template <typename F>
CARE_HD void classwise_cag_row(const int64_t* sizes, int G, double eps, bool unbiased, F* cag,
                               bool* admissible) {
  classwise_cag_clear(G, cag, admissible, 0, 1);
  classwise_cag_fill(sizes, G, eps, unbiased, cag, admissible, 0, 1);
}

// The largest admissible logit in double (NaN if any admissible logit is NaN), in k order;
// *any: whether some class is admissible (else the result is -inf).
// The flags are read kAdmissibleChunk at a time before they are used (on the GPU: that many
// loads in flight, where the loop compiled to 4 per memory latency); classes still in order.
constexpr int kAdmissibleChunk = 16;

template <typename F>
CARE_HD double admissible_max(const F* logits, const bool* admissible, int C, bool* any) {
  double mx = -INFINITY;
  bool found = false;
  for (int k0 = 0; k0 < C; k0 += kAdmissibleChunk) {
    bool a[kAdmissibleChunk];
    CARE_UNROLL
    for (int j = 0; j < kAdmissibleChunk; ++j) a[j] = k0 + j < C && admissible[k0 + j];
    CARE_UNROLL
    for (int j = 0; j < kAdmissibleChunk; ++j) {
      if (!a[j]) continue;
      const double v = static_cast<double>(logits[k0 + j]);
      if (!found || v > mx || v != v) mx = v;
      found = true;
    }
  }
  *any = found;
  return mx;
}

// Softmax of logits over the admissible classes only, and the expected CAG. Inadmissible classes
// get probability 0; a row with no admissible class gets all-zero probs and ecag 0.
template <typename F>
CARE_HD void expected_cag_row(const F* logits, const F* cag, const bool* admissible, int C, F* probs,
                              F* ecag) {
  bool any = false;
  const double mx = admissible_max(logits, admissible, C, &any);
  if (!any) {
    for (int k = 0; k < C; ++k) probs[k] = F(0);
    *ecag = F(0);
    return;
  }
  double z = 0.0;
  for (int k = 0; k < C; ++k) {
    if (admissible[k]) z += exp(static_cast<double>(logits[k]) - mx);
  }
  double e = 0.0;
  for (int k = 0; k < C; ++k) {
    const double p = admissible[k] ? exp(static_cast<double>(logits[k]) - mx) / z : 0.0;
    probs[k] = static_cast<F>(p);
    e += p * static_cast<double>(cag[k]);
  }
  *ecag = static_cast<F>(e);
}

// expected_cag_row over the threads of a block (the fused step's tail, step_tail.h): the same
// results, with the C exponentials and divisions spread over the threads (thread 0 alone ran ~2C
// FP64 exponentials and C divisions back to back: ~130 exp at G = 64). The maximum and both sums
// keep expected_cag_row's order: every thread takes the maximum and the normaliser z over k
// ascending itself, thread 0 the expected CAG. e: C doubles of scratch. All threads must call it
// (it syncs); every output is written when it returns.
template <class Sync>
CARE_HD void expected_cag_spread(const float* logits, const float* cag, const bool* admissible,
                                 int C, float* probs, float* ecag, double* e, int tid, int nth,
                                 Sync sync) {
  bool any = false;
  const double mx = admissible_max(logits, admissible, C, &any);
  if (!any) {  // the same in every thread: no sync is skipped by some threads only
    for (int k = tid; k < C; k += nth) probs[k] = 0.f;
    if (tid == 0) *ecag = 0.f;
    return;
  }
  for (int k = tid; k < C; k += nth) {
    e[k] = admissible[k] ? exp(static_cast<double>(logits[k]) - mx) : 0.0;
  }
  sync();
  double z = 0.0;  // e is +0.0 off the admissible classes: adding it leaves z's bits (z >= 0)
  for (int k = 0; k < C; ++k) z += e[k];  // shared memory only (no admissible[k] load per class)
  sync();  // every thread has read e before it is overwritten
  for (int k = tid; k < C; k += nth) {
    const double p = admissible[k] ? e[k] / z : 0.0;
    probs[k] = static_cast<float>(p);
    e[k] = p;
  }
  sync();
  if (tid == 0) {
    double acc = 0.0;
    for (int k = 0; k < C; ++k) acc += e[k] * static_cast<double>(cag[k]);
    *ecag = static_cast<float>(acc);
  }
}

// Everything the acquisition step derives per prompt from answer ids and lengths (one row).
// prompt_feat: [1+G] = valid ratio, sizes / G. len_norm: clamp(length / max_len, 0, 1).
// minority: valid and not in the majority. pseudo: 1 on the majority cluster. adv: its advantage.
struct FeatureParams {
  double max_len, cag_eps, adv_eps;
  bool cag_unbiased, adv_unbiased;
};

// Response lengths as the caller stored them: float32, float64, int64 or int32 (other dtypes are
// converted to float32 on the host first). Each value is read as static_cast<float>, the
// conversion of lengths.to(torch.float32), so the results keep the bits of a float32 copy; the
// kernels read in place because that copy cost the CUDA step a kernel and three host ops per call.
enum class LengthKind : int { kFloat, kDouble, kLong, kInt };

struct Lengths {
  const void* data;
  LengthKind kind;

  CARE_HD float operator[](int64_t i) const {
    switch (kind) {
      case LengthKind::kDouble: return static_cast<float>(static_cast<const double*>(data)[i]);
      case LengthKind::kLong: return static_cast<float>(static_cast<const int64_t*>(data)[i]);
      case LengthKind::kInt: return static_cast<float>(static_cast<const int32_t*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
  // The lengths from element `offset` on (a row's).
  CARE_HD Lengths from(int64_t offset) const {
    const char* base = static_cast<const char*>(data);
    const int64_t bytes = kind == LengthKind::kDouble || kind == LengthKind::kLong ? 8 : 4;
    return Lengths{base + offset * bytes, kind};
  }
};

// One prompt's slices of group_features' inputs and outputs.
struct FeatureRow {
  const int64_t* rank;   // [G] cluster rank per response (cluster_row), -1 invalid
  const int64_t* sizes;  // [G] cluster sizes in rank order
  Lengths lengths;       // [G]
  float* prompt_feat;    // [G+1]
  float* len_norm;       // [G]
  bool* minority;        // [G]
  float* cag;            // [G+1]
  bool* admissible;      // [G+1]
  float* pseudo;         // [G]
  float* adv;            // [G]
};

// What group_features derives after clustering, in two phases for the CUDA kernel's warp (lane
// 0..nlanes-1 each; __syncwarp between the phases) or one thread (lane 0 of 1, phase after
// phase: the CPU). Every element is computed by the same arithmetic however many lanes share the
// row, and the row's sums (valid count, the pseudo rewards' moments) are taken in element order by
// one lane or by every lane alike, so no result depends on the number of lanes.
// Phase 1: the per-response values and the cleared class row.
CARE_HD void features_per_response(const FeatureRow& r, int G, const FeatureParams& p, int lane,
                                   int nlanes) {
  const float g = static_cast<float>(G);
  for (int j = lane; j < G; j += nlanes) r.prompt_feat[1 + j] = static_cast<float>(r.sizes[j]) / g;
  for (int i = lane; i < G; i += nlanes) {
    double l = static_cast<double>(r.lengths[i]) / p.max_len;
    l = l < 0.0 ? 0.0 : (l > 1.0 ? 1.0 : l);
    r.len_norm[i] = static_cast<float>(l);
    r.minority[i] = r.rank[i] > 0;
    r.pseudo[i] = r.rank[i] == 0 ? 1.0f : 0.0f;
  }
  classwise_cag_clear(G, r.cag, r.admissible, lane, nlanes);
}

// Phase 2 (reads phase 1's pseudo rewards and cleared class row): the valid ratio, the class-wise
// CAG of the admissible classes and the pseudo advantages (advantage_row's arithmetic).
CARE_HD void features_per_class(const FeatureRow& r, int G, const FeatureParams& p, int lane,
                                int nlanes) {
  if (lane == 0) {
    int64_t valid = 0;
    for (int j = 0; j < G; ++j) valid += r.sizes[j];
    r.prompt_feat[0] = static_cast<float>(valid) / static_cast<float>(G);
  }
  classwise_cag_fill(r.sizes, G, p.cag_eps, p.cag_unbiased, r.cag, r.admissible, lane, nlanes);
  const RowMoments m = row_moments(r.pseudo, G, p.adv_eps, p.adv_unbiased);
  for (int i = lane; i < G; i += nlanes) {
    r.adv[i] = static_cast<float>(advantage_of(m, r.pseudo[i]));
  }
}

// One row of group_features on one thread. lanes > 1 runs the CUDA kernel's division of the row
// over a warp's lanes, lane by lane: every lane's phase 1, then (the kernel's __syncwarp) every
// lane's phase 2 (the private op _group_features_lanes; lanes = 1 is the plain CPU kernel).
CARE_HD void group_features_row(const int64_t* ids, Lengths lengths, int G, const FeatureParams& p,
                                int64_t* rank, int64_t* sizes, float* prompt_feat, float* len_norm,
                                bool* minority, float* cag, bool* admissible, float* pseudo,
                                float* adv, int lanes = 1) {
  cluster_row(ids, G, rank, sizes);
  const FeatureRow r{rank, sizes, lengths, prompt_feat, len_norm, minority, cag, admissible,
                     pseudo, adv};
  for (int lane = 0; lane < lanes; ++lane) features_per_response(r, G, p, lane, lanes);
  for (int lane = 0; lane < lanes; ++lane) features_per_class(r, G, p, lane, lanes);
}

}  // namespace care_ext
