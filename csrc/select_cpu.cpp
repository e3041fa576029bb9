// CPU implementations of the selection ops. They define the reference semantics that the CUDA
// kernels reproduce bit for bit (same keys, quotas and random draws: select_common.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <utility>
#include <vector>

#include "select_checks.h"
#include "select_common.h"

namespace cggr {
namespace {

template <typename scalar_t>
void fill_keys(const scalar_t* scores, const bool* valid, int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = (valid == nullptr || valid[i]) ? order_key(static_cast<float>(scores[i])) : kInvalidKey;
  }
}

// Keys of a contiguous scores tensor (invalid tokens -> kInvalidKey).
std::vector<uint32_t> compute_keys(const at::Tensor& scores, const at::Tensor& valid) {
  const int64_t n = scores.numel();
  std::vector<uint32_t> keys(static_cast<size_t>(n));
  const bool* v = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  switch (scores.scalar_type()) {
    case at::kFloat:
      fill_keys(scores.const_data_ptr<float>(), v, n, keys.data());
      break;
    case at::kBFloat16:
      fill_keys(scores.const_data_ptr<at::BFloat16>(), v, n, keys.data());
      break;
    case at::kHalf:
      fill_keys(scores.const_data_ptr<at::Half>(), v, n, keys.data());
      break;
    default:
      TORCH_CHECK(false, "cggr: unexpected scores dtype ", scores.scalar_type());
  }
  return keys;
}

int64_t count_valid(const std::vector<uint32_t>& keys) {
  return static_cast<int64_t>(keys.size()) - std::count(keys.begin(), keys.end(), kInvalidKey);
}

// Marks (ORs into out) the k largest keys of keys[0, n), ties to the lower index. Requires k <= the
// number of non-invalid keys, so invalid keys are never marked. O(n).
void mark_top_keys(const uint32_t* keys, int64_t n, int64_t k, bool* out) {
  if (k <= 0) return;
  std::vector<uint32_t> work(keys, keys + n);
  std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<uint32_t>());
  const uint32_t threshold = work[static_cast<size_t>(k - 1)];
  int64_t greater = 0;
  for (int64_t i = 0; i < n; ++i) greater += keys[i] > threshold;
  int64_t ties_left = k - greater;
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] > threshold) {
      out[i] = true;
    } else if (keys[i] == threshold && ties_left > 0) {
      out[i] = true;
      --ties_left;
    }
  }
}

struct Prepared {
  at::Tensor scores;  // contiguous
  at::Tensor valid;   // contiguous or undefined
  float ratio;
};

Prepared prepare(const at::Tensor& scores, const std::optional<at::Tensor>& valid, const at::Tensor& ratio,
                 const char* op) {
  check_scores(scores, op);
  const bool has_valid = check_valid_and_ratio(scores, valid, ratio, op);
  return {scores.contiguous(), has_valid ? valid->contiguous() : at::Tensor(), *ratio.const_data_ptr<float>()};
}

at::Tensor select_topk_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& valid, const at::Tensor& ratio) {
  const Prepared in = prepare(scores, valid, ratio, "select_topk");
  at::Tensor mask = at::zeros(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t n = in.scores.numel();
  if (n == 0) return mask;
  const std::vector<uint32_t> keys = compute_keys(in.scores, in.valid);
  const int64_t k = quota_from_ratio(in.ratio, count_valid(keys));
  mark_top_keys(keys.data(), n, k, mask.mutable_data_ptr<bool>());
  return mask;
}

at::Tensor select_sequence_aware_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& valid,
                                     const at::Tensor& ratio, int64_t min_tokens) {
  check_min_tokens(scores, min_tokens);
  const Prepared in = prepare(scores, valid, ratio, "select_sequence_aware");
  at::Tensor mask = at::zeros(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t n = in.scores.numel();
  if (n == 0) return mask;
  const std::vector<uint32_t> keys = compute_keys(in.scores, in.valid);
  bool* out = mask.mutable_data_ptr<bool>();
  mark_top_keys(keys.data(), n, quota_from_ratio(in.ratio, count_valid(keys)), out);
  // A row's own ranking is the global ranking restricted to it, so the union with the row's top
  // min_tokens keeps "global top-k plus each row's hardest tokens up to the minimum".
  const int64_t rows = scores.size(0), cols = scores.size(1);
  for (int64_t r = 0; r < rows && min_tokens > 0; ++r) {
    const uint32_t* row_keys = keys.data() + r * cols;
    const int64_t row_valid = cols - std::count(row_keys, row_keys + cols, kInvalidKey);
    mark_top_keys(row_keys, cols, std::min(min_tokens, row_valid), out + r * cols);
  }
  return mask;
}

at::Tensor select_stratified_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& valid,
                                 const at::Tensor& ratio, int64_t num_strata, int64_t seed) {
  check_num_strata(num_strata);
  const Prepared in = prepare(scores, valid, ratio, "select_stratified");
  at::Tensor mask = at::zeros(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t n = in.scores.numel();
  if (n == 0) return mask;
  const std::vector<uint32_t> keys = compute_keys(in.scores, in.valid);

  // Valid tokens by rank: key descending, index ascending.
  std::vector<int64_t> ranked;
  ranked.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] != kInvalidKey) ranked.push_back(i);
  }
  std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  const int64_t n_valid = static_cast<int64_t>(ranked.size());
  const int64_t k = quota_from_ratio(in.ratio, n_valid);
  if (k == 0) return mask;

  const int64_t S = num_strata;
  std::vector<int64_t> quota(static_cast<size_t>(S));
  stratum_quotas(n_valid, k, S, quota.data());

  // Stable sort of ranks by (stratum, random draw): each stratum's ranks keep their block of
  // positions, ordered by the draw; its first quota[s] positions are selected.
  const int bits = stratum_bits(S);
  const uint64_t useed = static_cast<uint64_t>(seed);
  std::vector<std::pair<uint64_t, int64_t>> order(static_cast<size_t>(n_valid));
  for (int64_t r = 0; r < n_valid; ++r) {
    order[r] = {stratified_sort_key(r, ranked[r], n_valid, S, useed, bits), r};
  }
  std::sort(order.begin(), order.end());  // (key, rank) pairs are unique: same as a stable sort by key
  bool* out = mask.mutable_data_ptr<bool>();
  for (int64_t p = 0; p < n_valid; ++p) {
    const int64_t s = stratum_of_rank(p, n_valid, S);
    if (p - stratum_start(s, n_valid, S) < quota[s]) out[ranked[order[p].second]] = true;
  }
  return mask;
}

std::tuple<at::Tensor, at::Tensor> compact_indices_cpu(const at::Tensor& mask, int64_t capacity) {
  check_compact(mask, capacity);
  const at::Tensor m = mask.contiguous();
  at::Tensor indices = at::full({capacity}, -1, mask.options().dtype(at::kLong));
  const bool* flags = m.const_data_ptr<bool>();
  int64_t* out = indices.mutable_data_ptr<int64_t>();
  int64_t count = 0;
  const int64_t n = m.numel();
  for (int64_t i = 0; i < n && count < capacity; ++i) {
    if (flags[i]) out[count++] = i;
  }
  at::Tensor count_t = at::empty({}, mask.options().dtype(at::kLong));
  *count_t.mutable_data_ptr<int64_t>() = count;
  return {indices, count_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(cggr, CPU, m) {
  m.impl("select_topk", &select_topk_cpu);
  m.impl("select_stratified", &select_stratified_cpu);
  m.impl("select_sequence_aware", &select_sequence_aware_cpu);
  m.impl("compact_indices", &compact_indices_cpu);
}

}  // namespace cggr
