// Device-generic composites: the CARE classifier forward (BatchNorm folded into the Linear layers)
// and the fused acquisition step. Registered for CompositeExplicitAutograd, so the same code runs on
// CPU (MKL GEMMs) and CUDA (cuBLAS GEMMs); the per-prompt parts go through the dispatcher to the
// device's own group_features / expected_cag kernels, and the rollout branch (the GEMMs over all
// B*G hidden states, the bulk of the FLOPs) runs blocked on the CPU (cpu/rollout_pool.cpp) and
// dense elsewhere.
#include "classifier_parts.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace care_ext {
namespace {

constexpr const char* kWeightNames[10] = {"prompt_w", "prompt_b", "resp1_w", "resp1_b", "resp2_w",
                                          "resp2_b",  "head1_w",  "head1_b", "head2_w", "head2_b"};

// CPU: the blocked rollout branch; other devices: dense ATen ops (one GEMM per layer over all rows).
void rollout_pools(const Tensor& h_resp, int64_t B, int64_t G, std::vector<RolloutBranch>& branches) {
  if (h_resp.device().is_cpu()) {
    rollout_pools_cpu(h_resp, B, G, branches);
  } else {
    rollout_pools_dense(h_resp, B, G, branches);
  }
}

}  // namespace

Weights check_weights(at::TensorList w, int64_t H, int64_t Fp, int64_t Fr, int64_t expect_classes,
                      const at::Device& device, const char* op, const char* arg) {

  TORCH_CHECK(w.size() == 10, "care_ext.", op, ": ", arg,
              " must hold 10 tensors (prompt_w, prompt_b, resp1_w, resp1_b, resp2_w, resp2_b, "
              "head1_w, head1_b, head2_w, head2_b), got ",
              w.size());
  for (size_t i = 0; i < 10; ++i) {
    TORCH_CHECK(w[i].defined(), "care_ext.", op, ": ", arg, "[", i, "] (", kWeightNames[i],
                ") is undefined");
    TORCH_CHECK(w[i].scalar_type() == at::kFloat, "care_ext.", op, ": ", arg, "[", i, "] (",
                kWeightNames[i], ") must be float32, got ", w[i].scalar_type());
    TORCH_CHECK(w[i].device() == device, "care_ext.", op, ": ", arg, "[", i, "] (",
                kWeightNames[i], ") is on ", w[i].device(), " but the inputs are on ", device);
    TORCH_CHECK(w[i].dim() == (i % 2 == 0 ? 2 : 1), "care_ext.", op, ": ", arg, "[", i, "] (",
                kWeightNames[i], ") must be ", (i % 2 == 0 ? "2-D" : "1-D"), ", got shape ",
                w[i].sizes());
  }
  Weights r{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], 0, 0, 0, 0, 0};
  r.P = r.pw.size(0);
  r.R1 = r.r1w.size(0);
  r.R2 = r.r2w.size(0);
  r.K = r.h1w.size(0);
  r.C = r.h2w.size(0);
  auto expect = [&](size_t i, at::IntArrayRef want, const char* what) {
    TORCH_CHECK(w[i].sizes() == want, "care_ext.", op, ": ", arg, "[", i, "] (", kWeightNames[i],
                ") must have shape ", want, " (", what, "), got ", w[i].sizes());
  };
  expect(0, {r.P, H + Fp}, "[P, H + prompt features]");
  expect(1, {r.P}, "[P]");
  expect(2, {r.R1, H + Fr}, "[R1, H + rollout features]");
  expect(3, {r.R1}, "[R1]");
  expect(4, {r.R2, r.R1}, "[R2, R1]");
  expect(5, {r.R2}, "[R2]");
  expect(6, {r.K, r.P + r.R2}, "[K, P + R2]");
  expect(7, {r.K}, "[K]");
  expect(8, {r.C, r.K}, "[C, K]");
  expect(9, {r.C}, "[C]");
  if (expect_classes >= 0) {
    TORCH_CHECK(r.C == expect_classes, "care_ext.", op, ": ", arg, " has ", r.C,
                " output classes, expected ", expect_classes);
  }
  return r;
}

