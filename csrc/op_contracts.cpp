// Argument contracts of every op: one place for the checks both backends share.
// Each prepare_* validates (rank, dtype, device, G), makes inputs contiguous and allocates outputs.
#include "care_ext.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>

#include <cmath>

namespace care_ext {
namespace {

void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.defined(), "care_ext.", op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "care_ext.", op, ": ", name, " must be a ", dim, "-D ", shape,
              " tensor, got shape ", t.sizes());
}

void check_dtype(const Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "care_ext.", op, ": ", name, " must have dtype ", want,
              ", got ", t.scalar_type());
}

void check_floating(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "care_ext.", op,
              ": ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_group(int64_t G, const char* op, const char* name) {
  TORCH_CHECK(G >= 1 && G <= kMaxGroupSize, "care_ext.", op, ": ", name, " has G = ", G,
              " rollouts per prompt; supported is 1 <= G <= ", kMaxGroupSize);
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* na,
                       const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "care_ext.", op, ": ", nb, " is on ", b.device(),
              " but ", na, " is on ", a.device());
}

void check_same_shape(const Tensor& a, const Tensor& b, const char* op, const char* na,
                      const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes(), "care_ext.", op, ": ", nb, " has shape ", b.sizes(),
              " but ", na, " has shape ", a.sizes());
}

}  // namespace

ClusterArgs prepare_cluster_stats(const Tensor& ids) {
  const char* op = "cluster_stats";
  check_dim(ids, 2, op, "ids", "[B, G]");
  check_dtype(ids, at::kLong, op, "ids");
  ClusterArgs a;
  a.B = ids.size(0);
  a.G = ids.size(1);
  check_group(a.G, op, "ids");
  a.ids = ids.contiguous();
  a.rank = at::empty({a.B, a.G}, ids.options());
  a.sizes = at::empty({a.B, a.G}, ids.options());
  return a;
}

AdvantageArgs prepare_group_advantage(const Tensor& rewards) {
  const char* op = "group_advantage";
  check_dim(rewards, 2, op, "rewards", "[B, G]");
  check_floating(rewards, op, "rewards");
  AdvantageArgs a;
  a.B = rewards.size(0);
  a.G = rewards.size(1);
  check_group(a.G, op, "rewards");
  a.rewards = rewards.contiguous();
  a.out = at::empty({a.B, a.G}, rewards.options());
  return a;
}

CagArgs prepare_cag(const Tensor& r_gt, const Tensor& r_ps) {
  const char* op = "cag";
  check_dim(r_gt, 2, op, "r_gt", "[B, G]");
  check_dim(r_ps, 2, op, "r_ps", "[B, G]");
  check_floating(r_gt, op, "r_gt");
  check_dtype(r_ps, r_gt.scalar_type(), op, "r_ps");
  check_same_shape(r_gt, r_ps, op, "r_gt", "r_ps");
  check_same_device(r_gt, r_ps, op, "r_gt", "r_ps");
  CagArgs a;
  a.B = r_gt.size(0);
  a.G = r_gt.size(1);
  check_group(a.G, op, "r_gt");
  a.r_gt = r_gt.contiguous();
  a.r_ps = r_ps.contiguous();
  a.out = at::empty({a.B}, r_gt.options());
  return a;
}

ClasswiseArgs prepare_classwise_cag(const Tensor& sizes) {
  const char* op = "classwise_cag";
  check_dim(sizes, 2, op, "sizes", "[B, G]");
  check_dtype(sizes, at::kLong, op, "sizes");
  ClasswiseArgs a;
  a.B = sizes.size(0);
  a.G = sizes.size(1);
  check_group(a.G, op, "sizes");
  a.sizes = sizes.contiguous();
  a.cag = at::empty({a.B, a.G + 1}, sizes.options().dtype(at::kFloat));
  a.admissible = at::empty({a.B, a.G + 1}, sizes.options().dtype(at::kBool));
  return a;
}

ExpectedArgs prepare_expected_cag(const Tensor& logits, const Tensor& cag,
                                  const Tensor& admissible) {
  const char* op = "expected_cag";
  check_dim(logits, 2, op, "logits", "[B, C]");
  check_dim(cag, 2, op, "cag", "[B, C]");
  check_dim(admissible, 2, op, "admissible", "[B, C]");
  check_floating(logits, op, "logits");
  check_dtype(cag, logits.scalar_type(), op, "cag");
  check_dtype(admissible, at::kBool, op, "admissible");
  check_same_shape(logits, cag, op, "logits", "cag");
  check_same_shape(logits, admissible, op, "logits", "admissible");
  check_same_device(logits, cag, op, "logits", "cag");
  check_same_device(logits, admissible, op, "logits", "admissible");
  ExpectedArgs a;
  a.B = logits.size(0);
  a.C = logits.size(1);
  TORCH_CHECK(a.C >= 1 && a.C <= kMaxGroupSize + 1, "care_ext.", op, ": logits has C = ", a.C,
              " classes; supported is 1 <= C <= ", kMaxGroupSize + 1);
  a.logits = logits.contiguous();
  a.cag = cag.contiguous();
  a.admissible = admissible.contiguous();
  a.probs = at::empty({a.B, a.C}, logits.options());
  a.ecag = at::empty({a.B}, logits.options());
  return a;
}

