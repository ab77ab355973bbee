// CUDA backend of the private fused step: after the host part (group_features kernel + four cuBLAS
// GEMMs, step_fused.cpp; the features and prompt GEMMs on a second stream where
// CARE_EXT_STEP_OVERLAP says so), one kernel runs the whole per-prompt tail of step_tail.h, one
// block of kTailThreads threads per prompt and classifier (blockIdx.y: 0 = Stage-I, 1 =
// Stage-II), its scratch in dynamic shared memory.
#include "common.cuh"

#include "../classifier_parts.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace care_ext {
namespace {

constexpr int kTailThreads = 256;
constexpr int64_t kMaxTailSmem = 48 * 1024;  // default dynamic shared-memory limit per block

struct BlockSync {
  CARE_HD void operator()() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// M = 1: one prompt per block; M = kMaxTailPrompts: up to M prompts per block, whose head layers
// keep M accumulators per thread. Both ask for at least 2 blocks of 256 threads per SM (128
// registers at most): rollout layer 2's 8 x 4 tiles, their weights 4 steps ahead and the tile's
// float4 inputs need ~100.
// kSplitHead (CARE_EXT_TAIL_HEAD=split, a.head_in set): the head is left to step_head_kernel.
// r2w_offset / h2w_offset > 0: where in the dynamic shared memory the block stages its rollout
// layer-2 weight (CARE_EXT_TAIL_STAGE_R2) / head layer-2 weight (CARE_EXT_TAIL_STAGE_H2).
// kAhead (CARE_EXT_TAIL_DOT_AHEAD, instantiated with M = 1 and the head in the tail only): the
// head's dot products software-pipelined.
template <int M, bool kSplitHead, bool kAhead = false>
__global__ void __launch_bounds__(kTailThreads, 2)
    step_tail_kernel(StepTailArgs a, int64_t B, int r2w_offset, int h2w_offset) {
  extern __shared__ __align__(16) float scratch[];  // head_scratch places doubles 8-byte aligned
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * a.prompts_per_block;
  const int nb = static_cast<int>(B - b0 < a.prompts_per_block ? B - b0 : a.prompts_per_block);
  const int stage = static_cast<int>(blockIdx.y), tid = static_cast<int>(threadIdx.x),
            nth = static_cast<int>(blockDim.x);
  const TailStamps stamp{a.stamps};
  stamp(0, tid);
  float* h2w = nullptr;
  if (!kSplitHead && M == 1 && h2w_offset > 0) {  // issued first: they land during the branches
    h2w = scratch + h2w_offset;
    if (stage == 0) {
      stage_h2w(a.w1.h2w, a.w1.K, a.w1.C, h2w, tid, nth);
    } else {
      stage_h2w(a.w2.h2w, a.w2.K, a.w2.C, h2w, tid, nth);
    }
  }
  float* r2w = nullptr;
  if (r2w_offset > 0) {  // CARE_EXT_TAIL_STAGE_R2=1; written before step_tail's first barrier
    r2w = scratch + r2w_offset;
    if (stage == 0) {
      stage_r2w(a.w1.r2w, a.w1.R1, a.w1.R2, r2w, tid, nth);
    } else {
      stage_r2w(a.w2.r2w, a.w2.R1, a.w2.R2, r2w, tid, nth);
    }
  }
  step_tail<M, BlockSync, kSplitHead ? 0 : 1, kAhead>(a, b0, nb, stage, scratch, tid, nth,
                                                       BlockSync{}, r2w, h2w, stamp);
}

// The head of both stages after the tail (CARE_EXT_TAIL_HEAD=split; step_tail.h's
// head_block_layer1 / head_finish): block (x: kHeadUnits units of head layer 1, y: a group of
// head_prompts prompts, z: stage), kHeadThreads threads, one layer-1 item each. Each block counts
// itself done on its group's counter (zeroed by the tail, which ran before on the stream); the
// last one (its layer-1 stores made visible by __threadfence before the count) copies the whole
// of z in through L2 and finishes the group.
__global__ void __launch_bounds__(kHeadThreads, 1) step_head_kernel(StepTailArgs a) {
  extern __shared__ __align__(16) float scratch[];
  __shared__ int last;
  const int stage = static_cast<int>(blockIdx.z), g = static_cast<int>(blockIdx.y);
  const int ug = static_cast<int>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x), nth = static_cast<int>(blockDim.x);
  const int n_ug = head_unit_blocks(stage == 0 ? a.w1 : a.w2);
  if (ug >= n_ug) return;  // the other stage has more units
  head_block_layer1<1>(a, stage, g, ug, scratch, tid, nth, BlockSync{});
  __threadfence();  // this block's z stores, device-wide, before its count
  __syncthreads();
  if (tid == 0) last = atomicAdd(a.head_count + stage * a.head_groups + g, 1) == n_ug - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other blocks' counts seen: their z stores are visible (read via L2)
  head_finish(a, stage, g, scratch, tid, nth, BlockSync{});
}

// Both classifiers' rollout layer-2 weights split into TF32 pieces in fragment order
// (split_r2w_frag; item i < n1: Stage-I's, then n2 of Stage-II's), for the tensor-core layer 2
// with pre-split operands (CARE_EXT_TAIL_MMA_PRESPLIT). Before sm_80: nothing (never launched).
__global__ void split_r2w_frag_kernel(Mat w1, int R2a, uint32_t* o1, int64_t n1, Mat w2, int R2b,
                                      uint32_t* o2, int64_t n2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n1) {
    split_r2w_frag(w1, R2a, o1, i);
  } else if (i - n1 < n2) {
    split_r2w_frag(w2, R2b, o2, i - n1);
  }
#endif
}