void check_hidden(const Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.defined() && t.dim() == dim, "care_ext.", op, ": ", name, " must be a ", dim, "-D ",
              shape, " tensor, got shape ", t.defined() ? t.sizes() : at::IntArrayRef{});
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "care_ext.", op, ": ",
              name, " must be float32, bfloat16 or float16, got ", st);
}

std::vector<float> feature_weights(const Tensor& wf_t) {
  const int64_t F = wf_t.size(0), U = wf_t.size(1);
  std::vector<float> out(static_cast<size_t>(F * U));
  if (F == 0) return out;
  const auto w = wf_t.accessor<float, 2>();
  for (int64_t f = 0; f < F; ++f) {
    for (int64_t u = 0; u < U; ++u) out[static_cast<size_t>(f * U + u)] = w[f][u];
  }
  return out;
}

namespace {

// head_from_prompt_pre on the CPU in fewer passes: one pass adds the prompt features' products
// to `pre` and applies relu into the first P columns of the head's input [B, P + R2] (the pool
// copied beside them), then head layer 1 is one GEMM over K = P + R2 (no bias), one pass adds
// h1b and applies relu, and head layer 2 is an addmm. The same products as the ATen composite;
// layer 1's two GEMMs become one float32 sum (on the AVX2 GEMM where cpu_f32_gemm_selected(H),
// on `h1`'s panels where the step's weights come packed).
Tensor head_cpu(const Weights& w, const Tensor& pre, const Tensor& prompt_feat,
                const Tensor& pool, const F32Panels* h1) {
  const int64_t B = pre.size(0), P = w.P, R2 = w.R2, Fp = prompt_feat.size(1);
  const int64_t H = w.pw.size(1) - Fp;
  Tensor zin = at::empty({B, P + R2}, pre.options());
  zin.narrow(1, P, R2).copy_(pool);
  const std::vector<float> wf = feature_weights(w.pw.narrow(1, H, Fp).t());  // [Fp, P]
  const Tensor feat = prompt_feat.to(at::kFloat);
  const float* fp = feat.const_data_ptr<float>();
  const float* pp = pre.const_data_ptr<float>();
  const int64_t f0 = feat.stride(0), f1 = feat.stride(1), p0 = pre.stride(0), p1 = pre.stride(1);
  float* zp = zin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = zp + b * (P + R2);
    for (int64_t u = 0; u < P; ++u) row[u] = pp[b * p0 + u * p1];
    add_features_relu(row, P, Fp > 0 ? fp + b * f0 : nullptr, f1, Fp, wf.data());
  }
  const int64_t K = w.K;
  Tensor z;  // [B, K] at row stride ldz
  int64_t ldz = K;
  if (h1 != nullptr || cpu_f32_gemm_selected(H)) {  // the AVX2 GEMM; h1b is added below
    const F32Panels f = h1 != nullptr ? *h1 : pack_f32_panels({{w.h1w.t(), Tensor()}});
    ldz = f.panels * kF32Panel;
    z = at::empty({B, ldz}, zin.options());
    f32_gemm_panels_parallel(zin.const_data_ptr<float>(), P + R2, B, f, 0, f.panels,
                             z.data_ptr<float>(), ldz);
    z = z.narrow(1, 0, K);
  } else {
    z = at::mm(zin, w.h1w.t());
  }
  const Tensor h1b = w.h1b.contiguous();
  const float* __restrict__ bias = h1b.const_data_ptr<float>();
  float* zz = z.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict__ row = zz + b * ldz;
    for (int64_t k = 0; k < K; ++k) row[k] = std::max(row[k] + bias[k], 0.0f);
  }
  return w.h2b.addmm(z, w.h2w.t());
}

}  // namespace

Tensor head_from_prompt_pre(const Weights& w, Tensor pre, const Tensor& prompt_feat,
                            const Tensor& pool, const F32Panels* h1) {
  if (pre.device().is_cpu() && pre.scalar_type() == at::kFloat &&
      pool.scalar_type() == at::kFloat && pre.size(0) > 0) {
    return head_cpu(w, pre, prompt_feat, pool, h1);
  }
  const int64_t H = w.pw.size(1) - prompt_feat.size(1);
  Tensor p = pre.addmm_(prompt_feat, w.pw.narrow(1, H, prompt_feat.size(1)).t()).relu_();
  Tensor z = w.h1b.addmm(p, w.h1w.narrow(1, 0, w.P).t());
  z.addmm_(pool, w.h1w.narrow(1, w.P, w.R2).t()).relu_();
  return w.h2b.addmm(z, w.h2w.t());
}

