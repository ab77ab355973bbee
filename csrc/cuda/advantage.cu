// CUDA kernels: group advantage and CAG, one thread per prompt.
#include "common.cuh"

#include <ATen/Dispatch.h>

namespace care_ext {
namespace {

template <typename T>
__global__ void group_advantage_kernel(const T* __restrict__ r, T* __restrict__ out, int64_t B,
                                       int G, double eps, bool unbiased) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  advantage_row(r + b * G, G, eps, unbiased, out + b * G);
}

template <typename T>
__global__ void cag_kernel(const T* __restrict__ gt, const T* __restrict__ ps, T* __restrict__ out,
                           int64_t B, int G, double eps, bool unbiased) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  out[b] = static_cast<T>(cag_row(gt + b * G, ps + b * G, G, eps, unbiased));
}

}  // namespace

Tensor group_advantage_cuda(const Tensor& rewards, double eps, bool unbiased) {
  AdvantageArgs a = prepare_group_advantage(rewards);
  if (a.B == 0) return a.out;
  const c10::cuda::CUDAGuard guard(a.rewards.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.rewards.scalar_type(), "care_ext.group_advantage", [&] {
    group_advantage_kernel<scalar_t><<<rows_to_blocks(a.B), kRowThreads, 0, stream>>>(
        a.rewards.data_ptr<scalar_t>(), a.out.data_ptr<scalar_t>(), a.B, static_cast<int>(a.G), eps,
        unbiased);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

Tensor cag_cuda(const Tensor& r_gt, const Tensor& r_ps, double eps, bool unbiased) {
  CagArgs a = prepare_cag(r_gt, r_ps);
  if (a.B == 0) return a.out;
  const c10::cuda::CUDAGuard guard(a.r_gt.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.r_gt.scalar_type(), "care_ext.cag", [&] {
    cag_kernel<scalar_t><<<rows_to_blocks(a.B), kRowThreads, 0, stream>>>(
        a.r_gt.data_ptr<scalar_t>(), a.r_ps.data_ptr<scalar_t>(), a.out.data_ptr<scalar_t>(), a.B,
        static_cast<int>(a.G), eps, unbiased);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

}  // namespace care_ext