// Splits the layer-2 weights of the stages whose tail runs tensor-core layer 2 (R1 % 8 == 0) into
// one new buffer and points args.w1/w2.r2w_frag at it (which also gives those stages' blocks the
// r1lo scratch). Returns the buffer: it must live until the tail is enqueued.
Tensor presplit_r2w(StepTailArgs& args, const Tensor& like, cudaStream_t stream) {
  const int64_t n1 = args.w1.R1 % 8 == 0 ? r2w_frag_words(args.w1.R1, args.w1.R2) : 0;
  const int64_t n2 = args.w2.R1 % 8 == 0 ? r2w_frag_words(args.w2.R1, args.w2.R2) : 0;
  if (n1 + n2 == 0) return Tensor();
  Tensor buf = at::empty({n1 + n2}, like.options().dtype(at::kInt));
  uint32_t* base = reinterpret_cast<uint32_t*>(buf.data_ptr<int>());  // 16-byte aligned; n1 % 4 = 0
  if (n1 > 0) args.w1.r2w_frag = base;
  if (n2 > 0) args.w2.r2w_frag = base + n1;
  const int64_t items = (n1 + n2) / 4;
  constexpr int kThreads = 256;
  split_r2w_frag_kernel<<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0,
                          stream>>>(args.w1.r2w, args.w1.R2, base, n1 / 4, args.w2.r2w,
                                    args.w2.R2, base + n1, n2 / 4);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

// The dynamic shared memory a launch of step_tail_kernel<M> may ask for without opting in: the
// 48 KB default less the kernel's static shared memory (queried once).
template <int M>
int64_t dynamic_smem_limit() {
  static const int64_t limit = [] {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, step_tail_kernel<M, false>));
    return std::min<int64_t>(kMaxTailSmem, static_cast<int64_t>(attr.maxDynamicSharedSizeBytes));
  }();
  return limit;
}

// The dynamic shared memory a launch of `kernel` may ask for after opting in: the current
// device's per-block maximum less the kernel's static shared memory.
int64_t optin_smem_of(const void* kernel) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
}

