// CUDA kernel of care_ext::_copy_into: up to kCopySegments contiguous (dst, src) pairs in one
// launch. StepGraph (care_ext/step_graph.py) copies each call's inputs (ids, lengths and both
// hidden states: four tensors of three dtypes) into its graph's buffers with it; torch's
// _foreach_copy_ takes its one-launch path only for tensors of one dtype and otherwise copies
// tensor by tensor, one dispatch and one launch each.
#include "common.cuh"

#include <algorithm>
#include <cstdint>

namespace care_ext {
namespace {

constexpr int kCopySegments = 8;  // pairs per launch (the kernel's argument holds their pointers)
constexpr int kCopyThreads = 256;
constexpr int64_t kCopyUnit = 16;  // bytes a thread moves at once: one uint4 where aligned

struct CopySegments {
  const char* src[kCopySegments];
  char* dst[kCopySegments];
  int64_t bytes[kCopySegments];
  int64_t first[kCopySegments + 1];  // segment k's units are first[k] .. first[k + 1] - 1
  int n;
};

// Unit u of the launch (16 bytes of one segment; the segment's last unit may be shorter): one
// uint4 load and store where both addresses are 16-byte aligned and the unit is whole, else byte
// by byte. The segments are found by a scan over at most kCopySegments prefix sums.
__global__ void __launch_bounds__(kCopyThreads) copy_segments_kernel(CopySegments s) {
  const int64_t total = s.first[s.n];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < total;
       u += stride) {
    int k = 0;
    while (k + 1 < s.n && u >= s.first[k + 1]) ++k;
    const int64_t off = (u - s.first[k]) * kCopyUnit;
    const char* src = s.src[k] + off;
    char* dst = s.dst[k] + off;
    const int64_t len = s.bytes[k] - off < kCopyUnit ? s.bytes[k] - off : kCopyUnit;
    if (len == kCopyUnit && ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) &
                             (kCopyUnit - 1)) == 0) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
      for (int64_t b = 0; b < len; ++b) dst[b] = src[b];
    }
  }
}

void launch(CopySegments& s, cudaStream_t stream) {
  s.first[0] = 0;
  for (int k = 0; k < s.n; ++k) s.first[k + 1] = s.first[k] + (s.bytes[k] + kCopyUnit - 1) / kCopyUnit;
  const int64_t units = s.first[s.n];
  if (units == 0) return;
  // enough blocks to cover the units once, at most 1024 (a grid-stride loop does the rest)
  const int64_t blocks = std::min<int64_t>((units + kCopyThreads - 1) / kCopyThreads, 1024);
  copy_segments_kernel<<<static_cast<unsigned>(blocks), kCopyThreads, 0, stream>>>(s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void copy_into_cuda(at::TensorList dst, at::TensorList src) {
  const std::vector<CopyPair> pairs = prepare_copy_into(dst, src);
  if (pairs.empty()) return;
  const c10::cuda::CUDAGuard guard(pairs[0].dst.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CopySegments s{};
  for (const CopyPair& p : pairs) {
    if (!p.flat) {  // a strided src: torch's copy (its own launch)
      p.dst.copy_(p.src);
      continue;
    }
    s.src[s.n] = static_cast<const char*>(p.src.const_data_ptr());
    s.dst[s.n] = static_cast<char*>(p.dst.data_ptr());
    s.bytes[s.n] = p.bytes;
    if (++s.n == kCopySegments) {
      launch(s, stream);
      s = CopySegments{};
    }
  }
  if (s.n > 0) launch(s, stream);
}

}  // namespace care_ext