FeatureArgs prepare_group_features(const Tensor& ids, const Tensor& lengths, double max_len) {
  const char* op = "group_features";
  check_dim(ids, 2, op, "ids", "[B, G]");
  check_dtype(ids, at::kLong, op, "ids");
  check_dim(lengths, 2, op, "lengths", "[B, G]");
  TORCH_CHECK(!lengths.is_complex() && lengths.scalar_type() != at::kBool, "care_ext.", op,
              ": lengths must be a real number tensor, got ", lengths.scalar_type());
  check_same_shape(ids, lengths, op, "ids", "lengths");
  check_same_device(ids, lengths, op, "ids", "lengths");
  TORCH_CHECK(std::isfinite(max_len) && max_len > 0, "care_ext.", op,
              ": max_len must be a finite positive number, got ", max_len);
  FeatureArgs a;
  a.B = ids.size(0);
  a.G = ids.size(1);
  check_group(a.G, op, "ids");
  a.ids = ids.contiguous();
  // read in place where the kernels can (Lengths); other dtypes as a float32 copy, the same values
  const auto lt = lengths.scalar_type();
  const bool in_place =
      lt == at::kFloat || lt == at::kDouble || lt == at::kLong || lt == at::kInt;
  a.lengths = (in_place ? lengths : lengths.to(at::kFloat)).contiguous();
  const auto i64 = ids.options();
  const auto f32 = ids.options().dtype(at::kFloat);
  const auto b8 = ids.options().dtype(at::kBool);
  a.rank = at::empty({a.B, a.G}, i64);
  a.sizes = at::empty({a.B, a.G}, i64);
  a.prompt_feat = at::empty({a.B, a.G + 1}, f32);
  a.len_norm = at::empty({a.B, a.G}, f32);
  a.minority_mask = at::empty({a.B, a.G}, b8);
  a.cag = at::empty({a.B, a.G + 1}, f32);
  a.admissible = at::empty({a.B, a.G + 1}, b8);
  a.pseudo_rewards = at::empty({a.B, a.G}, f32);
  a.pseudo_adv = at::empty({a.B, a.G}, f32);
  return a;
}

Lengths FeatureArgs::lengths_view() const {
  switch (lengths.scalar_type()) {
    case at::kDouble: return Lengths{lengths.const_data_ptr<double>(), LengthKind::kDouble};
    case at::kLong: return Lengths{lengths.const_data_ptr<int64_t>(), LengthKind::kLong};
    case at::kInt: return Lengths{lengths.const_data_ptr<int32_t>(), LengthKind::kInt};
    default: return Lengths{lengths.const_data_ptr<float>(), LengthKind::kFloat};
  }
}

std::vector<CopyPair> prepare_copy_into(at::TensorList dst, at::TensorList src) {
  const char* op = "_copy_into";
  TORCH_CHECK(dst.size() == src.size(), "care_ext.", op, ": dst holds ", dst.size(),
              " tensors but src holds ", src.size());
  std::vector<CopyPair> pairs;
  pairs.reserve(dst.size());
  for (size_t i = 0; i < dst.size(); ++i) {
    const Tensor& d = dst[i];
    const Tensor& s = src[i];
    TORCH_CHECK(d.defined() && s.defined(), "care_ext.", op, ": dst[", i, "] or src[", i,
                "] is undefined");
    TORCH_CHECK(d.device() == dst[0].device() && s.device() == dst[0].device(), "care_ext.", op,
                ": every tensor must be on ", dst[0].device(), " (dst[0]'s device), got dst[", i,
                "] on ", d.device(), " and src[", i, "] on ", s.device());
    TORCH_CHECK(d.scalar_type() == s.scalar_type(), "care_ext.", op, ": dst[", i, "] is ",
                d.scalar_type(), " but src[", i, "] is ", s.scalar_type(), " (no casting)");
    TORCH_CHECK(d.sizes() == s.sizes(), "care_ext.", op, ": dst[", i, "] has shape ", d.sizes(),
                " but src[", i, "] has shape ", s.sizes(), " (no broadcasting)");
    TORCH_CHECK(d.is_contiguous(), "care_ext.", op, ": dst[", i, "] must be contiguous");
    if (d.numel() == 0) continue;
    if (d.is_alias_of(s) && d.storage_offset() == s.storage_offset() &&
        d.strides() == s.strides())
      continue;  // the buffer itself: nothing to copy
    at::assert_no_overlap(d, s);
    pairs.push_back(CopyPair{d, s, static_cast<int64_t>(d.nbytes()), s.is_contiguous()});
  }
  return pairs;
}

}  // namespace care_ext
