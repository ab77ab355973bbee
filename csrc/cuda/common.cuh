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

}  // namespace care_ext
