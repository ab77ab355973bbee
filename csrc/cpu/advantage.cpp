// CPU kernels: group advantage and CAG between two reward vectors.
#include "../care_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace care_ext {

Tensor group_advantage_cpu(const Tensor& rewards, double eps, bool unbiased) {
  AdvantageArgs a = prepare_group_advantage(rewards);
  const int G = static_cast<int>(a.G);
  AT_DISPATCH_FLOATING_TYPES(a.rewards.scalar_type(), "care_ext.group_advantage", [&] {
    const scalar_t* r = a.rewards.data_ptr<scalar_t>();
    scalar_t* out = a.out.data_ptr<scalar_t>();
    at::parallel_for(0, a.B, row_grain(a.G), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) advantage_row(r + b * G, G, eps, unbiased, out + b * G);
    });
  });
  return a.out;
}

Tensor cag_cpu(const Tensor& r_gt, const Tensor& r_ps, double eps, bool unbiased) {
  CagArgs a = prepare_cag(r_gt, r_ps);
  const int G = static_cast<int>(a.G);
  AT_DISPATCH_FLOATING_TYPES(a.r_gt.scalar_type(), "care_ext.cag", [&] {
    const scalar_t* gt = a.r_gt.data_ptr<scalar_t>();
    const scalar_t* ps = a.r_ps.data_ptr<scalar_t>();
    scalar_t* out = a.out.data_ptr<scalar_t>();
    at::parallel_for(0, a.B, row_grain(a.G), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        out[b] = static_cast<scalar_t>(cag_row(gt + b * G, ps + b * G, G, eps, unbiased));
    });
  });
  return a.out;
}

}  // namespace care_ext
