// Raw-pointer launchers of the CUDA selection kernels (select_cuda.cu). The tensor-level ops, their
// checks and allocations live in select_cuda_ops.cpp, so that nvcc never parses ATen headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace cggr {
namespace cuda {

enum class ScoreType { kFloat32, kBFloat16, kFloat16 };

// The selection ratio: read from device memory when `device` is set (no host sync), else `host`.
struct Ratio {
  const float* device;
  float host;
};

// select_topk: mask[i] for every i in [0, n) (the whole mask is written). `workspace` must hold
// topk_workspace_bytes(n) bytes on the device.
size_t topk_workspace_bytes(int64_t n);
cudaError_t topk(const void* scores, ScoreType type, const bool* valid, int64_t n, Ratio ratio, bool* mask,
                 void* workspace, int sm_count, cudaStream_t stream);

// select_sequence_aware: the global top-k of scores [rows, cols], then each row's hardest valid tokens
// up to min_tokens ORed in. Same workspace as topk(rows * cols).
cudaError_t sequence_aware(const void* scores, ScoreType type, const bool* valid, int64_t rows, int64_t cols,
                           Ratio ratio, int64_t min_tokens, bool* mask, void* workspace, int sm_count,
                           cudaStream_t stream);

// select_stratified: `mask` must be zero-filled; only selected entries are written.
size_t stratified_workspace_bytes(int64_t n, int64_t num_strata, ScoreType type);
cudaError_t stratified(const void* scores, ScoreType type, const bool* valid, int64_t n, Ratio ratio,
                       int64_t num_strata, uint64_t seed, bool* mask, void* workspace, size_t workspace_bytes,
                       int sm_count, cudaStream_t stream);

// compact_indices: `indices` [capacity] must be filled with -1; `count` (one int64) is written.
size_t compact_workspace_bytes(int64_t n);
cudaError_t compact(const bool* mask, int64_t n, int64_t capacity, int64_t* indices, int64_t* count,
                    void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace cggr
