// CUDA kernels: class-wise CAG and expected CAG, one thread per prompt.
#include "common.cuh"

#include <ATen/Dispatch.h>

namespace care_ext {
namespace {

__global__ void classwise_cag_kernel(const int64_t* __restrict__ sizes, float* __restrict__ cag,
                                     bool* __restrict__ adm, int64_t B, int G, double eps,
                                     bool unbiased) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  classwise_cag_row(sizes + b * G, G, eps, unbiased, cag + b * (G + 1), adm + b * (G + 1));
}

template <typename T>
__global__ void expected_cag_kernel(const T* __restrict__ logits, const T* __restrict__ cag,
                                    const bool* __restrict__ adm, T* __restrict__ probs,
                                    T* __restrict__ ecag, int64_t B, int C) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  expected_cag_row(logits + b * C, cag + b * C, adm + b * C, C, probs + b * C, ecag + b);
}

}  // namespace

std::tuple<Tensor, Tensor> classwise_cag_cuda(const Tensor& sizes, double eps, bool unbiased) {
  ClasswiseArgs a = prepare_classwise_cag(sizes);
  if (a.B == 0) return {a.cag, a.admissible};
  const c10::cuda::CUDAGuard guard(a.sizes.device());
  classwise_cag_kernel<<<rows_to_blocks(a.B), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.sizes.data_ptr<int64_t>(), a.cag.data_ptr<float>(), a.admissible.data_ptr<bool>(), a.B,
      static_cast<int>(a.G), eps, unbiased);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.cag, a.admissible};
}

std::tuple<Tensor, Tensor> expected_cag_cuda(const Tensor& logits, const Tensor& cag,
                                             const Tensor& admissible) {
  ExpectedArgs a = prepare_expected_cag(logits, cag, admissible);
  if (a.B == 0) return {a.probs, a.ecag};
  const c10::cuda::CUDAGuard guard(a.logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "care_ext.expected_cag", [&] {
    expected_cag_kernel<scalar_t><<<rows_to_blocks(a.B), kRowThreads, 0, stream>>>(
        a.logits.data_ptr<scalar_t>(), a.cag.data_ptr<scalar_t>(), a.admissible.data_ptr<bool>(),
        a.probs.data_ptr<scalar_t>(), a.ecag.data_ptr<scalar_t>(), a.B, static_cast<int>(a.C));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a.probs, a.ecag};
}

}  // namespace care_ext
