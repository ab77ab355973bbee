// CPU backend of the private fused step: the per-prompt tail of step_tail.h on one thread per
// prompt (tid 0, nth 1, no barriers), prompts in parallel. It exists so that the arithmetic of the
// CUDA kernel (the same header) is tested on every machine; the public acquisition_step on the CPU
// uses the blocked MKL path (rollout_pool.cpp), which is faster there.
#include "../classifier_parts.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace care_ext {
namespace {

struct NoSync {
  void operator()() const {}
};

// A reusable barrier for a team of n threads: the kernel block's __syncthreads when
// acquisition_step_fused_block_cpu runs a block as a team of threads (std::barrier is C++20; the
// sources also build as C++17 against the GPU machine's torch 2.11 headers).
class TeamBarrier {
 public:
  explicit TeamBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const int64_t gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  const int n_;
  int waiting_ = 0;
  int64_t gen_ = 0;
};

struct TeamSync {
  TeamBarrier* barrier;
  void operator()() const { barrier->wait(); }
};

// member(tid) on n threads (tid 0 on the caller's), joined before it returns.
template <class F>
void run_team(int n, F& member) {
  std::vector<std::thread> team;
  team.reserve(static_cast<size_t>(n - 1));
  for (int t = 1; t < n; ++t) team.emplace_back(member, t);
  member(0);
  for (std::thread& t : team) t.join();
}

}  // namespace

StepTuple acquisition_step_fused_split_cpu(const Tensor& ids, const Tensor& lengths,
                                           const Tensor& h_prompt, const Tensor& h_resp,
                                           at::TensorList stage1, at::TensorList stage2,
                                           double max_len, double cag_eps, bool cag_unbiased,
                                           double adv_eps, bool adv_unbiased,
                                           at::TensorList first_layer_split) {
  step_overlap_requested();  // checked; the CPU runs the host part in order
  tail_head_split_requested();  // checked; this twin keeps the head in the tail (the same bits)
  const FusedStep f = prepare_fused_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                         cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                         first_layer_split);
  const int64_t scratch = step_tail_scratch_floats(f.args);
  at::parallel_for(0, f.B, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(scratch));
    for (int64_t b = b0; b < b1; ++b) {
      for (int stage = 0; stage < 2; ++stage) {  // the CUDA kernel's two blocks per prompt
        step_tail<1>(f.args, b, 1, stage, buf.data(), 0, 1, NoSync{});
      }
    }
  });
  return f.outputs();
}

