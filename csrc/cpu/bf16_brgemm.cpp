// CPU: the split first layers' bf16 GEMMs on weights packed once per classifier update
// (care_ext::_pack_bf16_split), run by oneDNN's BRGeMM microkernel on AMX (torch's
// at::native::cpublas::brgemm, the kernel of torch's CPU flash attention).
//
// MKL's cblas_gemm_bf16bf16f32 (cpu/bf16_gemm.cpp) has no exported packing API, so every call
// re-packs the whole weight into the VNNI layout the AMX tiles read: measured on one core of a
// 2-core AMX Xeon, ~210 us per call for the rollout branch's [4096, 384] pieces, 250 us of a
// 32-row call's 300 us (bench/RESULTS.md, tenth session). The step calls it once per block of
// rows and once for the prompts, so on many threads (small blocks) packing is most of the first
// layers' time. Here the pieces are packed when the classifiers change and every block multiplies
// in place: [32, 4096] x [4096, 384] in 153 against 323 us, [64, 4096] x [4096, 768] (the
// prompts) in 442 against 788 us, [256, 4096] x [4096, 384] in 814 against 899 us (one thread).
//
// The packed layout (oneDNN's "pack32" for bf16, the layout of cpublas::pack): the N = T * R
// pieces' rows in blocks of kPackCols; block j (nb rows, ld = nb rounded up to 16) holds
// B[k][n] = piece row (n0 + n), column k, at element (k / 2) * 2 * ld + 2 * n + (k % 2), columns
// n >= nb zero; blocks follow each other, block j at sum_{i<j} K * ld_i. K = H must be even.
// Packing is a 32-bit transposition (pairs of bf16 along K), written here rather than through
// cpublas::pack, which wants [K, N] input: the transposed copy alone cost 1.1 ms for the rollout
// pieces. cpu_brgemm_available() checks once, against cpublas::pack on a probe, that the layout
// is still the one this file writes; if oneDNN ever changes it, the packed path turns itself off.
#include "../classifier_parts.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace care_ext {
namespace {

constexpr int64_t kPackCols = 64;   // cpublas::pack packs at most 64 columns per call
constexpr int64_t kPanelRows = 128; // rows whose A panel (1 MB at K = 4096) stays in L2 while
                                    // every column block streams past it
constexpr int64_t kTileRows = 64;   // rows per brgemm call (64 and 128 measured alike)

int64_t block_ld(int64_t nb) { return (nb + 15) / 16 * 16; }

// Writes the packed layout of w's rows [n0, n0 + nb) (bf16 [N, K], unit column stride, row
// stride ldw) into out (K * block_ld(nb) elements).
void pack_block(const uint16_t* w, int64_t ldw, int64_t n0, int64_t nb, int64_t K, uint16_t* out) {
  const int64_t ld = block_ld(nb), pairs = K / 2;
  auto* o = reinterpret_cast<uint32_t*>(out);  // one uint32 = the pair (k, k + 1) of a column
  constexpr int64_t kChunk = 64;               // pairs per pass: 64 rows x 256 B of input in L1
  for (int64_t p0 = 0; p0 < pairs; p0 += kChunk) {
    const int64_t p1 = std::min(pairs, p0 + kChunk);
    for (int64_t n = 0; n < nb; ++n) {
      const uint16_t* row = w + (n0 + n) * ldw;
      for (int64_t p = p0; p < p1; ++p) {
        uint32_t v;
        std::memcpy(&v, row + 2 * p, sizeof v);
        o[p * ld + n] = v;
      }
    }
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t n = nb; n < ld; ++n) o[p * ld + n] = 0;
    }
  }
}

// Whether oneDNN's packing of a probe equals pack_block's (the layout this file assumes).
bool layout_matches() {
  constexpr int64_t K = 64, N = 40;
  std::vector<uint16_t> w(static_cast<size_t>(N * K)), wt(static_cast<size_t>(K * N));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t v = static_cast<uint16_t>(0x3F80u + ((n * 131 + k * 7) & 0x7F));  // 1.0..2.0
      w[static_cast<size_t>(n * K + k)] = v;
      wt[static_cast<size_t>(k * N + n)] = v;
    }
  }
  const int64_t ld = block_ld(N);
  std::vector<uint16_t> ours(static_cast<size_t>(K * ld)), theirs(static_cast<size_t>(K * ld), 0);
  pack_block(w.data(), K, 0, N, K, ours.data());
  at::native::cpublas::pack(K, N, N, ld, at::kBFloat16, at::kBFloat16, wt.data(), theirs.data());
  return ours == theirs;
}

}  // namespace

bool cpu_brgemm_available() {
  static const bool available = [] {
    // CARE_EXT_CPU_BRGEMM (read once): unset or "1" (the default) uses the packed path where the
    // CPU has it; "0" turns it off (MKL's GEMM with its per-call packing; A/B measurements)
    if (env_switch("CARE_EXT_CPU_BRGEMM", "1", "0")) return false;
    return at::native::cpublas::could_pack(at::kBFloat16) && layout_matches();
  }();
  return available;
}

