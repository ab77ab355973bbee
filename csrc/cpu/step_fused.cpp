// CPU backend of the private fused step: the per-prompt tail of step_tail.h on one thread per
// prompt (tid 0, nth 1, no barriers), prompts in parallel. It exists so that the arithmetic of the
// CUDA kernel (the same header) is tested on every machine; the public acquisition_step on the CPU
// uses the blocked MKL path (rollout_pool.cpp), which is faster there.
#include "../classifier_parts.h"

#include <ATen/Parallel.h>

#include <vector>

namespace care_ext {
namespace {

struct NoSync {
  void operator()() const {}
};

}  // namespace

StepTuple acquisition_step_fused_split_cpu(const Tensor& ids, const Tensor& lengths,
                                           const Tensor& h_prompt, const Tensor& h_resp,
                                           at::TensorList stage1, at::TensorList stage2,
                                           double max_len, double cag_eps, bool cag_unbiased,
                                           double adv_eps, bool adv_unbiased,
                                           at::TensorList first_layer_split) {
  const FusedStep f = prepare_fused_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                         cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                         first_layer_split);
  const int64_t scratch = step_tail_scratch_floats(f.args);
  at::parallel_for(0, f.B, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(scratch));
    for (int64_t b = b0; b < b1; ++b) {
      for (int stage = 0; stage < 2; ++stage) {  // the CUDA kernel's two blocks per prompt
        step_tail(f.args, b, stage, buf.data(), 0, 1, NoSync{});
      }
    }
  });
  return f.outputs();
}

}  // namespace care_ext