StepTuple acquisition_step_fused_block_cpu(const Tensor& ids, const Tensor& lengths,
                                           const Tensor& h_prompt, const Tensor& h_resp,
                                           at::TensorList stage1, at::TensorList stage2,
                                           double max_len, double cag_eps, bool cag_unbiased,
                                           double adv_eps, bool adv_unbiased,
                                           at::TensorList first_layer_split, int64_t threads,
                                           int64_t prompts) {
  TORCH_CHECK(threads >= 1 && threads <= 1024, "care_ext._acquisition_step_fused_block: threads "
              "must be in [1, 1024] (a CUDA block's limit), got ", threads);
  TORCH_CHECK(prompts >= 1 && prompts <= kMaxTailPrompts, "care_ext._acquisition_step_fused_block: "
              "prompts must be in [1, ", kMaxTailPrompts, "], got ", prompts);
  FusedStep f = prepare_fused_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                   cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                   first_layer_split);
  f.args.prompts_per_block = static_cast<int>(prompts);
  const int n = static_cast<int>(threads), per = static_cast<int>(prompts);
  std::vector<float> scratch(static_cast<size_t>(step_tail_scratch_floats(f.args)));
  // CARE_EXT_TAIL_HEAD=split: the head's buffers as the CUDA launch lays them out, its counters
  // set to a value the tail must overwrite (checked below: every group's counter was zeroed)
  const bool split_head = tail_head_split_requested() && f.B > 0;
  std::vector<float> head_buf;
  if (split_head) {
    head_buf.assign(static_cast<size_t>(head_layout(f.args, f.B, kMaxHeadPrompts)), 0.f);
    place_head_buffers(f.args, head_buf.data());
    std::fill(f.args.head_count, f.args.head_count + 2 * f.args.head_groups, 7);
  }
  // CARE_EXT_TAIL_STAGE_R2=1: each block stages its stage's layer-2 weight first, as the CUDA
  // kernel does with it (stage_r2w), into a buffer of its own
  const bool staged = tail_stage_r2w_requested();
  tail_l2_mma_requested(0);  // checked; the CPU runs layer 2's FFMA tiles whatever it says
  tail_mma_presplit_requested();  // checked likewise
  tail_mma_tall_tiles_requested();
  step_overlap_requested();  // checked; one thread runs the host part in order
  std::vector<float> r2w(staged ? static_cast<size_t>(step_tail_staged_r2w_floats(f.args)) : 0);
  // CARE_EXT_TAIL_STAGE_H2=1: likewise head layer 2's weight (stage_h2w) with one prompt per
  // block (the CUDA launch: also only where it fits in shared memory)
  const bool staged_h2 = tail_stage_h2w_requested() && per == 1;
  tail_stamps_requested();  // checked; the CPU writes no stamps
  const bool ahead = tail_dot_ahead_requested() && per == 1;  // as the CUDA launch picks it
  std::vector<float> h2w(staged_h2 ? static_cast<size_t>(step_tail_staged_h2w_floats(f.args)) : 0);
  TeamBarrier barrier(n);
  auto member = [&](int tid) {
    for (int64_t b0 = 0; b0 < f.B; b0 += per) {
      const int nb = static_cast<int>(std::min<int64_t>(per, f.B - b0));
      for (int stage = 0; stage < 2; ++stage) {  // one block after another, one shared scratch
        const HeadWeights& w = stage == 0 ? f.args.w1 : f.args.w2;
        if (staged) stage_r2w(w.r2w, w.R1, w.R2, r2w.data(), tid, n);
        if (staged_h2) stage_h2w(w.h2w, w.K, w.C, h2w.data(), tid, n);
        const float* r2w_staged = staged ? r2w.data() : nullptr;
        const float* h2w_staged = staged_h2 ? h2w.data() : nullptr;
        if (ahead) {  // the kernel's instantiations, as the CUDA launch picks them
          step_tail<1, TeamSync, -1, true>(f.args, b0, nb, stage, scratch.data(), tid, n,
                                           TeamSync{&barrier}, r2w_staged, h2w_staged);
        } else if (per == 1) {
          step_tail<1>(f.args, b0, nb, stage, scratch.data(), tid, n, TeamSync{&barrier},
                       r2w_staged, h2w_staged);
        } else {
          step_tail<kMaxTailPrompts>(f.args, b0, nb, stage, scratch.data(), tid, n,
                                     TeamSync{&barrier}, r2w_staged, h2w_staged);
        }
        barrier.wait();  // the next block overwrites the scratch this one's last reads use
      }
    }
  };
  run_team(n, member);
  if (split_head) {  // the head kernel's blocks one after another: (unit blocks, group, stage)
    const StepTailArgs& a = f.args;
    for (int i = 0; i < 2 * a.head_groups; ++i) {
      TORCH_CHECK(a.head_count[i] == 0, "care_ext._acquisition_step_fused_block: the tail left the "
                  "head counter of stage ", i / a.head_groups, ", group ", i % a.head_groups,
                  " at ", a.head_count[i], " (every counter must be zeroed)");
    }
    std::vector<float> hs(static_cast<size_t>(head_block_floats(a.w1, a.w2, a.head_prompts) + 1));
    auto head_member = [&](int tid) {
      for (int stage = 0; stage < 2; ++stage) {
        const int n_ug = head_unit_blocks(stage == 0 ? a.w1 : a.w2);
        for (int g = 0; g < a.head_groups; ++g) {
          for (int ug = 0; ug < n_ug; ++ug) {
            // every item of the block on this team (the CUDA kernel: kHeadThreads, one each)
            head_block_layer1<kHeadThreads>(a, stage, g, ug, hs.data(), tid, n,
                                            TeamSync{&barrier});
            barrier.wait();  // the next block's inputs overwrite this one's
          }
          head_finish(a, stage, g, hs.data(), tid, n, TeamSync{&barrier});
          barrier.wait();
        }
      }
    };
    run_team(n, head_member);
  }
  return f.outputs();
}

}  // namespace care_ext
