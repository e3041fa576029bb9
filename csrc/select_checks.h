// Argument checks shared by the CPU and CUDA selection ops (host C++ only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

#include "select_common.h"

namespace cggr {

// Error messages carry numbers as strings made by std::to_string: streaming an integer (or an
// IntArrayRef) into TORCH_CHECK's ostream crashed (SIGSEGV) in this extension built against torch 2.11
// on the GPU machine -- likely two libstdc++ locale facets meeting -- while strings and c10's own
// printers (ScalarType, Device::str) were fine. The same source ran under torch 2.14.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

inline void check_scores(const at::Tensor& scores, const char* op) {
  const auto t = scores.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "cggr.", op,
              ": scores must be float32, bfloat16 or float16, got ", t);
}

// Checks valid/ratio against scores; returns true when a mask of valid tokens was given.
inline bool check_valid_and_ratio(const at::Tensor& scores, const std::optional<at::Tensor>& valid,
                                  const at::Tensor& ratio, const char* op) {
  TORCH_CHECK(ratio.dim() == 0, "cggr.", op, ": ratio must be a 0-dim float32 tensor, got shape ",
              shape_str(ratio.sizes()));
  TORCH_CHECK(ratio.scalar_type() == at::kFloat, "cggr.", op, ": ratio must be a 0-dim float32 tensor, got dtype ",
              ratio.scalar_type());
  TORCH_CHECK(ratio.device().is_cpu() || ratio.device() == scores.device(), "cggr.", op,
              ": ratio must be on the CPU or on scores' device (", scores.device().str(), "), got ",
              ratio.device().str());
  if (!valid.has_value()) return false;
  const at::Tensor& v = *valid;
  TORCH_CHECK(v.scalar_type() == at::kBool, "cggr.", op, ": valid must be a bool tensor, got dtype ",
              v.scalar_type());
  TORCH_CHECK(v.sizes() == scores.sizes(), "cggr.", op, ": valid must have scores' shape ", shape_str(scores.sizes()),
              ", got ", shape_str(v.sizes()));
  TORCH_CHECK(v.device() == scores.device(), "cggr.", op, ": valid must be on scores' device (", scores.device().str(),
              "), got ", v.device().str());
  return true;
}

inline void check_num_strata(int64_t num_strata) {
  TORCH_CHECK(num_strata >= 1 && num_strata <= kMaxStrata,
              "cggr.select_stratified: num_strata must be in [1, ", std::to_string(kMaxStrata), "], got ",
              std::to_string(num_strata));
}

inline void check_min_tokens(const at::Tensor& scores, int64_t min_tokens) {
  TORCH_CHECK(scores.dim() == 2, "cggr.select_sequence_aware: scores must be 2-D [batch, seq], got shape ",
              shape_str(scores.sizes()));
  TORCH_CHECK(min_tokens >= 0, "cggr.select_sequence_aware: min_tokens_per_sequence must be >= 0, got ",
              std::to_string(min_tokens));
}

inline void check_compact(const at::Tensor& mask, int64_t capacity) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "cggr.compact_indices: mask must be a bool tensor, got dtype ",
              mask.scalar_type());
  TORCH_CHECK(capacity >= 0, "cggr.compact_indices: capacity must be >= 0, got ", std::to_string(capacity));
}

}  // namespace cggr