// optin_smem_of step_tail_kernel<M> (queried once).
template <int M>
int64_t optin_smem_limit() {
  static const int64_t limit =
      optin_smem_of(reinterpret_cast<const void*>(step_tail_kernel<M, false>));
  return limit;
}

// Opts step_tail_kernel<M, kSplitHead, kAhead> in to `bytes` of dynamic shared memory on the
// current device when that is above the 48 KB default (set at every such launch: the attribute
// is per device and cheap).
template <int M, bool kSplitHead, bool kAhead>
void allow_dynamic_smem(int64_t bytes) {
  if (bytes > kMaxTailSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(step_tail_kernel<M, kSplitHead, kAhead>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// optin_smem_of step_head_kernel (queried once).
int64_t head_smem_limit() {
  static const int64_t limit = optin_smem_of(reinterpret_cast<const void*>(step_head_kernel));
  return limit;
}

// CARE_EXT_TAIL_STAMPS=1: after a launch of the tail (not under capture), waits for the stream and
// prints to stderr, per stage, each phase's median and slowest block (TailStamps: branches, head
// layer 1, head layer 2, outputs; the whole block) in cycles, and in microseconds at the device's
// peak clock (the clock under load may be lower). Phases a block did not stamp (the split head's)
// are left out.
void print_tail_stamps(const Tensor& stamps, int64_t blocks, int64_t B, int G, int per_block) {
  const Tensor host = stamps.cpu();  // waits for the stream
  const int64_t* t = host.const_data_ptr<int64_t>();
  int dev = 0, khz = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
  const double per_us = khz > 0 ? khz / 1000.0 : 1.0;
  static const char* const kNames[] = {"branches", "head-layer1", "head-layer2", "outputs",
                                       "block"};
  for (int stage = 0; stage < 2; ++stage) {
    std::string line = "care_ext tail stamps B=" + std::to_string(B) + " G=" + std::to_string(G) +
                       " prompts/block=" + std::to_string(per_block) + " stage=" +
                       std::to_string(stage + 1) + " (cycles median/max, us at " +
                       std::to_string(khz / 1000) + " MHz):";
    // per phase the blocks' durations: phase ph from slot ph to ph + 1, the last entry the whole
    // block (its first stamp to its last)
    std::vector<int64_t> d[kTailStampSlots];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t* row = t + (stage * blocks + b) * kTailStampSlots;
      int last = kTailStampSlots - 1;
      while (last > 0 && row[last] == 0) --last;
      for (int ph = 0; ph < last; ++ph) {
        if (row[ph] != 0 && row[ph + 1] != 0) d[ph].push_back(row[ph + 1] - row[ph]);
      }
      if (row[0] != 0 && row[last] != 0) d[kTailStampSlots - 1].push_back(row[last] - row[0]);
    }
    for (int ph = 0; ph < kTailStampSlots; ++ph) {
      std::vector<int64_t>& d_ph = d[ph];
      if (d_ph.empty()) continue;
      std::sort(d_ph.begin(), d_ph.end());
      const int64_t med = d_ph[d_ph.size() / 2], mx = d_ph.back();
      char buf[160];
      std::snprintf(buf, sizeof buf, " %s %lld/%lld (%.2f/%.2f us)", kNames[ph],
                    static_cast<long long>(med), static_cast<long long>(mx), med / per_us,
                    mx / per_us);
      line += buf;
    }
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

// CARE_EXT_TAIL_HEAD=split: lays out the head's buffers in one new tensor (returned: it must live
// until the head kernel is enqueued) and sets a.head_*: kMaxHeadPrompts prompts per head block,
// halved down to kHeadSub while the scratch exceeds the shared memory the kernel may use. Returns
// an undefined tensor (the head stays in the tail) where even kHeadSub prompts do not fit.
Tensor plan_split_head(StepTailArgs& a, int64_t B, const Tensor& like, int64_t& smem) {
  int n = kMaxHeadPrompts;
  auto bytes = [&](int m) {
    return static_cast<int64_t>(head_block_floats(a.w1, a.w2, m)) *
           static_cast<int64_t>(sizeof(float));
  };
  while (n > kHeadSub && bytes(n) > head_smem_limit()) n /= 2;
  if (bytes(n) > head_smem_limit()) return Tensor();
  smem = bytes(n);
  Tensor buf = at::empty({head_layout(a, B, n)}, like.options());
  place_head_buffers(a, buf.data_ptr<float>());  // the counters are zeroed by the tail
  return buf;
}

// Prompts per block: env = CARE_EXT_TAIL_PROMPTS (1 .. kMaxTailPrompts) when set, else the most of
// 4, 2, 1 that still gives every SM a block: 2 * ceil(B / n) blocks (one per stage) >= the SM
// count (132 on the H200: 64 and 128 prompts 1, 256 2, 512 and 1024 4); lowered by the caller
// while the scratch would exceed the shared-memory limit. More prompts per block read each head
// weight once for all of them (at 1024 x 64 one prompt per block streams 2048 x 0.8 MB of head
// weights from L2), fewer give more blocks to hide the latency of those reads when B is small.
// Measured on an H200 (2026-11-27, bench/RESULTS.md, thirteenth session; split2 step, graph
// replays, us): 128x64 1: 107.8, 2: 136.2; 256x32 1: 127.5, 2: 113.4, 4: 142.9; 512x16 2: 162.0,
// 4: 142.2; 1024x64 1: 628.6, 2: 590.1, 4: 561.3 (default layer 2). The rule before counted one
// stage's blocks, ceil(B / n) >= SMs, and took 1 at 256 and 2 at 512 prompts.
int tail_prompts_per_block(int64_t B, const char* env) {
  if (env == nullptr || *env == 0) {
    int dev = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    for (int n = kMaxTailPrompts; n > 1; n /= 2) {
      if (2 * ((B + n - 1) / n) >= sms) return n;
    }
    return 1;
  }
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == 0 && n >= 1 && n <= kMaxTailPrompts, "CARE_EXT_TAIL_PROMPTS must be an "
              "integer in [1, ", kMaxTailPrompts, "], got '", env, "'");
  return static_cast<int>(n);
}

// CARE_EXT_STEP_OVERLAP's policy (step_overlap_requested, classifier_parts.h): "auto" overlaps
// only while the caller's stream is being captured into a CUDA graph (host work costs nothing at
// replay) and below kOverlapMaxRows rollouts (B * G). Measured on the H200 (2026-11-28,
// bench/RESULTS.md, split2 step, 0 / 1 alternated twice): replayed, 64 x 8 x 4096 went from
// 44.4 / 44.3 to 41.2 / 41.0 us, while 512 x 16 lost 130.6 -> 132.2 / 132.0 and 1024 x 64 was a
// wash (553.0 / 557.4 against 555.1 / 561.6); eager, overlapping lost everywhere (64 x 8: 92.9 /
// 74.9 against 108.7 / 105.3; 512 x 16: 136.8 / 136.1 against 142.1 / 141.0; 1024 x 64: 563.4 /
// 558.8 against 582.2 / 579.6): the fork and join cost the host 4 runtime calls (2 event
// records, 2 waits) and a recordStream per side output, and from 8192 rollouts the rollout GEMM
// fills the device, leaving the side stream nothing to hide in. The same values either way, so
// the same bits (CUDA test).
constexpr int64_t kOverlapMaxRows = 8192;

bool step_overlap_wanted(int64_t rows) {
  const int asked = step_overlap_requested();
  if (asked >= 0) return asked == 1;
  return rows < kOverlapMaxRows &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Two events per device and host thread (fork, join), made once: the step records and waits on
// them in order on one thread, so reusing them is safe, eager or under graph capture.
cudaEvent_t fork_join_event(int which, c10::DeviceIndex device) {
  thread_local std::vector<std::array<cudaEvent_t, 2>> events;
  if (static_cast<size_t>(device) >= events.size()) {
    events.resize(static_cast<size_t>(device) + 1, {nullptr, nullptr});
  }
  cudaEvent_t& e = events[static_cast<size_t>(device)][static_cast<size_t>(which)];
  if (e == nullptr) {  // the current device is `device` (the caller's guard)
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  return e;
}

// SideWork on a stream from torch's pool: begin() makes it wait for the caller's stream and makes
// it current (so the features' and the prompt GEMMs' outputs are allocated for it), end() records
// where it got to and makes the caller's stream current again; join() makes the caller's stream
// wait for it and tells the allocator that the caller's stream uses those outputs (their memory is
// not reused before that stream is done with them).
class SideStream final : public SideWork {
 public:
  explicit SideStream(c10::cuda::CUDAStream main)
      : main_(main), side_(c10::cuda::getStreamFromPool(false, main.device_index())) {
    // the pool hands its streams out in turn: the caller's may be one of them
    if (side_ == main_) side_ = c10::cuda::getStreamFromPool(false, main.device_index());
  }

  void begin() override {
    const cudaEvent_t fork = fork_join_event(0, main_.device_index());
    C10_CUDA_CHECK(cudaEventRecord(fork, main_.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side_.stream(), fork, 0));
    guard_.emplace(side_);
  }

  void end() override {
    guard_.reset();
    C10_CUDA_CHECK(cudaEventRecord(fork_join_event(1, main_.device_index()), side_.stream()));
    ended_ = true;
  }

  void join(const FusedStep& f) const {
    if (!ended_) return;
    C10_CUDA_CHECK(
        cudaStreamWaitEvent(main_.stream(), fork_join_event(1, main_.device_index()), 0));
    for (const Tensor* t : {&f.rank, &f.sizes, &f.prompt_feat, &f.len_norm, &f.minority, &f.cag,
                            &f.admissible, &f.pseudo, &f.pseudo_adv, &f.pre_p1, &f.pre_p2}) {
      if (t->defined() && t->numel() > 0) {
        c10::cuda::CUDACachingAllocator::recordStream(t->storage().data_ptr(), main_);
      }
    }
  }

 private:
  c10::cuda::CUDAStream main_, side_;
  std::optional<c10::cuda::CUDAStreamGuard> guard_;
  bool ended_ = false;
};

}  // namespace

StepTuple acquisition_step_fused_split_cuda(const Tensor& ids, const Tensor& lengths,
                                            const Tensor& h_prompt, const Tensor& h_resp,
                                            at::TensorList stage1, at::TensorList stage2,
                                            double max_len, double cag_eps, bool cag_unbiased,
                                            double adv_eps, bool adv_unbiased,
                                            at::TensorList first_layer_split) {
  // The dispatcher runs this kernel when any argument is on CUDA: a guard only for a CUDA ids, so
  // that ids (or all inputs) on the CPU reach prepare_fused_step's checks, which name the misplaced
  // argument, instead of a CUDAGuard error about a CPU device.
  c10::cuda::OptionalCUDAGuard guard;
  if (ids.is_cuda()) guard.set_device(ids.device());
  // CARE_EXT_STEP_OVERLAP: features and prompt GEMMs on a second stream (checked on CUDA inputs)
  std::optional<SideStream> side;
  if (ids.is_cuda() && ids.numel() > 0 && step_overlap_wanted(ids.numel())) {
    side.emplace(c10::cuda::getCurrentCUDAStream());
  }
  const FusedStep f = prepare_fused_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                         cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                         first_layer_split, side ? &*side : nullptr);
  if (side) side->join(f);  // before the tail, or before the caller's next work on the stream
  if (f.B == 0) return f.outputs();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  StepTailArgs args = f.args;
  const char* env = std::getenv("CARE_EXT_TAIL_PROMPTS");
  const bool from_env = env != nullptr && *env != 0;
  args.prompts_per_block = tail_prompts_per_block(f.B, env);
  const char* op = fused_step_op_name(first_layer_split);
  args.l2_mma = tail_l2_mma_requested(args.G) ? 1 : 0;  // the kernel checks R1 % 8 and the arch
  // CARE_EXT_TAIL_MMA_PRESPLIT (default on): the tensor-core layer 2 reads pre-split operands; its
  // weight is split here once per call (sm_80+: cvt.rna.tf32)
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const bool presplit_on = tail_mma_presplit_requested();
  const Tensor r2w_frag = args.l2_mma && presplit_on && major >= 8
                              ? presplit_r2w(args, f.reliability, stream) : Tensor();
  const bool presplit = r2w_frag.defined();
  if (tail_mma_tall_tiles_requested() && presplit) args.l2_mma = 2;  // CARE_EXT_TAIL_MMA_TILES=4x2
  // CARE_EXT_TAIL_STAGE_R2=1: the larger stage's layer-2 weight after the scratch (16-byte
  // aligned); nothing to stage where layer 2 reads the pre-split weight
  const bool stage_asked = tail_stage_r2w_requested();
  const int64_t r2w_floats =
      stage_asked && !presplit ? step_tail_staged_r2w_floats(args) : 0;
  bool staged = r2w_floats > 0;
  auto scratch_floats = [&] { return (step_tail_scratch_floats(args) + 3) / 4 * 4; };
  auto smem_of = [&] {
    return (scratch_floats() + (staged ? r2w_floats : 0)) * static_cast<int64_t>(sizeof(float));
  };
  auto limit_of = [&] {
    if (staged || presplit) {  // r1lo: 65 KB per block at G = 64 with 4 prompts
      return args.prompts_per_block == 1 ? optin_smem_limit<1>()
                                         : optin_smem_limit<kMaxTailPrompts>();
    }
    return args.prompts_per_block == 1 ? dynamic_smem_limit<1>()
                                       : dynamic_smem_limit<kMaxTailPrompts>();
  };
  const int asked = args.prompts_per_block;
  while (args.prompts_per_block > 1 && smem_of() > limit_of()) --args.prompts_per_block;
  if (staged && smem_of() > limit_of()) {  // not even one prompt fits beside the staged weight
    TORCH_WARN_ONCE("care_ext.", op, ": CARE_EXT_TAIL_STAGE_R2=1 needs ", smem_of(), " bytes of "
                    "shared memory per block, more than the ", limit_of(), " this device allows; "
                    "the tail reads rollout layer 2's weight from global memory");
    staged = false;
    args.prompts_per_block = asked;
    while (args.prompts_per_block > 1 && smem_of() > limit_of()) --args.prompts_per_block;
  }
  const int64_t smem = smem_of();
  if (from_env && args.prompts_per_block < asked) {  // a benchmark of the grouped tail would mislead
    TORCH_WARN_ONCE("care_ext.", op, ": CARE_EXT_TAIL_PROMPTS=", asked, " needs more than the ",
                    limit_of(), " bytes of dynamic shared memory per ",
                    "block at G = ", args.G, "; the tail runs ", args.prompts_per_block,
                    " prompt(s) per block");
  }
  TORCH_CHECK(smem <= limit_of(), "care_ext.", op, ": the classifiers need ", smem,
              " bytes of per-block scratch (R1 * r1t_ld(G) + G + ", kL2RowGroups,
              " * R2 + P + R2 + K + C + 1 + 2 * C floats: head_scratch_floats), more than the ",
              limit_of(), " bytes of dynamic shared memory this kernel may use; use "
              "acquisition_step");
  // CARE_EXT_TAIL_HEAD=split: the head in a kernel of its own after the tail
  int64_t head_smem = 0;
  const Tensor head_buf =
      tail_head_split_requested() ? plan_split_head(args, f.B, f.reliability, head_smem) : Tensor();
  const int64_t blocks = (f.B + args.prompts_per_block - 1) / args.prompts_per_block;
  TORCH_CHECK(blocks <= 2147483647LL, "care_ext.", op, ": B = ", f.B, " is too large");
  const dim3 grid(static_cast<unsigned>(blocks), 2);  // blocks of prompts, one per stage
  const int r2w_offset = staged ? static_cast<int>(scratch_floats()) : 0;
  // CARE_EXT_TAIL_STAGE_H2=1: head layer 2's weight after the rest, with one prompt per block and
  // where the whole still fits in the default 48 KB (and the launch's limit): it never lowers the
  // prompts per block nor opts a launch in to more shared memory, which could cost the SM its
  // second block (at G = 64 its 65 KB alone are too much); the split head leaves the tail no head
  // layer 2
  const int64_t h2w_floats =
      tail_stage_h2w_requested() && !head_buf.defined() && args.prompts_per_block == 1
          ? step_tail_staged_h2w_floats(args)
          : 0;
  const int64_t h2w_bytes = h2w_floats * static_cast<int64_t>(sizeof(float));
  const bool staged_h2 =
      h2w_floats > 0 && smem + h2w_bytes <= std::min<int64_t>(limit_of(), kMaxTailSmem);
  const int h2w_offset = staged_h2 ? static_cast<int>(smem / 4) : 0;  // in floats
  const int64_t launch_smem = smem + (staged_h2 ? h2w_bytes : 0);
  // CARE_EXT_TAIL_STAMPS=1: phase stamps of every block (not while the stream is captured: the
  // summary waits for the stream)
  const bool stamped =
      tail_stamps_requested() &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  const Tensor stamps = stamped ? at::zeros({2 * blocks * kTailStampSlots},
                                            f.reliability.options().dtype(at::kLong))
                                : Tensor();
  if (stamped) args.stamps = reinterpret_cast<long long*>(stamps.data_ptr<int64_t>());
  auto launch = [&](auto m, auto split, auto ahead) {
    constexpr int kM = decltype(m)::value;
    constexpr bool kSplit = decltype(split)::value;
    constexpr bool kAhead = decltype(ahead)::value;
    allow_dynamic_smem<kM, kSplit, kAhead>(launch_smem);
    step_tail_kernel<kM, kSplit, kAhead>
        <<<grid, kTailThreads, static_cast<size_t>(launch_smem), stream>>>(args, f.B, r2w_offset,
                                                                          h2w_offset);
  };
  using One = std::integral_constant<int, 1>;
  using Many = std::integral_constant<int, kMaxTailPrompts>;
  const std::false_type plain{};
  if (head_buf.defined()) {
    if (args.prompts_per_block == 1) {
      launch(One{}, std::true_type{}, plain);
    } else {
      launch(Many{}, std::true_type{}, plain);
    }
  } else if (args.prompts_per_block == 1) {
    if (tail_dot_ahead_requested()) {  // CARE_EXT_TAIL_DOT_AHEAD=1
      launch(One{}, std::false_type{}, std::true_type{});
    } else {
      launch(One{}, std::false_type{}, plain);
    }
  } else {
    launch(Many{}, std::false_type{}, plain);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (stamped) print_tail_stamps(stamps, blocks, f.B, args.G, args.prompts_per_block);
  if (head_buf.defined()) {
    const dim3 head_grid(static_cast<unsigned>(std::max(head_unit_blocks(args.w1),
                                                          head_unit_blocks(args.w2))),
                         static_cast<unsigned>(args.head_groups), 2);
    // set at every split launch (cheap): with its static `last` the kernel may pass 48 KB in all
    C10_CUDA_CHECK(cudaFuncSetAttribute(step_head_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(head_smem)));
    step_head_kernel<<<head_grid, kHeadThreads, static_cast<size_t>(head_smem), stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return f.outputs();
}

}  // namespace care_ext
