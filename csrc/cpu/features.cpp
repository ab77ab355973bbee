// CPU kernel: per-prompt features of the acquisition step (group_features).
#include "../care_ext.h"

#include <ATen/Parallel.h>

namespace care_ext {

FeatureTuple group_features_cpu(const Tensor& ids, const Tensor& lengths, double max_len,
                                double cag_eps, bool cag_unbiased, double adv_eps,
                                bool adv_unbiased) {
  FeatureArgs a = prepare_group_features(ids, lengths, max_len);
  const int G = static_cast<int>(a.G);
  const FeatureParams p{max_len, cag_eps, adv_eps, cag_unbiased, adv_unbiased};
  const int64_t* in = a.ids.data_ptr<int64_t>();
  const float* len = a.lengths.data_ptr<float>();
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
      group_features_row(in + o, len + o, G, p, rank + o, sizes + o, pf + o1, ln + o, mino + o,
                         cag + o1, adm + o1, ps + o, adv + o);
    }
  });
  return feature_tuple(a);
}

}  // namespace care_ext