Tensor prompt_and_head(const Weights& w, const Tensor& h_prompt, const Tensor& prompt_feat,
                       const Tensor& pool) {
  if (h_prompt.device().is_cpu() && h_prompt.size(0) > 0 &&
      cpu_f32_gemm_selected(h_prompt.size(1))) {
    const int64_t H = h_prompt.size(1);
    const Tensor pre = f32_linear_groups(h_prompt, {{w.pw.narrow(1, 0, H).t(), w.pb}})[0];
    return head_from_prompt_pre(w, pre, prompt_feat, pool);
  }
  const Tensor hp = h_prompt.to(at::kFloat);
  const int64_t H = hp.size(1);
  return head_from_prompt_pre(w, w.pb.addmm(hp, w.pw.narrow(1, 0, H).t()), prompt_feat, pool);
}

AdjacentColumns adjacent_columns(const Tensor& a, const Tensor& bias_a, const Tensor& b,
                                 const Tensor& bias_b) {
  if (a.dim() != 2 || b.dim() != 2 || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || a.size(0) != b.size(0) || a.size(0) < 1 ||
      a.size(1) < 1 || b.size(1) < 1 || a.stride(1) != 1 || b.stride(1) != 1 ||
      a.stride(0) != b.stride(0) || a.stride(0) < a.size(1) + b.size(1) || !a.is_alias_of(b)) {
    return {};
  }
  const int64_t gap = b.storage_offset() - a.storage_offset();
  if (gap != a.size(1) && gap != -b.size(1)) return {};
  const bool a_first = gap == a.size(1);
  const Tensor& first = a_first ? a : b;
  AdjacentColumns r;
  r.w = first.as_strided({a.size(0), a.size(1) + b.size(1)}, {a.stride(0), 1},
                         first.storage_offset());
  r.bias = a_first ? at::cat({bias_a, bias_b}) : at::cat({bias_b, bias_a});
  r.off_a = a_first ? 0 : b.size(1);
  r.off_b = a_first ? a.size(1) : 0;
  return r;
}

void rollout_pools_dense(const Tensor& h_resp, int64_t B, int64_t G,
                         std::vector<RolloutBranch>& branches) {
  const Tensor hr = h_resp.to(at::kFloat);  // a bf16 input is read once, here
  const int64_t H = hr.size(1);
  for (RolloutBranch& br : branches) {
    const Weights& w = *br.w;
    Tensor r1 = w.r1b.addmm(hr, w.r1w.narrow(1, 0, H).t());
    r1.addmm_(br.feat, w.r1w.narrow(1, H, br.feat.size(1)).t()).relu_();
    Tensor r2 = w.r2b.addmm(r1, w.r2w.t()).relu_().view({B, G, w.R2});
    if (br.mask.defined()) {
      Tensor m = br.mask.to(at::kFloat);
      br.pool = r2.mul(m.unsqueeze(-1)).sum({1}).div_(m.sum({1}, true).clamp_min_(1.0));
    } else {
      br.pool = r2.mean({1});
    }
  }
}

