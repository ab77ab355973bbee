// Launch helpers shared by the CUDA kernels. Lean headers only: c10/cuda, never ATen/cuda/CUDAContext.h
// (the CPU build machine's toolkit lacks the cuBLAS/cuSPARSE headers it pulls in).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../care_ext.h"

namespace care_ext {

// One thread per prompt row: the per-row math of group_math.h is O(G^2) with G <= 64.
constexpr int kRowThreads = 128;

inline unsigned rows_to_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kRowThreads - 1) / kRowThreads);
}

// One warp per prompt row for the O(G^2) clustering: 4 rows per 128-thread block.
constexpr int kWarpRowsPerBlock = kRowThreads / 32;

inline unsigned warp_rows_to_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock);
}

// The warp-cooperative twin of cluster_row (group_math.h), same semantics, O(G) per lane instead
// of O(G^2) per thread and no per-thread scratch arrays: lane l owns responses l and l + 32
// (G <= 64). The whole warp must call it (shuffles use the full mask). Writes rank[0..G) and
// sizes[0..G) to global memory; they are visible to the warp after the final __syncwarp.
__device__ __forceinline__ void cluster_row_warp(const int64_t* ids, int G, int lane, int64_t* rank,
                                                 int64_t* sizes) {
  constexpr unsigned kFull = 0xffffffffu;
  int64_t id[2];
  int first[2], cnt[2], crank[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = lane + 32 * h;
    id[h] = i < G ? ids[i] : -1;
    first[h] = -1;
    cnt[h] = 0;
    crank[h] = 0;
  }
  // first occurrence and cluster size of each own response (every member counts its cluster)
  for (int j = 0; j < G; ++j) {
    const int64_t idj = __shfl_sync(kFull, j < 32 ? id[0] : id[1], j & 31);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (id[h] >= 0 && idj == id[h]) {
        cnt[h] += 1;
        if (first[h] < 0) first[h] = j;
      }
    }
  }
  // rank of each representative (its own index == its first occurrence)
  for (int q = 0; q < G; ++q) {
    const int cq = __shfl_sync(kFull, q < 32 ? cnt[0] : cnt[1], q & 31);
    const int fq = __shfl_sync(kFull, q < 32 ? first[0] : first[1], q & 31);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = lane + 32 * h;
      if (first[h] == i && fq == q && q != i && (cq > cnt[h] || (cq == cnt[h] && q < i)))
        crank[h] += 1;
    }
  }
  // every response takes the rank of its cluster's representative
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int f = first[h];
    const int src = f < 0 ? 0 : (f & 31);
    const int v0 = __shfl_sync(kFull, crank[0], src);
    const int v1 = __shfl_sync(kFull, crank[1], src);
    const int i = lane + 32 * h;
    if (i < G) {
      rank[i] = f < 0 ? -1 : (f < 32 ? v0 : v1);
      sizes[i] = 0;
    }
  }
  __syncwarp();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = lane + 32 * h;
    if (i < G && first[h] == i) sizes[crank[h]] = cnt[h];
  }
  __syncwarp();
}

}  // namespace care_ext
