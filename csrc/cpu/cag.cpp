// CPU kernels: class-wise CAG and expected CAG.
#include "../care_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace care_ext {

std::tuple<Tensor, Tensor> classwise_cag_cpu(const Tensor& sizes, double eps, bool unbiased) {
  ClasswiseArgs a = prepare_classwise_cag(sizes);
  const int G = static_cast<int>(a.G);
  const int64_t* s = a.sizes.data_ptr<int64_t>();
  float* cag = a.cag.data_ptr<float>();
  bool* adm = a.admissible.data_ptr<bool>();
  at::parallel_for(0, a.B, row_grain(a.G), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      classwise_cag_row(s + b * G, G, eps, unbiased, cag + b * (G + 1), adm + b * (G + 1));
  });
  return {a.cag, a.admissible};
}

std::tuple<Tensor, Tensor> expected_cag_cpu(const Tensor& logits, const Tensor& cag,
                                            const Tensor& admissible) {
  ExpectedArgs a = prepare_expected_cag(logits, cag, admissible);
  const int C = static_cast<int>(a.C);
  AT_DISPATCH_FLOATING_TYPES(a.logits.scalar_type(), "care_ext.expected_cag", [&] {
    const scalar_t* lg = a.logits.data_ptr<scalar_t>();
    const scalar_t* cg = a.cag.data_ptr<scalar_t>();
    const bool* adm = a.admissible.data_ptr<bool>();
    scalar_t* probs = a.probs.data_ptr<scalar_t>();
    scalar_t* ecag = a.ecag.data_ptr<scalar_t>();
    at::parallel_for(0, a.B, row_grain(a.C), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        expected_cag_row(lg + b * C, cg + b * C, adm + b * C, C, probs + b * C, ecag + b);
    });
  });
  return {a.probs, a.ecag};
}

}  // namespace care_ext
