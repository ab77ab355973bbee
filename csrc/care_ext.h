// care_ext: declarations shared by the registration file and the CPU / CUDA kernels.
//
// Every op validates its arguments in one device-agnostic "prepare" function (op_contracts.cpp),
// which checks ranks, dtypes, devices and G, makes inputs contiguous and allocates the outputs.
// The CPU and CUDA kernels then only loop over rows with the shared math of group_math.h.
#pragma once

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <vector>

#include "group_math.h"

namespace care_ext {

using at::Tensor;

// ---- contracts (op_contracts.cpp) ---------------------------------------------------------------
struct ClusterArgs {
  Tensor ids;  // int64 [B, G], contiguous
  Tensor rank, sizes;
  int64_t B, G;
};
ClusterArgs prepare_cluster_stats(const Tensor& ids);

struct AdvantageArgs {
  Tensor rewards, out;  // [B, G] float32|float64, contiguous; out same dtype
  int64_t B, G;
};
AdvantageArgs prepare_group_advantage(const Tensor& rewards);

struct CagArgs {
  Tensor r_gt, r_ps, out;  // [B, G] same floating dtype; out [B]
  int64_t B, G;
};
CagArgs prepare_cag(const Tensor& r_gt, const Tensor& r_ps);

struct ClasswiseArgs {
  Tensor sizes;            // int64 [B, G]
  Tensor cag, admissible;  // float32 [B, G+1], bool [B, G+1]
  int64_t B, G;
};
ClasswiseArgs prepare_classwise_cag(const Tensor& sizes);

struct ExpectedArgs {
  Tensor logits, cag, admissible;  // [B, C] float32|float64 (same), bool
  Tensor probs, ecag;
  int64_t B, C;
};
ExpectedArgs prepare_expected_cag(const Tensor& logits, const Tensor& cag, const Tensor& admissible);

struct FeatureArgs {
  Tensor ids, lengths;  // int64 [B, G]; [B, G] float32, float64, int64 or int32, contiguous
  Tensor rank, sizes, prompt_feat, len_norm, minority_mask, cag, admissible, pseudo_rewards,
      pseudo_adv;
  int64_t B, G;
  Lengths lengths_view() const;  // `lengths` in place, as the kernels read it
};
FeatureArgs prepare_group_features(const Tensor& ids, const Tensor& lengths, double max_len);

using FeatureTuple =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
inline FeatureTuple feature_tuple(const FeatureArgs& a) {
  return {a.rank,          a.sizes,      a.prompt_feat,    a.len_norm,  a.minority_mask,
          a.cag,           a.admissible, a.pseudo_rewards, a.pseudo_adv};
}

// Grain for at::parallel_for over rows whose cost grows like G^2.
inline int64_t row_grain(int64_t G) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, G * G)); }

// One pair of care_ext::_copy_into: dst.copy_(src) for tensors of one shape and dtype on one
// device, dst contiguous. flat: src is contiguous too, so the pair is `bytes` bytes from src to dst
// (the backends' own copy); else the backend calls dst.copy_(src).
struct CopyPair {
  Tensor dst, src;
  int64_t bytes;
  bool flat;
};
// Checks care_ext::_copy_into's arguments and returns the pairs to copy (a pair whose dst is its
// src, same storage offset and strides, is left out: nothing to do).
std::vector<CopyPair> prepare_copy_into(at::TensorList dst, at::TensorList src);

// ---- CPU kernels (csrc/cpu) -----------------------------------------------------------------------
std::tuple<Tensor, Tensor> cluster_stats_cpu(const Tensor& ids);
Tensor group_advantage_cpu(const Tensor& rewards, double eps, bool unbiased);
Tensor cag_cpu(const Tensor& r_gt, const Tensor& r_ps, double eps, bool unbiased);
std::tuple<Tensor, Tensor> classwise_cag_cpu(const Tensor& sizes, double eps, bool unbiased);
std::tuple<Tensor, Tensor> expected_cag_cpu(const Tensor& logits, const Tensor& cag,
                                            const Tensor& admissible);
FeatureTuple group_features_cpu(const Tensor& ids, const Tensor& lengths, double max_len,
                                double cag_eps, bool cag_unbiased, double adv_eps,
                                bool adv_unbiased);
