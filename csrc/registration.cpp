// The one registration file: every care_ext op schema, the CPU kernels, the device-generic
// composites, and build_info. CUDA kernels register themselves in csrc/cuda/register_cuda.cpp.
// Importing care_ext._C runs these static registrations; the module itself is empty.
#include "care_ext.h"

#include <ATen/Parallel.h>  // INTRA_OP_PARALLEL: whether at::parallel_for here uses threads
#include <Python.h>
#include <torch/library.h>

#include <iostream>  // runs std::ios_base::Init: see the note above build_info
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef CARE_EXT_TORCH_VERSION
#define CARE_EXT_TORCH_VERSION "unknown"
#endif
#ifndef CARE_EXT_GIT_HASH
#define CARE_EXT_GIT_HASH "unknown"
#endif
#ifndef CARE_EXT_SOURCES_HASH
#define CARE_EXT_SOURCES_HASH "unknown"
#endif
#ifndef CARE_EXT_CUDA_ARCHS
#define CARE_EXT_CUDA_ARCHS ""
#endif
#ifndef CARE_EXT_CUDA_VERSION
#define CARE_EXT_CUDA_VERSION ""
#endif

extern "C" {
// An empty module: `import care_ext._C` loads the library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace care_ext {

// Built with plain string concatenation. On the GPU machine's image (torch 2.11) the linked .so
// carries its own copy of libstdc++'s stream code, and formatting a number through an ostream
// (std::ostringstream here, c10::str in every TORCH_CHECK message) crashed until <iostream> was
// included, whose std::ios_base::Init sets up the stream locale (seen 2026-11-26).
std::string build_info() {
  std::string s = "{\"torch\": \"" CARE_EXT_TORCH_VERSION "\", ";
#ifdef CARE_EXT_WITH_CUDA
  s += "\"cuda\": true, ";
#else
  s += "\"cuda\": false, ";
#endif
  s += "\"cuda_version\": \"" CARE_EXT_CUDA_VERSION "\", ";
  s += "\"archs\": \"" CARE_EXT_CUDA_ARCHS "\", ";
  s += "\"git\": \"" CARE_EXT_GIT_HASH "\", ";
  // the sources' own hash (setup.py's _sources_hash): names them where git metadata lags
  s += "\"sources\": \"" CARE_EXT_SOURCES_HASH "\", ";
  s += "\"max_group_size\": " + std::to_string(kMaxGroupSize) + ", ";
  // at::parallel_for is an inline template: it runs on torch's intra-op threads only in files
  // compiled with OpenMP (ATen defines INTRA_OP_PARALLEL from _OPENMP); without it every CPU
  // kernel of ours runs on the calling thread, whatever torch.set_num_threads says
#ifdef INTRA_OP_PARALLEL
  s += "\"intra_op_parallel\": true, ";
#else
  s += "\"intra_op_parallel\": false, ";
#endif
  // MKL's bf16 x bf16 -> float32 GEMM (the split first layers on the CPU), exported by torch's
  // x86 builds; false: those products run as float32 GEMMs on converted copies
  s += std::string("\"cpu_bf16_gemm\": ") + (cpu_bf16_gemm_available() ? "true" : "false") + ", ";
  // oneDNN's bf16 BRGeMM on AMX with pieces packed once (cpu/bf16_brgemm.cpp; off with
  // CARE_EXT_CPU_BRGEMM=0); false: the split step runs MKL's GEMM, packing per call
  s += std::string("\"cpu_brgemm\": ") + (cpu_brgemm_available() ? "true" : "false") + ", ";
  // the float32 first layers of the CPU step and classifier_forward at hidden sizes >= 1024 when
  // CARE_EXT_CPU_GEMM is unset or auto: "avx2" (cpu/f32_gemm.cpp, on CPUs with AVX2 and FMA but no
  // AVX-512F) or "mkl"
  s += std::string("\"cpu_f32_gemm\": \"") + (cpu_f32_gemm_auto() ? "avx2" : "mkl") + "\", ";
  s += "\"cpu_f32_gemm_min_hidden\": " + std::to_string(kF32GemmAutoMinK) + ", ";
#ifdef NDEBUG
  s += "\"debug\": false}";
#else
  s += "\"debug\": true}";
#endif
  return s;
}

TORCH_LIBRARY(care_ext, m) {
  m.def("cluster_stats(Tensor ids) -> (Tensor rank, Tensor sizes)");
  m.def("group_advantage(Tensor rewards, float eps, bool unbiased) -> Tensor");
  m.def("cag(Tensor r_gt, Tensor r_ps, float eps, bool unbiased) -> Tensor");
  m.def("classwise_cag(Tensor sizes, float eps, bool unbiased) -> (Tensor cag, Tensor admissible)");
  m.def("expected_cag(Tensor logits, Tensor cag, Tensor admissible) -> (Tensor probs, Tensor ecag)");
  m.def(
      "group_features(Tensor ids, Tensor lengths, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased) -> (Tensor rank, Tensor sizes, Tensor prompt_feat, "
      "Tensor len_norm, Tensor minority_mask, Tensor cag, Tensor admissible, "
      "Tensor pseudo_rewards, Tensor pseudo_adv)");
  m.def(
      "classifier_forward(Tensor h_prompt, Tensor prompt_feat, Tensor h_resp, Tensor? resp_feat, "
      "Tensor? resp_mask, Tensor[] weights) -> Tensor");
  m.def(
      "acquisition_step(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased) -> (Tensor rank, Tensor sizes, Tensor reliability, "
      "Tensor stage1_logits, Tensor probs, Tensor ecag, Tensor cag, Tensor admissible, "
      "Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private: the fused step (first-layer GEMMs + one per-prompt kernel on CUDA), same semantics as
  // acquisition_step; benchmarked and tested next to it before it becomes its CUDA path.
  m.def(
      "_acquisition_step_fused(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased) -> (Tensor rank, Tensor sizes, Tensor reliability, "
      "Tensor stage1_logits, Tensor probs, Tensor ecag, Tensor cag, Tensor admissible, "
      "Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private: the same fused step with its first layers on bf16 hidden states and the bf16 pieces
  // of both stages' first-layer hidden columns (care_ext.bf16_split.first_layer_split): one bf16
  // tensor-core GEMM per input on CUDA, exact products, float32 sums.
  m.def(
      "_acquisition_step_fused_split(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased, Tensor[] first_layer_split) -> (Tensor rank, "
      "Tensor sizes, Tensor reliability, Tensor stage1_logits, Tensor probs, Tensor ecag, "
      "Tensor cag, Tensor admissible, Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private, CPU only: acquisition_step (blocked rollout branch, MKL for layer 2 and the heads)
  // with its first layers' hidden products from the same split bf16 pieces: one bf16 x bf16 ->
  // float32 GEMM per block of rollouts and one for the prompts (MKL's cblas_gemm_bf16bf16f32 on
  // AMX / AVX512-BF16 where torch exports it: build_info's cpu_bf16_gemm; with 4 tensors, the
  // pieces and their packing from _pack_bf16_split, oneDNN's BRGeMM: build_info's cpu_brgemm),
  // exact products, float32 sums, no float32 copy of the hidden states.
  m.def(
      "_acquisition_step_split(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased, Tensor[] first_layer_split) -> (Tensor rank, "
      "Tensor sizes, Tensor reliability, Tensor stage1_logits, Tensor probs, Tensor ecag, "
      "Tensor cag, Tensor admissible, Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private, CPU only: a float32 matrix (any strides) as `terms` bf16 pieces written in one pass
  // into a caller's buffer (the CARE core re-splits its first layers after every update);
  // the pieces of care_ext.reference.split_bf16, bit for bit.
  m.def("_split_bf16(Tensor w, int terms, Tensor(a!) out) -> ()");
  // Private, CPU with AMX only: split bf16 pieces ([T, R, H], H even) packed into a caller's 1-D
  // buffer in the layout of oneDNN's bf16 BRGeMM, once per classifier update; the split step then
  // multiplies on them without MKL's per-call packing (first_layer_split of 4 tensors).
  m.def("_pack_bf16_split(Tensor split, Tensor(a!) out) -> ()");
  // Private, CPU with AVX2 + FMA: the step's float32 weights (both stages' rollout and prompt
  // first layers, rollout layer 2, head layer 1) packed into a caller's 1-D float32 buffer for
  // the AVX2 GEMM, once per classifier update (care_ext.ops.pack_cpu_step_weights); then
  // acquisition_step multiplying on that packing without packing per call (the same bits).
  m.def("_pack_f32_step(Tensor[] stage1, Tensor[] stage2, Tensor(a!) out) -> ()");
  m.def(
      "_acquisition_step_f32_packed(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased, Tensor packed) -> (Tensor rank, "
      "Tensor sizes, Tensor reliability, Tensor stage1_logits, Tensor probs, Tensor ecag, "
      "Tensor cag, Tensor admissible, Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private, CPU only: the training path of the first layers on split-bf16 pieces
  // (care_ext.bn_linear, CareConfig.first_layer_backward="split"): a bf16 GEMM with float32
  // output (exact products; either operand may be a transposed view), and per-column mean and
  // biased variance of the bf16 hidden states read once (shifted sums: float32 over 16 rows,
  // float64 across).
  m.def("_bf16_mm(Tensor a, Tensor b) -> Tensor");
  m.def("_column_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // Private, CPU only: the fused BatchNorm -> Linear training layer on normalised float32 inputs
  // (care_ext.bn_linear, first_layer_backward 'fused'): its forward x̂ (W diag(gamma))^T + W beta + b
  // and the four parameter gradients from one g^T x̂ (cpu/bn_linear.cpp; twins
  // care_ext.reference.bn_linear_forward / bn_linear_backward).
  m.def("_bn_linear_forward(Tensor[] xhat, Tensor weight, Tensor bias, Tensor gamma, "
        "Tensor beta) -> Tensor");
  m.def("_bn_linear_backward(Tensor grad_out, Tensor[] xhat, Tensor weight, Tensor gamma, "
        "Tensor beta) -> (Tensor grad_weight, Tensor grad_bias, Tensor grad_gamma, "
        "Tensor grad_beta)");
  // Private, CPU only: the fused step's tail run by a team of `threads` threads per block of
  // `prompts` prompts and stage, with barriers where the CUDA kernel has __syncthreads, so the CPU
  // tests the kernel's division of the work over a block (results equal the one-thread op bit for
  // bit).
  m.def(
      "_acquisition_step_fused_block(Tensor ids, Tensor lengths, Tensor h_prompt, Tensor h_resp, "
      "Tensor[] stage1, Tensor[] stage2, float max_len, float cag_eps, bool cag_unbiased, "
      "float adv_eps, bool adv_unbiased, Tensor[] first_layer_split, int threads, int prompts) -> "
      "(Tensor rank, "
      "Tensor sizes, Tensor reliability, Tensor stage1_logits, Tensor probs, Tensor ecag, "
      "Tensor cag, Tensor admissible, Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private, CPU only: group_features with the CUDA kernel's per-lane loops run lane by lane
  // (`lanes` lanes per prompt, phase after phase), so the CPU tests the warp split of the work.
  m.def(
      "_group_features_lanes(Tensor ids, Tensor lengths, float max_len, float cag_eps, "
      "bool cag_unbiased, float adv_eps, bool adv_unbiased, int lanes) -> (Tensor rank, "
      "Tensor sizes, Tensor prompt_feat, Tensor len_norm, Tensor minority_mask, Tensor cag, "
      "Tensor admissible, Tensor pseudo_rewards, Tensor pseudo_adv)");
  // Private: dst[i].copy_(src[i]) for every i (same shapes and dtypes, one device, dst contiguous,
  // no overlap), in one call: on CUDA one kernel for every 8 contiguous pairs. StepGraph copies a
  // call's inputs into its graph's buffers with it (care_ext.ops.copy_into).
  m.def("_copy_into(Tensor(a!)[] dst, Tensor[] src) -> ()");
  m.def("build_info() -> str", &build_info);
  // Releases the calling thread's idle OpenMP workers (care_ext.threads.release_idle_threads).
  m.def("_release_idle_threads() -> bool", &release_idle_threads);
}

// The calling thread's OpenMP thread pool released (omp_pause_resource_all(omp_pause_soft),
// OpenMP 5.0: libgomp ends the workers its parallel regions keep docked; its next parallel region
// starts new ones). Returns false where it did nothing: a build without OpenMP, a call from inside
// a parallel region, or a runtime that refused. Why: libgomp counts every docked worker of every
// thread against the cores and, when they outnumber them, lets workers spin only briefly before
// sleeping. A background thread's parallel regions then wait for sleeping workers to wake, each
// time: on the 2-core VM a classifier update took 108-113 ms on a new thread against 57-65 ms on
// the main one, and 67-82 ms with the main thread's pool released first (2026-11-28,
// bench/RESULTS.md).
bool release_idle_threads() {
#ifdef _OPENMP
  return omp_pause_resource_all(omp_pause_soft) == 0;
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(care_ext, CPU, m) {
  m.impl("cluster_stats", &cluster_stats_cpu);
  m.impl("group_advantage", &group_advantage_cpu);
  m.impl("cag", &cag_cpu);
  m.impl("classwise_cag", &classwise_cag_cpu);
  m.impl("expected_cag", &expected_cag_cpu);
  m.impl("group_features", &group_features_cpu);
  m.impl("_group_features_lanes", &group_features_lanes_cpu);
  m.impl("_acquisition_step_fused", &without_split<acquisition_step_fused_split_cpu>);
  m.impl("_acquisition_step_fused_split", &acquisition_step_fused_split_cpu);
  m.impl("_acquisition_step_fused_block", &acquisition_step_fused_block_cpu);
  m.impl("_acquisition_step_split", &acquisition_step_split_cpu);
  m.impl("_split_bf16", &split_bf16_cpu);
  m.impl("_pack_bf16_split", &pack_bf16_split_cpu);
  m.impl("_pack_f32_step", &pack_f32_step_cpu);
  m.impl("_acquisition_step_f32_packed", &acquisition_step_f32_packed_cpu);
  m.impl("_bf16_mm", &bf16_mm_cpu);
  m.impl("_column_stats", &column_stats_cpu);
  m.impl("_bn_linear_forward", &bn_linear_forward_cpu);
  m.impl("_bn_linear_backward", &bn_linear_backward_cpu);
  m.impl("_copy_into", &copy_into_cpu);
}

TORCH_LIBRARY_IMPL(care_ext, CompositeExplicitAutograd, m) {
  m.impl("classifier_forward", &classifier_forward);
  m.impl("acquisition_step", &acquisition_step);
}

}  // namespace care_ext
