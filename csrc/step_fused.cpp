// Host side of the fused acquisition step (private op care_ext::_acquisition_step_fused): argument
// checks, the device's group_features kernel, the four first-layer GEMMs (ATen: MKL on the CPU,
// cuBLAS on CUDA) and the outputs; the per-prompt tail (step_tail.h) then runs as one CUDA kernel
// (csrc/cuda/step_fused.cu) or a loop over prompts (csrc/cpu/step_fused.cpp). Same semantics as
// acquisition_step, in ~8 launches on CUDA instead of ~30.
#include "classifier_parts.h"

namespace care_ext {
namespace {

HeadWeights head_weights(const Weights& w, std::vector<Tensor>& keep, int64_t H, int64_t Fp,
                         int64_t Fr) {
  auto ptr = [&](const Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<float>();
  };
  HeadWeights h{};
  h.pw = ptr(w.pw);
  h.pb = ptr(w.pb);
  h.r1w = ptr(w.r1w);
  h.r1b = ptr(w.r1b);
  h.r2w = ptr(w.r2w);
  h.r2b = ptr(w.r2b);
  h.h1w = ptr(w.h1w);
  h.h1b = ptr(w.h1b);
  h.h2w = ptr(w.h2w);
  h.h2b = ptr(w.h2b);
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
                             bool adv_unbiased) {
  const char* op = "_acquisition_step_fused";
  check_step_inputs(ids, h_prompt, h_resp, op);
  const int64_t B = ids.size(0), G = ids.size(1), H = h_prompt.size(1);
  const auto dev = ids.device();
  FusedStep f;
  f.B = B;
  std::tie(f.rank, f.sizes, f.prompt_feat, f.len_norm, f.minority, f.cag, f.admissible, f.pseudo,
           f.pseudo_adv) =
      group_features_dispatch(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased);
  const Weights w1 = check_weights(stage1, H, G + 1, 1, 2, dev, op, "stage1");
  const Weights w2 = check_weights(stage2, H, G + 1, 0, G + 1, dev, op, "stage2");
  const Tensor hp = h_prompt.to(at::kFloat);
  const Tensor hr = h_resp.reshape({B * G, H}).to(at::kFloat);  // bf16 read once, here
  f.pre_r1 = hr.mm(w1.r1w.narrow(1, 0, H).t());
  f.pre_r2 = hr.mm(w2.r1w.narrow(1, 0, H).t());
  f.pre_p1 = hp.mm(w1.pw.narrow(1, 0, H).t());
  f.pre_p2 = hp.mm(w2.pw.narrow(1, 0, H).t());
  const auto fopt = hp.options();
  f.reliability = hp.new_empty({B}, fopt);
  f.logits1 = hp.new_empty({B, 2}, fopt);
  f.probs = hp.new_empty({B, G + 1}, fopt);
  f.ecag = hp.new_empty({B}, fopt);
  StepTailArgs& a = f.args;
  a.w1 = head_weights(w1, f.keep, H, G + 1, 1);
  a.w2 = head_weights(w2, f.keep, H, G + 1, 0);
  a.G = static_cast<int>(G);
  a.pre_r1 = f.pre_r1.data_ptr<float>();
  a.pre_r2 = f.pre_r2.data_ptr<float>();
  a.pre_p1 = f.pre_p1.data_ptr<float>();
  a.pre_p2 = f.pre_p2.data_ptr<float>();
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
