// CUDA kernel: per-prompt features of the acquisition step (group_features): one warp per prompt
// clusters the row cooperatively, then derives the O(G) rest with its elements spread over the
// lanes (group_math.h's features_per_response / features_per_class; at G = 64 one lane alone ran
// ~200 FP64 divisions and square roots per prompt back to back).
#include "common.cuh"

namespace care_ext {
namespace {

struct FeaturePtrs {
  const int64_t* ids;
  Lengths lengths;
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
  cluster_row_warp(p.ids + o, G, lane, p.rank + o, p.sizes + o);  // visible to the warp on return
  const FeatureRow r{p.rank + o,       p.sizes + o,   p.lengths.from(o), p.prompt_feat + o1,
                     p.len_norm + o,   p.minority + o, p.cag + o1,       p.admissible + o1,
                     p.pseudo + o,     p.adv + o};
  features_per_response(r, G, fp, lane, 32);
  __syncwarp();  // phase 2 reads the other lanes' pseudo rewards and cleared class entries
  features_per_class(r, G, fp, lane, 32);
}

}  // namespace

FeatureTuple group_features_cuda(const Tensor& ids, const Tensor& lengths, double max_len,
                                 double cag_eps, bool cag_unbiased, double adv_eps,
                                 bool adv_unbiased) {
  FeatureArgs a = prepare_group_features(ids, lengths, max_len);
  if (a.B == 0) return feature_tuple(a);
  const c10::cuda::CUDAGuard guard(a.ids.device());
  const FeaturePtrs p{a.ids.data_ptr<int64_t>(),       a.lengths_view(),
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
