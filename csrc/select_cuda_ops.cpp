// CUDA selection ops: argument checks, allocations (caching allocator) and dispatcher registration.
// The kernels are in select_cuda.cu behind raw-pointer launchers. Nothing here synchronises with the
// host: a CUDA ratio tensor is passed to the kernels by pointer.
#ifdef CGGR_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "select_checks.h"
#include "select_cuda.h"

namespace cggr {
namespace {

cuda::ScoreType score_type(const at::Tensor& scores) {
  switch (scores.scalar_type()) {
    case at::kBFloat16:
      return cuda::ScoreType::kBFloat16;
    case at::kHalf:
      return cuda::ScoreType::kFloat16;
    default:
      return cuda::ScoreType::kFloat32;
  }
}

struct Prepared {
  at::Tensor scores;  // contiguous
  at::Tensor valid;   // contiguous or undefined
  cuda::Ratio ratio;
};

Prepared prepare(const at::Tensor& scores, const std::optional<at::Tensor>& valid, const at::Tensor& ratio,
                 const char* op) {
  check_scores(scores, op);
  const bool has_valid = check_valid_and_ratio(scores, valid, ratio, op);
  Prepared p{scores.contiguous(), has_valid ? valid->contiguous() : at::Tensor(), {nullptr, 0.f}};
  if (ratio.is_cpu()) {
    p.ratio.host = *ratio.const_data_ptr<float>();
  } else {
    p.ratio.device = ratio.const_data_ptr<float>();  // read by the kernels: no host sync
  }
  return p;
}

const bool* valid_ptr(const Prepared& p) { return p.valid.defined() ? p.valid.const_data_ptr<bool>() : nullptr; }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers for this one number.)
int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

at::Tensor select_topk_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& valid, const at::Tensor& ratio) {
  const Prepared in = prepare(scores, valid, ratio, "select_topk");  // checks devices before the guard
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t n = in.scores.numel();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const at::Tensor ws = workspace(cuda::topk_workspace_bytes(n), in.scores);
  C10_CUDA_CHECK(cuda::topk(in.scores.const_data_ptr(), score_type(scores), valid_ptr(in), n, in.ratio,
                            mask.mutable_data_ptr<bool>(), ws.mutable_data_ptr(), sm_count(),
                            c10::cuda::getCurrentCUDAStream()));
  return mask;
}

at::Tensor select_sequence_aware_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& valid,
                                      const at::Tensor& ratio, int64_t min_tokens) {
  check_min_tokens(scores, min_tokens);
  TORCH_CHECK(scores.size(0) <= std::numeric_limits<int32_t>::max(),
              "cggr.select_sequence_aware: at most 2^31 - 1 rows on CUDA, got ",
              std::to_string(scores.size(0)));
  const Prepared in = prepare(scores, valid, ratio, "select_sequence_aware");  // checks devices before the guard
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const at::Tensor ws = workspace(cuda::topk_workspace_bytes(in.scores.numel()), in.scores);
  C10_CUDA_CHECK(cuda::sequence_aware(in.scores.const_data_ptr(), score_type(scores), valid_ptr(in), scores.size(0),
                                      scores.size(1), in.ratio, min_tokens, mask.mutable_data_ptr<bool>(),
                                      ws.mutable_data_ptr(), sm_count(), c10::cuda::getCurrentCUDAStream()));
  return mask;
}

at::Tensor select_stratified_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& valid,
                                  const at::Tensor& ratio, int64_t num_strata, int64_t seed) {
  check_num_strata(num_strata);
  const Prepared in = prepare(scores, valid, ratio, "select_stratified");  // checks devices before the guard
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t n = in.scores.numel();
  at::Tensor mask = at::zeros(scores.sizes(), scores.options().dtype(at::kBool));
  const size_t bytes = cuda::stratified_workspace_bytes(n, num_strata, score_type(scores));
  const at::Tensor ws = workspace(bytes, in.scores);
  C10_CUDA_CHECK(cuda::stratified(in.scores.const_data_ptr(), score_type(scores), valid_ptr(in), n, in.ratio,
                                  num_strata, static_cast<uint64_t>(seed), mask.mutable_data_ptr<bool>(),
                                  ws.mutable_data_ptr(), bytes, sm_count(), c10::cuda::getCurrentCUDAStream()));
  return mask;
}

std::tuple<at::Tensor, at::Tensor> compact_indices_cuda(const at::Tensor& mask, int64_t capacity) {
  check_compact(mask, capacity);
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  at::Tensor indices = at::full({capacity}, -1, mask.options().dtype(at::kLong));
  at::Tensor count = at::empty({}, mask.options().dtype(at::kLong));
  const at::Tensor ws = workspace(cuda::compact_workspace_bytes(n), m);
  C10_CUDA_CHECK(cuda::compact(m.const_data_ptr<bool>(), n, capacity, indices.mutable_data_ptr<int64_t>(),
                               count.mutable_data_ptr<int64_t>(), ws.mutable_data_ptr(),
                               c10::cuda::getCurrentCUDAStream()));
  return {indices, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(cggr, CUDA, m) {
  m.impl("select_topk", &select_topk_cuda);
  m.impl("select_stratified", &select_stratified_cuda);
  m.impl("select_sequence_aware", &select_sequence_aware_cuda);
  m.impl("compact_indices", &compact_indices_cuda);
}

}  // namespace cggr

#endif  // CGGR_WITH_CUDA