Tensor classifier_forward(const Tensor& h_prompt, const Tensor& prompt_feat, const Tensor& h_resp,
                          const std::optional<Tensor>& resp_feat,
                          const std::optional<Tensor>& resp_mask, at::TensorList weights) {
  const char* op = "classifier_forward";
  const KernelDispatchGuard dispatch_guard;
  check_hidden(h_prompt, 2, op, "h_prompt", "[B, H]");
  check_hidden(h_resp, 3, op, "h_resp", "[B, G, H]");
  const int64_t B = h_prompt.size(0), H = h_prompt.size(1), G = h_resp.size(1);
  TORCH_CHECK(h_resp.size(0) == B && h_resp.size(2) == H, "care_ext.", op,
              ": h_resp must have shape [B, G, H] = [", B, ", G, ", H, "], got ", h_resp.sizes());
  TORCH_CHECK(G >= 1, "care_ext.", op, ": h_resp must have G >= 1 rollouts, got ", G);
  TORCH_CHECK(prompt_feat.dim() == 2 && prompt_feat.size(0) == B && prompt_feat.is_floating_point(),
              "care_ext.", op, ": prompt_feat must be a floating [B, Fp] tensor with B = ", B,
              ", got ", prompt_feat.scalar_type(), " ", prompt_feat.sizes());
  const auto dev = h_prompt.device();
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&h_resp, "h_resp"},
                                {&prompt_feat, "prompt_feat"}}) {
    TORCH_CHECK(t->device() == dev, "care_ext.", op, ": ", name, " is on ", t->device(),
                " but h_prompt is on ", dev);
  }
  Tensor rf;
  if (resp_feat.has_value() && resp_feat->defined()) {
    const Tensor& f = *resp_feat;
    TORCH_CHECK(f.dim() == 3 && f.size(0) == B && f.size(1) == G && f.is_floating_point(),
                "care_ext.", op, ": resp_feat must be a floating [B, G, Fr] tensor with B = ", B,
                ", G = ", G, ", got ", f.scalar_type(), " ", f.sizes());
    TORCH_CHECK(f.device() == dev, "care_ext.", op, ": resp_feat is on ", f.device(),
                " but h_prompt is on ", dev);
    rf = f.reshape({B * G, f.size(2)}).to(at::kFloat);
  } else {
    rf = h_prompt.new_empty({B * G, 0}, h_prompt.options().dtype(at::kFloat));
  }
  Tensor mask;
  if (resp_mask.has_value() && resp_mask->defined()) {
    mask = *resp_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                    mask.size(1) == G,
                "care_ext.", op, ": resp_mask must be a bool [B, G] tensor with B = ", B,
                ", G = ", G, ", got ", mask.scalar_type(), " ", mask.sizes());
    TORCH_CHECK(mask.device() == dev, "care_ext.", op, ": resp_mask is on ", mask.device(),
                " but h_prompt is on ", dev);
  }
  const Weights w =
      check_weights(weights, H, prompt_feat.size(1), rf.size(1), -1, dev, op, "weights");
  std::vector<RolloutBranch> branch{{&w, rf, mask, Tensor()}};
  rollout_pools(h_resp.reshape({B * G, H}), B, G, branch);
  return prompt_and_head(w, h_prompt, prompt_feat.to(at::kFloat), branch[0].pool);
}

void check_step_inputs(const Tensor& ids, const Tensor& h_prompt, const Tensor& h_resp,
                       const char* op) {
  check_hidden(h_prompt, 2, op, "h_prompt", "[B, H]");
  check_hidden(h_resp, 3, op, "h_resp", "[B, G, H]");
  TORCH_CHECK(ids.dim() == 2, "care_ext.", op, ": ids must be a 2-D [B, G] tensor, got shape ",
              ids.sizes());
  const int64_t B = ids.size(0), G = ids.size(1), H = h_prompt.size(1);
  TORCH_CHECK(h_prompt.size(0) == B, "care_ext.", op, ": h_prompt must have B = ", B,
              " rows (ids has shape ", ids.sizes(), "), got ", h_prompt.sizes());
  TORCH_CHECK(h_resp.size(0) == B && h_resp.size(1) == G && h_resp.size(2) == H, "care_ext.", op,
              ": h_resp must have shape [B, G, H] = [", B, ", ", G, ", ", H, "], got ",
              h_resp.sizes());
  const auto dev = ids.device();
  TORCH_CHECK(h_prompt.device() == dev && h_resp.device() == dev, "care_ext.", op,
              ": h_prompt (", h_prompt.device(), ") and h_resp (", h_resp.device(),
              ") must be on the device of ids (", dev, ")");
}

FeatureTuple group_features_dispatch(const Tensor& ids, const Tensor& lengths, double max_len,
                                     double cag_eps, bool cag_unbiased, double adv_eps,
                                     bool adv_unbiased) {
  static auto features_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("care_ext::group_features", "")
          .typed<FeatureTuple(const Tensor&, const Tensor&, double, double, bool, double, bool)>();
  return features_op.call(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased);
}

