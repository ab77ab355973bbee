// CPU kernel of care_ext::_copy_into: each contiguous pair as one memcpy, split into chunks of at
// least kGrain bytes over torch's intra-op threads; any other pair through dst.copy_(src).
#include "../care_ext.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace care_ext {
namespace {
constexpr int64_t kGrain = int64_t{1} << 20;  // bytes per chunk of a parallel memcpy
}  // namespace

void copy_into_cpu(at::TensorList dst, at::TensorList src) {
  for (const CopyPair& p : prepare_copy_into(dst, src)) {
    if (!p.flat) {
      p.dst.copy_(p.src);
      continue;
    }
    char* d = static_cast<char*>(p.dst.data_ptr());
    const char* s = static_cast<const char*>(p.src.const_data_ptr());
    at::parallel_for(0, p.bytes, kGrain, [&](int64_t begin, int64_t end) {
      std::memcpy(d + begin, s + begin, static_cast<size_t>(end - begin));
    });
  }
}

}  // namespace care_ext
