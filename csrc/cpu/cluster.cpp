// CPU kernel: answer-cluster statistics (cluster_stats).
#include "../care_ext.h"

#include <ATen/Parallel.h>

namespace care_ext {

std::tuple<Tensor, Tensor> cluster_stats_cpu(const Tensor& ids) {
  ClusterArgs a = prepare_cluster_stats(ids);
  const int64_t* in = a.ids.data_ptr<int64_t>();
  int64_t* rank = a.rank.data_ptr<int64_t>();
  int64_t* sizes = a.sizes.data_ptr<int64_t>();
  const int G = static_cast<int>(a.G);
  at::parallel_for(0, a.B, row_grain(a.G), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) cluster_row(in + b * G, G, rank + b * G, sizes + b * G);
  });
  return {a.rank, a.sizes};
}

}  // namespace care_ext
