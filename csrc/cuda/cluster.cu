// CUDA kernel: answer-cluster statistics (cluster_stats), one warp per prompt.
#include "common.cuh"

namespace care_ext {
namespace {

__global__ void cluster_stats_kernel(const int64_t* __restrict__ ids, int64_t* __restrict__ rank,
                                     int64_t* __restrict__ sizes, int64_t B, int G) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWarpRowsPerBlock) + (threadIdx.x >> 5);
  if (b >= B) return;  // uniform per warp
  cluster_row_warp(ids + b * G, G, threadIdx.x & 31, rank + b * G, sizes + b * G);
}

}  // namespace

std::tuple<Tensor, Tensor> cluster_stats_cuda(const Tensor& ids) {
  ClusterArgs a = prepare_cluster_stats(ids);
  if (a.B == 0) return {a.rank, a.sizes};
  const c10::cuda::CUDAGuard guard(a.ids.device());
  cluster_stats_kernel<<<warp_rows_to_blocks(a.B), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.ids.data_ptr<int64_t>(), a.rank.data_ptr<int64_t>(), a.sizes.data_ptr<int64_t>(), a.B,
      static_cast<int>(a.G));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.rank, a.sizes};
}

}  // namespace care_ext
