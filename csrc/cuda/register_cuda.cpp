// CUDA kernel registrations (compiled only when care_ext is built with CUDA). The schemas are in
// csrc/registration.cpp; classifier_forward and acquisition_step are device-generic composites.
#include "../care_ext.h"

#include <torch/library.h>

namespace care_ext {

TORCH_LIBRARY_IMPL(care_ext, CUDA, m) {
  m.impl("cluster_stats", &cluster_stats_cuda);
  m.impl("group_advantage", &group_advantage_cuda);
  m.impl("cag", &cag_cuda);
  m.impl("classwise_cag", &classwise_cag_cuda);
  m.impl("expected_cag", &expected_cag_cuda);
  m.impl("group_features", &group_features_cuda);
  m.impl("_acquisition_step_fused", &without_split<acquisition_step_fused_split_cuda>);
  m.impl("_acquisition_step_fused_split", &acquisition_step_fused_split_cuda);
  m.impl("_copy_into", &copy_into_cuda);
}

}  // namespace care_ext
