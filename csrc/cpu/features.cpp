// CPU kernel: per-prompt features of the acquisition step (group_features).
#include "../care_ext.h"

#include <ATen/Parallel.h>

#include <limits>

namespace care_ext {

namespace {

// Every row of `a` (rows in parallel), each on one thread as group_features_row runs it.
FeatureTuple features_rows(const FeatureArgs& a, const FeatureParams& p, int lanes) {
  const int G = static_cast<int>(a.G);
  const int64_t* in = a.ids.data_ptr<int64_t>();
  const Lengths len = a.lengths_view();
  int64_t* rank = a.rank.data_ptr<int64_t>();
  int64_t* sizes = a.sizes.data_ptr<int64_t>();
  float* pf = a.prompt_feat.data_ptr<float>();
  float* ln = a.len_norm.data_ptr<float>();
  bool* mino = a.minority_mask.data_ptr<bool>();
  float* cag = a.cag.data_ptr<float>();
  bool* adm = a.admissible.data_ptr<bool>();
  float* ps = a.pseudo_rewards.data_ptr<float>();
  float* adv = a.pseudo_adv.data_ptr<float>();
  at::parallel_for(0, a.B, row_grain(a.G), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * G, o1 = b * (G + 1);
      group_features_row(in + o, len.from(o), G, p, rank + o, sizes + o, pf + o1, ln + o, mino + o,
                         cag + o1, adm + o1, ps + o, adv + o, lanes);
    }
  });
  return feature_tuple(a);
}

}  // namespace

FeatureTuple group_features_cpu(const Tensor& ids, const Tensor& lengths, double max_len,
                                double cag_eps, bool cag_unbiased, double adv_eps,
                                bool adv_unbiased) {
  return features_rows(prepare_group_features(ids, lengths, max_len),
                       FeatureParams{max_len, cag_eps, adv_eps, cag_unbiased, adv_unbiased}, 1);
}

// The CUDA kernel's division of a row over the lanes of a warp, run lane by lane on one thread
// (group_features_row with lanes). Tests compare it with group_features bit for bit; only the
// clustering (cluster_row_warp's shuffles) differs from the kernel.
FeatureTuple group_features_lanes_cpu(const Tensor& ids, const Tensor& lengths, double max_len,
                                      double cag_eps, bool cag_unbiased, double adv_eps,
                                      bool adv_unbiased, int64_t lanes) {
  TORCH_CHECK(lanes >= 1 && lanes <= 1024, "care_ext._group_features_lanes: lanes must be in "
              "[1, 1024], got ", lanes);
  FeatureArgs a = prepare_group_features(ids, lengths, max_len);
  for (Tensor* t : {&a.rank, &a.sizes}) t->fill_(-7);  // what no lane writes stays visible
  for (Tensor* t : {&a.prompt_feat, &a.len_norm, &a.cag, &a.pseudo_rewards, &a.pseudo_adv}) {
    t->fill_(std::numeric_limits<float>::quiet_NaN());
  }
  for (Tensor* t : {&a.minority_mask, &a.admissible}) t->fill_(true);
  return features_rows(a, FeatureParams{max_len, cag_eps, adv_eps, cag_unbiased, adv_unbiased},
                       static_cast<int>(lanes));
}

}  // namespace care_ext
