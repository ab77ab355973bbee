// CUDA backend of the private fused step: after the host part (group_features kernel + four cuBLAS
// GEMMs, step_fused.cpp), one kernel runs the whole per-prompt tail of step_tail.h, one block of
// kTailThreads threads per prompt and classifier (blockIdx.y: 0 = Stage-I, 1 = Stage-II), its
// scratch in dynamic shared memory.
#include "common.cuh"

#include "../classifier_parts.h"

namespace care_ext {
namespace {

constexpr int kTailThreads = 256;
constexpr int64_t kMaxTailSmem = 48 * 1024;  // default dynamic shared-memory limit per block

struct BlockSync {
  CARE_HD void operator()() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

__global__ void __launch_bounds__(kTailThreads) step_tail_kernel(StepTailArgs a) {
  extern __shared__ __align__(16) float scratch[];  // head_scratch places doubles 8-byte aligned
  step_tail(a, static_cast<int64_t>(blockIdx.x), static_cast<int>(blockIdx.y), scratch,
            static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), BlockSync{});
}

}  // namespace

StepTuple acquisition_step_fused_split_cuda(const Tensor& ids, const Tensor& lengths,
                                            const Tensor& h_prompt, const Tensor& h_resp,
                                            at::TensorList stage1, at::TensorList stage2,
                                            double max_len, double cag_eps, bool cag_unbiased,
                                            double adv_eps, bool adv_unbiased,
                                            at::TensorList first_layer_split) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const FusedStep f = prepare_fused_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                         cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                         first_layer_split);
  if (f.B == 0) return f.outputs();
  const int64_t smem = step_tail_scratch_floats(f.args) * static_cast<int64_t>(sizeof(float));
  const char* op = fused_step_op_name(first_layer_split);
  TORCH_CHECK(smem <= kMaxTailSmem, "care_ext.", op, ": the classifiers need ", smem,
              " bytes of per-block scratch (G * R1 + G + ", kL2Rows + 1,
              " * R2 + P + K + 3 * C + 1 floats: head_scratch_floats), more than the ",
              kMaxTailSmem, " bytes of shared memory this kernel uses; use acquisition_step");
  TORCH_CHECK(f.B <= 2147483647LL, "care_ext.", op, ": B = ", f.B, " is too large");
  const dim3 grid(static_cast<unsigned>(f.B), 2);  // one block per prompt and stage
  step_tail_kernel<<<grid, kTailThreads, static_cast<size_t>(smem),
                     c10::cuda::getCurrentCUDAStream()>>>(f.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return f.outputs();
}

}  // namespace care_ext