bool cpu_brgemm_enabled() {
  // torch's BRGeMM checks torch.backends.mkldnn.enabled at every call (and refuses VNNI input
  // when it is off), so the step asks too, each time, and runs MKL on the plain pieces then
  return cpu_brgemm_available() && at::globalContext().userEnabledMkldnn();
}

int64_t packed_bf16_numel(int64_t N, int64_t K) {
  int64_t total = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kPackCols) total += K * block_ld(std::min(kPackCols, N - n0));
  return total;
}

void pack_bf16_split_cpu(const Tensor& split, const Tensor& out) {
  const char* op = "care_ext._pack_bf16_split";
  TORCH_CHECK(split.device().is_cpu() && out.device().is_cpu(), op, ": CPU tensors only, got ",
              split.device(), " and ", out.device());
  TORCH_CHECK(split.scalar_type() == at::kBFloat16 && split.dim() == 3, op,
              ": split must be bfloat16 [T, R, H] (care_ext.bf16_split.first_layer_split), got ",
              split.scalar_type(), " ", split.sizes());
  const int64_t N = split.size(0) * split.size(1), K = split.size(2);
  TORCH_CHECK(K % 2 == 0 && K > 0, op, ": H must be even and positive (bf16 pairs), got ", K);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 1 && out.is_contiguous() &&
                  out.numel() == packed_bf16_numel(N, K),
              op, ": out must be a contiguous bfloat16 [", packed_bf16_numel(N, K),
              "] tensor (care_ext.bf16_split.packed_numel), got ", out.scalar_type(), " ",
              out.sizes());
  TORCH_CHECK(cpu_brgemm_available(), op, ": this CPU or torch has no AMX bf16 BRGeMM "
              "(care_ext.bf16_split.cpu_brgemm_available() is False)");
  Tensor w = split.reshape({N, K});
  if (w.stride(1) != 1) w = w.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const int64_t blocks = (N + kPackCols - 1) / kPackCols;
  at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = j * kPackCols;
      pack_block(src, w.stride(0), n0, std::min(kPackCols, N - n0), K,
                 dst + packed_bf16_numel(n0, K));
    }
  });
}

int64_t packed_block_cols() { return kPackCols; }

void bf16_products_packed_into(const at::BFloat16* a, int64_t M, int64_t lda,
                               const at::BFloat16* packed, int64_t N, int64_t K, float* c,
                               int64_t ldc, const std::vector<int64_t>* only) {
  TORCH_INTERNAL_ASSERT(K % 2 == 0 && lda >= K && ldc >= N);
  const int64_t panels = (M + kPanelRows - 1) / kPanelRows;
  const int64_t blocks = only != nullptr ? static_cast<int64_t>(only->size())
                                         : (N + kPackCols - 1) / kPackCols;
  if (M == 0 || N == 0 || blocks == 0) return;
  // Tasks: a row panel times a column block. Inside a parallel region (a block of rollouts, one
  // task of rollout_pools_cpu) at::parallel_for runs them in order on this thread: panel by
  // panel, every column block over the panel's rows, which stay in L2; outside one (the prompts)
  // they spread over the intra-op threads.
  at::parallel_for(0, panels * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / blocks) * kPanelRows, m1 = std::min(M, m0 + kPanelRows);
      const int64_t j = only != nullptr ? (*only)[static_cast<size_t>(t % blocks)] : t % blocks;
      const int64_t n0 = j * kPackCols, nb = std::min(kPackCols, N - n0);
      const at::BFloat16* b = packed + packed_bf16_numel(n0, K);
      for (int64_t r = m0; r < m1; r += kTileRows) {
        at::native::cpublas::brgemm(std::min(kTileRows, m1 - r), nb, K, lda, block_ld(nb), ldc,
                                    /*add_C=*/false, a + r * lda, b, c + r * ldc + n0,
                                    /*is_vnni=*/true);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // this thread's AMX tile state
  });
}

Tensor bf16_products_packed(const Tensor& a, const Tensor& packed, int64_t N) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && a.scalar_type() == at::kBFloat16 && a.device().is_cpu() &&
                        packed.numel() == packed_bf16_numel(N, a.size(1)));
  const Tensor A = a.stride(1) == 1 && a.stride(0) >= a.size(1) ? a : a.contiguous();
  Tensor c = at::empty({A.size(0), N}, A.options().dtype(at::kFloat));
  bf16_products_packed_into(A.const_data_ptr<at::BFloat16>(), A.size(0), A.stride(0),
                            packed.const_data_ptr<at::BFloat16>(), N, A.size(1),
                            c.data_ptr<float>(), N);
  return c;
}

}  // namespace care_ext