FeatureTuple group_features_lanes_cpu(const Tensor& ids, const Tensor& lengths, double max_len,
                                      double cag_eps, bool cag_unbiased, double adv_eps,
                                      bool adv_unbiased, int64_t lanes);

// ---- CUDA kernels (csrc/cuda; compiled and registered only when built with CUDA) ----------------
std::tuple<Tensor, Tensor> cluster_stats_cuda(const Tensor& ids);
Tensor group_advantage_cuda(const Tensor& rewards, double eps, bool unbiased);
Tensor cag_cuda(const Tensor& r_gt, const Tensor& r_ps, double eps, bool unbiased);
std::tuple<Tensor, Tensor> classwise_cag_cuda(const Tensor& sizes, double eps, bool unbiased);
std::tuple<Tensor, Tensor> expected_cag_cuda(const Tensor& logits, const Tensor& cag,
                                             const Tensor& admissible);
FeatureTuple group_features_cuda(const Tensor& ids, const Tensor& lengths, double max_len,
                                 double cag_eps, bool cag_unbiased, double adv_eps,
                                 bool adv_unbiased);

// ---- device-generic composites (classifier.cpp) ---------------------------------------------------
Tensor classifier_forward(const Tensor& h_prompt, const Tensor& prompt_feat, const Tensor& h_resp,
                          const std::optional<Tensor>& resp_feat,
                          const std::optional<Tensor>& resp_mask, at::TensorList weights);

using StepTuple = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                             Tensor>;
StepTuple acquisition_step(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                           const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                           double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                           bool adv_unbiased);
// Private, CPU: w (float32 [R, H], any strides) as `terms` bf16 pieces written into out (bf16
// [terms, R, H], any strides), piece t = bf16(w - pieces before t); a ValueError when w holds a
// NaN or Inf (care_ext::_split_bf16, cpu/bf16_split.cpp).
void split_bf16_cpu(const Tensor& w, int64_t terms, const Tensor& out);
// Private, CPU with AMX: split (bf16 [T, R, H], H even) packed for oneDNN's BRGeMM into out (1-D
// bf16 of packed_bf16_numel(T * R, H) elements; care_ext::_pack_bf16_split, cpu/bf16_brgemm.cpp).
void pack_bf16_split_cpu(const Tensor& split, const Tensor& out);
// bf16 [M, K] x bf16 [K, N] -> float32 [M, N] (cpu/bf16_gemm.cpp: MKL's bf16 GEMM, exact
// products, float32 sums; either operand may be transposed) and per-column mean and biased
// variance of a bf16/float32 [N, D] (cpu/column_stats.cpp: shifted sums, float32 over 16 rows,
// float64 across): the first layers' training GEMMs on split-bf16 pieces (care_ext.bn_linear).
Tensor bf16_mm_cpu(const Tensor& a, const Tensor& b);
std::tuple<Tensor, Tensor> column_stats_cpu(const Tensor& x);
// Private, CPU: the fused BatchNorm -> Linear training layer's forward and backward on normalised
// float32 inputs (care_ext::_bn_linear_forward / _bn_linear_backward, cpu/bn_linear.cpp).
Tensor bn_linear_forward_cpu(at::TensorList xhat, const Tensor& weight, const Tensor& bias,
                             const Tensor& gamma, const Tensor& beta);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_linear_backward_cpu(const Tensor& grad_out,
                                                                  at::TensorList xhat,
                                                                  const Tensor& weight,
                                                                  const Tensor& gamma,
                                                                  const Tensor& beta);
bool cpu_brgemm_available();
// Private: dst[i].copy_(src[i]) for every i in one call (cpu/copy.cpp: memcpy over the threads;
// cuda/copy.cu: one kernel for up to kCopySegments pairs). StepGraph copies a call's inputs into
// its graph's buffers with it.
void copy_into_cpu(at::TensorList dst, at::TensorList src);
void copy_into_cuda(at::TensorList dst, at::TensorList src);
// Private, CPU: acquisition_step with its first layers' hidden products from the split bf16
// pieces (care_ext::_acquisition_step_split; bf16 x bf16 -> float32 GEMMs, exact products).
StepTuple acquisition_step_split_cpu(const Tensor& ids, const Tensor& lengths,
                                     const Tensor& h_prompt, const Tensor& h_resp,
                                     at::TensorList stage1, at::TensorList stage2, double max_len,
                                     double cag_eps, bool cag_unbiased, double adv_eps,
                                     bool adv_unbiased, at::TensorList first_layer_split);