namespace {

// acquisition_step, or with `split` non-empty (first_layer_split; CPU, bf16 hidden states) its
// first layers' hidden products from the split bf16 pieces: MKL's bf16 GEMM on the 2 pieces, or
// with 4 tensors oneDNN's BRGeMM on their packing (split[2], split[3]).
StepTuple step_impl(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                    const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                    double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                    bool adv_unbiased, at::TensorList split, const char* op,
                    const Tensor& f32_packed = Tensor()) {
  const KernelDispatchGuard dispatch_guard;
  static auto expected_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("care_ext::expected_cag", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>();
  check_step_inputs(ids, h_prompt, h_resp, op);
  const int64_t B = ids.size(0), G = ids.size(1), H = h_prompt.size(1);
  const auto dev = ids.device();
  auto [rank, sizes, prompt_feat, len_norm, minority, cag, admissible, pseudo, pseudo_adv] =
      group_features_dispatch(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased);
  const Weights w1 = check_weights(stage1, H, G + 1, 1, 2, dev, op, "stage1");
  const Weights w2 = check_weights(stage2, H, G + 1, 0, G + 1, dev, op, "stage2");
  const bool with_split = !split.empty();
  std::optional<StepF32Panels> f32;  // the float32 weights packed once (_pack_f32_step)
  if (f32_packed.defined()) {
    TORCH_CHECK(dev.is_cpu(), "care_ext.", op, ": runs on the CPU; got inputs on ", dev);
    TORCH_INTERNAL_ASSERT(!with_split);
    f32 = step_f32_panels(w1, w2, H, f32_packed, op);
  }
  const StepF32Panels* pf = f32.has_value() ? &*f32 : nullptr;
  if (with_split) {
    TORCH_CHECK(dev.is_cpu(), "care_ext.", op, ": runs on the CPU; got inputs on ", dev);
    check_split(split, h_prompt, h_resp, H, w1.R1 + w2.R1, w1.P + w2.P, op, /*packed_ok=*/true);
  }
  // BRGeMM on the packed pieces; MKL on the plain ones while torch.backends.mkldnn is disabled
  const bool packed = with_split && split.size() == 4 && cpu_brgemm_enabled();
  // Stage-I pools all G rollouts with the normalised length as their feature; Stage-II pools the
  // valid non-majority rollouts with no rollout feature. Both read the hidden states once.
  std::vector<RolloutBranch> branches{
      {&w1, len_norm.reshape({B * G, 1}), Tensor(), Tensor()},
      {&w2, len_norm.new_empty({B * G, 0}), minority, Tensor()}};
  const Tensor hr = h_resp.reshape({B * G, H});
  if (with_split) {  // Stage-I's units first in the split pieces, then Stage-II's
    rollout_pools_cpu(hr, B, G, branches, split[0], {0, w1.R1}, packed ? split[2] : Tensor());
  } else if (pf != nullptr) {
    rollout_pools_cpu(hr, B, G, branches, Tensor(), {}, Tensor(), pf);
  } else {
    rollout_pools(hr, B, G, branches);
  }
  Tensor pre1, pre2;
  if (with_split) {  // both prompt branches from one bf16 GEMM over all T pieces
    const int64_t T = split[1].size(0), Pt = w1.P + w2.P;
    const Tensor c = packed ? bf16_products_packed(h_prompt, split[3], T * Pt)
                            : bf16_products(h_prompt, split[1].reshape({T * Pt, H}));
    pre1 = at::empty({B, w1.P}, c.options());
    pre2 = at::empty({B, w2.P}, c.options());
    const Tensor b1 = w1.pb.contiguous(), b2 = w2.pb.contiguous();
    sum_split_terms(c.const_data_ptr<float>(), T * Pt, T, Pt, 0, b1.const_data_ptr<float>(),
                    w1.P, nullptr, B, pre1.data_ptr<float>(), w1.P);
    sum_split_terms(c.const_data_ptr<float>(), T * Pt, T, Pt, w1.P, b2.const_data_ptr<float>(),
                    w2.P, nullptr, B, pre2.data_ptr<float>(), w2.P);
  } else if (dev.is_cpu() && B > 0 && (pf != nullptr || cpu_f32_gemm_selected(H))) {
    // the AVX2 GEMM: both prompt branches' hidden columns on panels side by side, packed once
    // (pf) or here from whatever layout
    const F32Panels f = pf != nullptr ? pf->prompt
                                      : pack_f32_panels({{w1.pw.narrow(1, 0, H).t(), w1.pb},
                                                         {w2.pw.narrow(1, 0, H).t(), w2.pb}});
    const Tensor c = f32_linear_panels(h_prompt, f);
    pre1 = c.narrow(1, f.first[0] * kF32Panel, w1.P);
    pre2 = c.narrow(1, f.first[1] * kF32Panel, w2.P);
  } else {
    const Tensor hp = h_prompt.to(at::kFloat);  // converted once for both prompt branches
    // Both prompt branches' hidden columns: one GEMM where the weights share one row-major
    // buffer (the CARE core's CPU layout, care_ext.ops.core_step_layout), else one GEMM each.
    const Tensor p1h = w1.pw.narrow(1, 0, H).t(), p2h = w2.pw.narrow(1, 0, H).t();
    const AdjacentColumns both =
        dev.is_cpu() ? adjacent_columns(p1h, w1.pb, p2h, w2.pb) : AdjacentColumns{};
    if (both.w.defined()) {
      const Tensor pre = both.bias.addmm(hp, both.w);
      pre1 = pre.narrow(1, both.off_a, w1.P);
      pre2 = pre.narrow(1, both.off_b, w2.P);
    } else {
      pre1 = w1.pb.addmm(hp, p1h);
      pre2 = w2.pb.addmm(hp, p2h);
    }
  }
  const Tensor logits1 = head_from_prompt_pre(w1, pre1, prompt_feat, branches[0].pool,
                                              pf != nullptr ? &pf->head[0] : nullptr);
  const Tensor logits2 = head_from_prompt_pre(w2, pre2, prompt_feat, branches[1].pool,
                                              pf != nullptr ? &pf->head[1] : nullptr);
  auto [probs, ecag] = expected_op.call(logits2, cag, admissible);
  Tensor reliability = logits1.softmax(1).select(1, 1).contiguous();
  return {rank, sizes, reliability, logits1, probs, ecag, cag, admissible, pseudo, pseudo_adv};
}

}  // namespace

StepTuple acquisition_step(const Tensor& ids, const Tensor& lengths, const Tensor& h_prompt,
                           const Tensor& h_resp, at::TensorList stage1, at::TensorList stage2,
                           double max_len, double cag_eps, bool cag_unbiased, double adv_eps,
                           bool adv_unbiased) {
  return step_impl(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps, cag_unbiased,
                   adv_eps, adv_unbiased, {}, "acquisition_step");
}

StepTuple acquisition_step_split_cpu(const Tensor& ids, const Tensor& lengths,
                                     const Tensor& h_prompt, const Tensor& h_resp,
                                     at::TensorList stage1, at::TensorList stage2, double max_len,
                                     double cag_eps, bool cag_unbiased, double adv_eps,
                                     bool adv_unbiased, at::TensorList first_layer_split) {
  TORCH_CHECK(!first_layer_split.empty(), "care_ext._acquisition_step_split: first_layer_split "
              "must hold 2 tensors (care_ext.bf16_split.first_layer_split), got none");
  return step_impl(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps, cag_unbiased,
                   adv_eps, adv_unbiased, first_layer_split, "_acquisition_step_split");
}

StepTuple acquisition_step_f32_packed_cpu(const Tensor& ids, const Tensor& lengths,
                                          const Tensor& h_prompt, const Tensor& h_resp,
                                          at::TensorList stage1, at::TensorList stage2,
                                          double max_len, double cag_eps, bool cag_unbiased,
                                          double adv_eps, bool adv_unbiased,
                                          const Tensor& packed) {
  return step_impl(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps, cag_unbiased,
                   adv_eps, adv_unbiased, {}, "_acquisition_step_f32_packed", packed);
}

}  // namespace care_ext
