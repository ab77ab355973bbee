// CPU: the acquisition step's float32 weights packed once per classifier update for the AVX2 GEMM
// (cpu/f32_gemm.cpp), so that the step multiplies on them without packing at every call.
//
// Why: the float32 step packs ~7.5 MB of weights per call at 64x8x4096 (both stages' rollout and
// prompt first layers, rollout layer 2, head layer 1), most of them transposed; on the 2-core
// EPYC that was 7% of the step's samples. The weights change only when the classifiers are
// trained, so the CARE core packs them after each update (on the background update's thread
// with CareConfig.background_update) and hands the buffer to every decide until the next,
// as it does with the bf16 pieces' packing on AMX (care_ext::_pack_bf16_split).
//
// care_ext::_pack_f32_step(stage1, stage2, out) writes the packing into `out` (1-D float32,
// contiguous, as many elements as the sections' panels hold: care_ext.ops.cpu_step_packed_numel);
// care_ext::_acquisition_step_f32_packed(..., packed) is acquisition_step multiplying on it: the
// same panels, so the same bits as the per-call packing.
// A packing of other weights than the ones passed is not detected (only its size is): the
// caller re-packs after every change of the weights.
#include "../classifier_parts.h"

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace care_ext {
namespace {

using Groups = std::vector<std::pair<Tensor, Tensor>>;
constexpr size_t kSections = 6;

// The packed buffer's sections in order (the struct's fields): each a list of column groups
// ([K, N] weight view, bias or undefined).
std::array<Groups, kSections> step_groups(const Weights& w1, const Weights& w2, int64_t H) {
  return {{
      {{w1.r1w.narrow(1, 0, H).t(), w1.r1b}, {w2.r1w.narrow(1, 0, H).t(), w2.r1b}},
      {{w1.r2w.t(), Tensor()}},
      {{w2.r2w.t(), Tensor()}},
      {{w1.pw.narrow(1, 0, H).t(), w1.pb}, {w2.pw.narrow(1, 0, H).t(), w2.pb}},
      {{w1.h1w.t(), Tensor()}},
      {{w2.h1w.t(), Tensor()}},
  }};
}

std::array<F32Panels*, kSections> fields(StepF32Panels& s) {
  return {&s.rollout, &s.l2[0], &s.l2[1], &s.prompt, &s.head[0], &s.head[1]};
}

// Every section's layout (no data) and the buffer's size.
std::pair<StepF32Panels, int64_t> layouts(const std::array<Groups, kSections>& groups) {
  StepF32Panels s;
  int64_t total = 0;
  const auto f = fields(s);
  for (size_t i = 0; i < kSections; ++i) {
    *f[i] = f32_panels_layout(groups[i]);
    total += f32_panels_numel(*f[i]);
  }
  return {std::move(s), total};
}

void check_packed(const Tensor& t, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                  t.dim() == 1 && t.is_contiguous(),
              "care_ext.", op, ": ", name, " must be a contiguous 1-D float32 CPU tensor "
              "(care_ext.ops.pack_cpu_step_weights), got ",
              t.defined() ? t.toString() : std::string("undefined"), " ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.numel() == numel, "care_ext.", op, ": ", name, " holds ", t.numel(),
              " floats; these weights pack into ", numel,
              " (packed from other shapes? re-pack after every change of the weights)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 32 == 0, "care_ext.", op, ": ",
              name, " must be 32-byte aligned (a tensor of its own, not a view at an offset)");
  TORCH_CHECK(cpu_f32_gemm_available(), "care_ext.", op, ": this CPU (or build) has no AVX2 and "
              "FMA, which the packed float32 step needs (care_ext.build_info()['cpu_f32_gemm'])");
}

}  // namespace

StepF32Panels step_f32_panels(const Weights& w1, const Weights& w2, int64_t H,
                              const Tensor& packed, const char* op) {
  auto [s, total] = layouts(step_groups(w1, w2, H));
  check_packed(packed, total, op, "packed");
  int64_t off = 0;
  for (F32Panels* f : fields(s)) {
    const int64_t n = f32_panels_numel(*f);
    f->data = packed.narrow(0, off, n);
    off += n;
  }
  return s;
}

void pack_f32_step_cpu(at::TensorList stage1, at::TensorList stage2, const Tensor& out) {
  const char* op = "_pack_f32_step";
  TORCH_CHECK(stage1.size() == 10 && stage2.size() == 10, "care_ext.", op,
              ": stage1 and stage2 must hold 10 tensors each, got ", stage1.size(), " and ",
              stage2.size());
  for (const Tensor* t : {&stage1[0], &stage1[2], &stage2[2]}) {
    TORCH_CHECK(t->defined() && t->dim() == 2, "care_ext.", op, ": prompt_w and resp1_w "
                "(weights [0] and [2] of each stage) must be 2-D");
  }
  // Stage-II's rollout first layer has no feature column: its width is the hidden size
  const int64_t H = stage2[2].size(1), Fp = stage1[0].size(1) - H;
  TORCH_CHECK(Fp >= 0, "care_ext.", op, ": stage1[0] (prompt_w) is narrower (",
              stage1[0].size(1), ") than the hidden size ", H, " (stage2[2]'s width)");
  const at::Device cpu(at::kCPU);
  const Weights w1 = check_weights(stage1, H, Fp, stage1[2].size(1) - H, -1, cpu, op, "stage1");
  const Weights w2 = check_weights(stage2, H, Fp, 0, -1, cpu, op, "stage2");
  const auto groups = step_groups(w1, w2, H);
  auto [s, total] = layouts(groups);
  check_packed(out, total, op, "out");
  float* base = out.data_ptr<float>();
  const auto f = fields(s);
  for (size_t i = 0; i < kSections; ++i) {
    pack_f32_panels_into(groups[i], *f[i], base);
    base += f32_panels_numel(*f[i]);
  }
}

}  // namespace care_ext
