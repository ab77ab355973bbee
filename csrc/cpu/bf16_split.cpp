// CPU: a float32 matrix as `terms` bfloat16 pieces, written into a caller's buffer in one pass
// (care_ext::_split_bf16; the pure-torch twin is care_ext.reference.split_bf16).
//
// The CARE core re-splits both stages' first layers after every classifier update (384 x 4096
// floats at H = 4096). As torch ops that is a clone, a finiteness reduction, `terms` converting
// copies and terms - 1 mixed-dtype subtractions, each a pass over memory; here every element is
// read once and its pieces written once, straight from a strided view of the folded weight (its
// hidden columns) into a slice of the stacked output, so the caller needs no concatenation.
// Rounding is c10::BFloat16's round to nearest even, the rounding of torch's float32 -> bfloat16
// copy, and each remainder is the same float32 subtraction: the pieces equal the reference's bit
// for bit.
#include "../care_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace care_ext {
namespace {

// c10::detail::round_to_nearest_even without its NaN branch (a NaN weight fails the op anyway),
// so that the loops below vectorise; equal to it, and to torch's float32 -> bfloat16 copy, for
// every non-NaN float (infinities included).
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

}  // namespace

void split_bf16_cpu(const Tensor& w, int64_t terms, const Tensor& out) {
  TORCH_CHECK(w.device().is_cpu() && out.device().is_cpu(),
              "care_ext._split_bf16: CPU tensors only, got ", w.device(), " and ", out.device());
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat,
              "care_ext._split_bf16: w must be float32 [R, H], got ", w.scalar_type(), " ",
              w.sizes());
  TORCH_CHECK(terms >= 1 && terms <= 3, "care_ext._split_bf16: terms must be 1, 2 or 3, got ",
              terms);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 3 && out.size(0) == terms &&
                  out.size(1) == w.size(0) && out.size(2) == w.size(1),
              "care_ext._split_bf16: out must be bfloat16 [terms, R, H] = [", terms, ", ",
              w.size(0), ", ", w.size(1), "], got ", out.scalar_type(), " ", out.sizes());
  const int64_t R = w.size(0), H = w.size(1);
  const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const float* src = w.const_data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  std::atomic<bool> finite{true};
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)),
                   [&](int64_t r0, int64_t r1) {
    // one row's float32 remainder, and its piece where out's rows are strided
    std::vector<float> rest(static_cast<size_t>(H));
    std::vector<uint16_t> piece(os2 == 1 ? 0 : static_cast<size_t>(H));
    float* x = rest.data();
    uint32_t exp_all_ones = 0;  // non-zero iff some weight has an all-ones exponent (NaN, Inf)
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = src + r * ws0;
      if (ws1 == 1) {
        std::memcpy(x, s, static_cast<size_t>(H) * sizeof(float));
      } else {
        for (int64_t h = 0; h < H; ++h) x[h] = s[h * ws1];
      }
      for (int64_t t = 0; t < terms; ++t) {
        uint16_t* d = os2 == 1 ? dst + t * os0 + r * os1 : piece.data();
        for (int64_t h = 0; h < H; ++h) {  // plain loops over contiguous rows: vectorised
          d[h] = bf16_bits(x[h]);
          x[h] -= bf16_value(d[h]);  // exact: what the piece left
        }
        if (os2 != 1) {
          uint16_t* o = dst + t * os0 + r * os1;
          for (int64_t h = 0; h < H; ++h) o[h * os2] = d[h];
        }
      }
      // what the pieces leave is finite iff the weight is and no piece rounded to infinity
      for (int64_t h = 0; h < H; ++h) {
        uint32_t u;
        std::memcpy(&u, x + h, sizeof u);
        exp_all_ones |= static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
      }
    }
    if (exp_all_ones != 0) finite.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(finite.load(), "split_bf16: the weights hold NaN or Inf, or values beyond "
                    "bfloat16's range (|w| >= ~3.3962e38, whose first piece rounds to infinity)");
}

}  // namespace care_ext