bool cpu_bf16_gemm_available();
// Private, CPU with AVX2 + FMA: the step's float32 weights packed for the AVX2 GEMM into out
// (care_ext::_pack_f32_step, cpu/f32_step_pack.cpp), and acquisition_step multiplying on that
// packing (care_ext::_acquisition_step_f32_packed; the same bits as the per-call packing).
void pack_f32_step_cpu(at::TensorList stage1, at::TensorList stage2, const Tensor& out);
StepTuple acquisition_step_f32_packed_cpu(const Tensor& ids, const Tensor& lengths,
                                          const Tensor& h_prompt, const Tensor& h_resp,
                                          at::TensorList stage1, at::TensorList stage2,
                                          double max_len, double cag_eps, bool cag_unbiased,
                                          double adv_eps, bool adv_unbiased,
                                          const Tensor& packed);
// Whether CARE_EXT_CPU_GEMM=auto (or unset) runs the CPU's float32 first layers on the AVX2 GEMM
// at hidden sizes >= 1024 (cpu/f32_gemm.cpp; the rest of its interface is in classifier_parts.h):
// build_info's cpu_f32_gemm; kF32GemmAutoMinK is that hidden size (build_info's
// cpu_f32_gemm_min_hidden, which care_ext.ops.cpu_step_packs_weights reads).
constexpr int64_t kF32GemmAutoMinK = 1024;
bool cpu_f32_gemm_auto();

// The fused step as private ops: care_ext::_acquisition_step_fused_split (split-bf16 first
// layers; an empty first_layer_split is the float32 path) and care_ext::_acquisition_step_fused
// (that float32 path, registered as without_split of the same kernel). Host part in
// step_fused.cpp, per-prompt tail as a loop over prompts (CPU) or one kernel with one block per
// prompt (CUDA).
StepTuple acquisition_step_fused_split_cpu(const Tensor& ids, const Tensor& lengths,
                                           const Tensor& h_prompt, const Tensor& h_resp,
                                           at::TensorList stage1, at::TensorList stage2,
                                           double max_len, double cag_eps, bool cag_unbiased,
                                           double adv_eps, bool adv_unbiased,
                                           at::TensorList first_layer_split);
// The CPU twin run the CUDA kernel's way: each block of `prompts` prompts and each stage by a team
// of `threads` threads sharing one scratch, with a barrier where the kernel has __syncthreads
// (private op _acquisition_step_fused_block; tests only).
StepTuple acquisition_step_fused_block_cpu(const Tensor& ids, const Tensor& lengths,
                                           const Tensor& h_prompt, const Tensor& h_resp,
                                           at::TensorList stage1, at::TensorList stage2,
                                           double max_len, double cag_eps, bool cag_unbiased,
                                           double adv_eps, bool adv_unbiased,
                                           at::TensorList first_layer_split, int64_t threads,
                                           int64_t prompts);
StepTuple acquisition_step_fused_split_cuda(const Tensor& ids, const Tensor& lengths,
                                            const Tensor& h_prompt, const Tensor& h_resp,
                                            at::TensorList stage1, at::TensorList stage2,
                                            double max_len, double cag_eps, bool cag_unbiased,
                                            double adv_eps, bool adv_unbiased,
                                            at::TensorList first_layer_split);

// The op name that argument errors of the fused step carry: "_acquisition_step_fused_split" when
// split pieces are given, else "_acquisition_step_fused" (the float32 path, whichever op ran it).
inline const char* fused_step_op_name(at::TensorList first_layer_split) {
  return first_layer_split.empty() ? "_acquisition_step_fused" : "_acquisition_step_fused_split";
}

using FusedSplitKernel = StepTuple (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       at::TensorList, at::TensorList, double, double, bool,
                                       double, bool, at::TensorList);

// The plain fused op's signature over a backend's split kernel, called with no split.
template <FusedSplitKernel Kernel>
StepTuple without_split(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                        const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                        double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                        bool adv_unbiased) {
  return Kernel(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps, cag_unbiased,
                adv_eps, adv_unbiased, {});
}

std::string build_info();
bool release_idle_threads();

}  // namespace care_ext
