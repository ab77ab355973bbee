// CUDA kernel: per-prompt features of the acquisition step (group_features): one warp per prompt
// clusters the row cooperatively, then its lane 0 derives the O(G) rest.
#include "common.cuh"

namespace care_ext {
namespace {

struct FeaturePtrs {
  const int64_t* ids;
  const float* lengths;
  int64_t* rank;
  int64_t* sizes;
  float* prompt_feat;
  float* len_norm;
  bool* minority;
  float* cag;
  bool* admissible;
  float* pseudo;
  float* adv;
};

__global__ void group_features_kernel(FeaturePtrs p, int64_t B, int G, FeatureParams fp) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWarpRowsPerBlock) + (threadIdx.x >> 5);
  if (b >= B) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int64_t o = b * G, o1 = b * (G + 1);
  cluster_row_warp(p.ids + o, G, lane, p.rank + o, p.sizes + o);
  if (lane != 0) return;
  group_features_from_clusters(p.rank + o, p.sizes + o, p.lengths + o, G, fp, p.prompt_feat + o1,
                               p.len_norm + o, p.minority + o, p.cag + o1, p.admissible + o1,
                               p.pseudo + o, p.adv + o);
}

}  // namespace

FeatureTuple group_features_cuda(const Tensor& ids, const Tensor& lengths, double max_len,
                                 double cag_eps, bool cag_unbiased, double adv_eps,
                                 bool adv_unbiased) {
  FeatureArgs a = prepare_group_features(ids, lengths, max_len);
  if (a.B == 0) return feature_tuple(a);
  const c10::cuda::CUDAGuard guard(a.ids.device());
  const FeaturePtrs p{a.ids.data_ptr<int64_t>(),       a.lengths.data_ptr<float>(),
                      a.rank.data_ptr<int64_t>(),      a.sizes.data_ptr<int64_t>(),
                      a.prompt_feat.data_ptr<float>(), a.len_norm.data_ptr<float>(),
                      a.minority_mask.data_ptr<bool>(), a.cag.data_ptr<float>(),
                      a.admissible.data_ptr<bool>(),   a.pseudo_rewards.data_ptr<float>(),
                      a.pseudo_adv.data_ptr<float>()};
  const FeatureParams fp{max_len, cag_eps, adv_eps, cag_unbiased, adv_unbiased};
  group_features_kernel<<<warp_rows_to_blocks(a.B), kRowThreads, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(p, a.B, static_cast<int>(a.G), fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return feature_tuple(a);
}

}  // namespace care_ext
