// Host side of the fused acquisition step (private ops care_ext::_acquisition_step_fused and
// _acquisition_step_fused_split): argument checks, the device's group_features kernel, the
// first-layer GEMMs (ATen: MKL on the CPU, cuBLAS on CUDA) and the outputs; the per-prompt tail
// (step_tail.h) then runs as one CUDA kernel (csrc/cuda/step_fused.cu) or a loop over prompts
// (csrc/cpu/step_fused.cpp). Same semantics as acquisition_step, in ~8 launches on CUDA instead
// of ~30. The first layers are four float32 GEMMs, or, given first_layer_split (bf16 hidden
// states only), two bf16 tensor-core GEMMs, one per input, over both stages' weights split into
// bf16 pieces: exact products, float32 sums.
#include "classifier_parts.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

namespace care_ext {
namespace {

PreAct plain(const Tensor& t) { return PreAct{t.data_ptr<float>(), t.size(1), 1, 0}; }

// x [N, H] bf16 times the split weight [T, R, H] bf16 -> float32 [N, T*R]: the products of two
// bf16 numbers are exact in float32, so CUDA runs one bf16 tensor-core GEMM with float32
// accumulation and output; the CPU (no bf16 GEMM with float32 output in ATen) multiplies the same
// values in float32, which is exact too and only sums in another order.
Tensor split_products(const Tensor& x, const Tensor& split) {
  const Tensor w = split.reshape({split.size(0) * split.size(1), split.size(2)});
  if (x.is_cuda()) return at::mm(x, w.t(), at::kFloat);
  return x.to(at::kFloat).mm(w.to(at::kFloat).t());
}

}  // namespace

void check_split(at::TensorList split, const Tensor& h_prompt, const Tensor& h_resp, int64_t H,
                 int64_t rollout_units, int64_t prompt_units, const char* op, bool packed_ok) {
  TORCH_CHECK(split.size() == 2 || (packed_ok && split.size() == 4), "care_ext.", op,
              ": first_layer_split must hold 2 tensors (rollout and prompt first layers, from "
              "care_ext.bf16_split.first_layer_split)",
              packed_ok ? ", or 4 (those and their packing, pack_first_layer_split)" : "",
              ", got ", split.size());
  TORCH_CHECK(h_prompt.scalar_type() == at::kBFloat16 && h_resp.scalar_type() == at::kBFloat16,
              "care_ext.", op, ": first_layer_split needs bfloat16 hidden states (their products "
              "with the bf16 pieces are exact only then), got ", h_prompt.scalar_type(), " and ",
              h_resp.scalar_type());
  const char* names[2] = {"rollout", "prompt"};
  const int64_t units[2] = {rollout_units, prompt_units};
  for (size_t i = 0; i < 2; ++i) {
    const Tensor& t = split[i];
    TORCH_CHECK(t.defined() && t.scalar_type() == at::kBFloat16 && t.dim() == 3 &&
                    t.size(0) >= 1 && t.size(0) <= 3 && t.size(1) == units[i] && t.size(2) == H,
                "care_ext.", op, ": first_layer_split[", i, "] (", names[i],
                ") must be a bfloat16 [terms in 1..3, ", units[i], ", ", H, "] tensor, got ",
                t.defined() ? t.scalar_type() : at::ScalarType::Undefined, " ",
                t.defined() ? t.sizes() : at::IntArrayRef{});
    TORCH_CHECK(t.device() == h_resp.device(), "care_ext.", op, ": first_layer_split[", i,
                "] is on ", t.device(), " but the inputs are on ", h_resp.device());
  }
  TORCH_CHECK(split[0].size(0) == split[1].size(0), "care_ext.", op,
              ": both first_layer_split tensors must have the same number of terms, got ",
              split[0].size(0), " and ", split[1].size(0));
  if (split.size() == 4) {  // the pieces packed for oneDNN's BRGeMM (CPU)
    TORCH_CHECK(cpu_brgemm_available(), "care_ext.", op, ": first_layer_split holds packed "
                "pieces, but this CPU or torch has no AMX bf16 BRGeMM to use them "
                "(care_ext.bf16_split.cpu_brgemm_available() is False); pass the 2 pieces");
    for (size_t i = 0; i < 2; ++i) {
      const Tensor& p = split[i + 2];
      const int64_t want = H % 2 == 0 ? packed_bf16_numel(split[i].size(0) * units[i], H) : -1;
      TORCH_CHECK(p.defined() && p.scalar_type() == at::kBFloat16 && p.dim() == 1 &&
                      p.is_contiguous() && p.numel() == want && p.device() == h_resp.device(),
                  "care_ext.", op, ": first_layer_split[", i + 2, "] (", names[i], ", packed) "
                  "must be the contiguous 1-D bfloat16 packing of first_layer_split[", i,
                  "] (care_ext.bf16_split.pack_first_layer_split; ", want, " elements, H even), "
                  "got ", p.defined() ? p.scalar_type() : at::ScalarType::Undefined, " ",
                  p.defined() ? p.sizes() : at::IntArrayRef{}, " on ",
                  p.defined() ? p.device() : h_resp.device());
    }
  }
}

namespace {

// A 2-D weight as the tail reads it: through its own strides, not copied (a column-major weight,
// care_ext.ops.fused_step_layout, is what the CUDA kernel reads coalesced). Mat's strides are
// 32-bit: a view whose elements lie 2^31 or more apart (a slice of a huge tensor) is read from a
// contiguous copy instead, kept alive in `keep`.
Mat mat(const Tensor& t, std::vector<Tensor>& keep) {
  constexpr int64_t kMaxOffset = 2147483647LL;
  const int64_t extent = (t.size(0) - 1) * t.stride(0) + (t.size(1) - 1) * t.stride(1);
  const Tensor& m = t.numel() > 0 && extent >= kMaxOffset ? keep.emplace_back(t.contiguous()) : t;
  return Mat{m.data_ptr<float>(), static_cast<int>(m.stride(0)), static_cast<int>(m.stride(1))};
}

HeadWeights head_weights(const Weights& w, std::vector<Tensor>& keep, int64_t H, int64_t Fp,
                         int64_t Fr) {
  auto vec = [&](const Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<float>();
  };
  HeadWeights h{};
  h.pw = mat(w.pw, keep);
  h.r1w = mat(w.r1w, keep);
  h.r2w = mat(w.r2w, keep);
  h.h1w = mat(w.h1w, keep);
  h.h2w = mat(w.h2w, keep);
  h.pb = vec(w.pb);
  h.r1b = vec(w.r1b);
  h.r2b = vec(w.r2b);
  h.h1b = vec(w.h1b);
  h.h2b = vec(w.h2b);
  h.H = static_cast<int>(H);
  h.Fp = static_cast<int>(Fp);
  h.Fr = static_cast<int>(Fr);
  h.P = static_cast<int>(w.P);
  h.R1 = static_cast<int>(w.R1);
  h.R2 = static_cast<int>(w.R2);
  h.K = static_cast<int>(w.K);
  h.C = static_cast<int>(w.C);
  return h;
}

}  // namespace

FusedStep prepare_fused_step(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                             const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                             double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                             bool adv_unbiased, at::TensorList first_layer_split,
                             SideWork* side) {
  const char* op = fused_step_op_name(first_layer_split);
  const KernelDispatchGuard dispatch_guard;  // the first-layer GEMMs below stay float32
  check_step_inputs(ids, h_prompt, h_resp, op);
  const int64_t B = ids.size(0), G = ids.size(1), H = h_prompt.size(1);
  const auto dev = ids.device();
  const Weights w1 = check_weights(stage1, H, G + 1, 1, 2, dev, op, "stage1");
  const Weights w2 = check_weights(stage2, H, G + 1, 0, G + 1, dev, op, "stage2");
  const bool split = !first_layer_split.empty();
  if (split) check_split(first_layer_split, h_prompt, h_resp, H, w1.R1 + w2.R1, w1.P + w2.P, op);
  FusedStep f;
  f.B = B;
  // what the rollout GEMM does not wait for: the features and the prompt branches' GEMM(s)
  if (side != nullptr) side->begin();
  std::tie(f.rank, f.sizes, f.prompt_feat, f.len_norm, f.minority, f.cag, f.admissible, f.pseudo,
           f.pseudo_adv) =
      group_features_dispatch(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased);
  if (split) {  // one GEMM per input over both stages' stacked, split weights, read from bf16
    f.pre_p1 = split_products(h_prompt, first_layer_split[1]);
  } else {
    const Tensor hp = h_prompt.to(at::kFloat);
    f.pre_p1 = hp.mm(w1.pw.narrow(1, 0, H).t());
    f.pre_p2 = hp.mm(w2.pw.narrow(1, 0, H).t());
  }
  if (side != nullptr) side->end();
  if (split) {
    const int T = static_cast<int>(first_layer_split[0].size(0));
    f.pre_r1 = split_products(h_resp.reshape({B * G, H}), first_layer_split[0]);
    const float* r = f.pre_r1.data_ptr<float>();
    const float* p = f.pre_p1.data_ptr<float>();
    const int64_t Rt = w1.R1 + w2.R1, Pt = w1.P + w2.P;
    f.args.pre_r1 = PreAct{r, T * Rt, T, Rt};
    f.args.pre_r2 = PreAct{r + w1.R1, T * Rt, T, Rt};
    f.args.pre_p1 = PreAct{p, T * Pt, T, Pt};
    f.args.pre_p2 = PreAct{p + w1.P, T * Pt, T, Pt};
  } else {
    const Tensor hr = h_resp.reshape({B * G, H}).to(at::kFloat);  // bf16 read once, here
    f.pre_r1 = hr.mm(w1.r1w.narrow(1, 0, H).t());
    f.pre_r2 = hr.mm(w2.r1w.narrow(1, 0, H).t());
    f.args.pre_r1 = plain(f.pre_r1);
    f.args.pre_r2 = plain(f.pre_r2);
    f.args.pre_p1 = plain(f.pre_p1);
    f.args.pre_p2 = plain(f.pre_p2);
  }
  const auto fopt = h_prompt.options().dtype(at::kFloat);
  f.reliability = at::empty({B}, fopt);
  f.logits1 = at::empty({B, 2}, fopt);
  f.probs = at::empty({B, G + 1}, fopt);
  f.ecag = at::empty({B}, fopt);
  StepTailArgs& a = f.args;
  a.w1 = head_weights(w1, f.keep, H, G + 1, 1);
  a.w2 = head_weights(w2, f.keep, H, G + 1, 0);
  a.G = static_cast<int>(G);
  a.l2_mma = 0;             // the CUDA launch may run layer 2 on tensor cores (CARE_EXT_TAIL_L2)
  a.prompts_per_block = 1;  // the CUDA launch may group prompts (CARE_EXT_TAIL_PROMPTS)
  a.prompt_feat = f.prompt_feat.data_ptr<float>();
  a.len_norm = f.len_norm.data_ptr<float>();
  a.minority = f.minority.data_ptr<bool>();
  a.cag = f.cag.data_ptr<float>();
  a.admissible = f.admissible.data_ptr<bool>();
  a.reliability = f.reliability.data_ptr<float>();
  a.logits1 = f.logits1.data_ptr<float>();
  a.probs = f.probs.data_ptr<float>();
  a.ecag = f.ecag.data_ptr<float>();
  return f;
}

StepTuple FusedStep::outputs() const {
  return {rank, sizes, reliability, logits1, probs, ecag, cag, admissible, pseudo, pseudo_adv};
}

}  // namespace care_ext
