// CUDA selection kernels. Same semantics as select_cpu.cpp, bit for bit (select_common.h).
//
// select_topk is a radix select on order-preserving 32-bit keys (select_common.h: order_key):
//   1. memset of the small state (histograms, counters, tile flags);
//   2. one histogram kernel per digit (11 + 11 + 10 bits for float32; 11 + 5 for bfloat16 and
//      11 + 8 for float16, whose keys are constant below those bits); the last block to finish picks
//      the digit holding the k-th largest key, with k computed on the device from n_valid and ratio;
//   3. one write kernel: key > threshold is selected; of the keys equal to the threshold the first
//      (k - count_greater) in index order are, found by a chained scan (decoupled look-back) that runs
//      only when ties straddle the threshold.
// Inputs of at most kSmallN elements (and the per-row pass of select_sequence_aware) run the same
// algorithm inside one block per segment: a single launch.
// Every index is int64; no host synchronisation anywhere.
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include "select_common.h"
#include "select_cuda.h"

namespace cggr {
namespace cuda {
namespace {

constexpr int kThreads = 256;                     // every kernel's block size (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;                        // elements per thread per tile in the write kernels
constexpr int64_t kTile = int64_t{kThreads} * kItems;
constexpr int kSegmentThreads = 512;              // one block per segment
constexpr int64_t kSmallN = 16384;                // at most this many elements: one-block top-k
constexpr int kMaxBins = 2048;
constexpr int kMaxPasses = 3;
constexpr int kUnroll = 4;                        // histogram loads in flight per thread
constexpr int kSegmentCache = 32;                 // keys per thread held in registers (segment kernel)
static_assert(kSmallN <= int64_t{kSegmentThreads} * kSegmentCache, "one-block top-k must fit the key cache");

// --- scores ---------------------------------------------------------------------------------------
template <ScoreType T>
__device__ __forceinline__ float load_score(const void* p, int64_t i);

template <>
__device__ __forceinline__ float load_score<ScoreType::kFloat32>(const void* p, int64_t i) {
  return __ldg(static_cast<const float*>(p) + i);
}

template <>
__device__ __forceinline__ float load_score<ScoreType::kBFloat16>(const void* p, int64_t i) {
  const unsigned short h = __ldg(static_cast<const unsigned short*>(p) + i);
  return __uint_as_float(static_cast<uint32_t>(h) << 16);  // bf16 is the top half of a float32
}

template <>
__device__ __forceinline__ float load_score<ScoreType::kFloat16>(const void* p, int64_t i) {
  const unsigned short h = __ldg(static_cast<const unsigned short*>(p) + i);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

template <ScoreType T>
__device__ __forceinline__ uint32_t key_at(const void* scores, const bool* valid, int64_t i) {
  if (valid != nullptr && !valid[i]) return kInvalidKey;
  return order_key(load_score<T>(scores, i));
}

// Radix digits, most significant first. Below the last digit, keys of 16-bit dtypes are constant
// among keys that agree on the digits above (select_common.h), so equality there is full equality.
struct Passes {
  int count;
  int shift[kMaxPasses];
  int bits[kMaxPasses];
};

Passes passes_for(ScoreType type) {
  switch (type) {
    case ScoreType::kBFloat16:
      return {2, {21, 16, 0}, {11, 5, 0}};
    case ScoreType::kFloat16:
      return {2, {21, 13, 0}, {11, 8, 0}};
    default:
      return {3, {21, 10, 0}, {11, 11, 10}};
  }
}

__device__ __forceinline__ float read_ratio(Ratio r) { return r.device != nullptr ? *r.device : r.host; }

// --- block primitives (every thread of the block must call them) --------------------------------
__device__ __forceinline__ unsigned long long block_exclusive_sum(unsigned long long x, unsigned long long* scratch,
                                                                  unsigned long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned long long incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const unsigned long long v = lane < warps ? scratch[lane] : 0ull;
    unsigned long long s = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < warps) scratch[lane] = s - v;
    if (lane == warps - 1) scratch[32] = s;
  }
  __syncthreads();
  const unsigned long long result = scratch[warp] + incl - x;
  if (total != nullptr) *total = scratch[32];
  __syncthreads();  // scratch may be reused right away
  return result;
}

// Rank of this thread's flag among the block's set flags (thread order) and their total.
__device__ __forceinline__ int block_flag_rank(bool flag, int* warp_counts, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    all += c;
  }
  __syncthreads();
  *total = all;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// The digit (bins scanned from the top) that holds the k_rem-th largest key. Exactly one thread
// writes the outputs: the digit, the count in bins above it, and the count in its bin.
__device__ void find_digit(const unsigned long long* hist, int bins, unsigned long long k_rem,
                           unsigned long long* scratch, unsigned* digit, unsigned long long* above_out,
                           unsigned long long* count_out) {
  const int per = (bins + (int)blockDim.x - 1) / (int)blockDim.x;
  const int first = (int)threadIdx.x * per;
  unsigned long long local = 0;
  for (int j = first; j < first + per && j < bins; ++j) local += hist[bins - 1 - j];
  unsigned long long above = block_exclusive_sum(local, scratch, nullptr);
  for (int j = first; j < first + per && j < bins; ++j) {
    const unsigned long long c = hist[bins - 1 - j];
    if (above < k_rem && k_rem <= above + c) {
      *digit = static_cast<unsigned>(bins - 1 - j);
      *above_out = above;
      *count_out = c;
    }
    above += c;
  }
}

// Decoupled look-back (thread 0 of a tile only): publishes the tile's aggregate and returns the sum
// of all earlier tiles. Tiles are numbered in block start order (a ticket), so the look-back never
// waits on a block that has not started. Status word: bit 63 inclusive prefix, bit 62 aggregate.
constexpr unsigned long long kStatusAggregate = 1ull << 62;
constexpr unsigned long long kStatusPrefix = 1ull << 63;
constexpr unsigned long long kStatusValue = kStatusAggregate - 1;

__device__ unsigned long long tile_lookback(unsigned long long* status, int64_t tile, unsigned long long aggregate) {
  if (tile == 0) {
    atomicExch(status, kStatusPrefix | aggregate);
    return 0;
  }
  atomicExch(status + tile, kStatusAggregate | aggregate);
  unsigned long long exclusive = 0;
  for (int64_t j = tile - 1;; --j) {
    unsigned long long s;
    do {
      s = *reinterpret_cast<volatile unsigned long long*>(status + j);
    } while (s == 0);
    exclusive += s & kStatusValue;
    if (s & kStatusPrefix) break;
  }
  atomicExch(status + tile, kStatusPrefix | (exclusive + aggregate));
  return exclusive;
}

// --- multi-block top-k ------------------------------------------------------------------------------
struct RadixState {
  unsigned long long hist[kMaxPasses][kMaxBins];
  unsigned long long n_valid;
  long long k;             // the quota; 0 selects nothing
  unsigned long long k_rem;     // rank (1-based) of the threshold key among keys sharing `prefix`
  unsigned long long eq_count;  // keys sharing `prefix` (at the resolution found so far)
  unsigned prefix;         // digits of the threshold key found so far
  unsigned done[kMaxPasses];
  unsigned ticket;         // tile numbering of the write kernel
};

size_t align_up(size_t x) { return (x + 255) & ~size_t{255}; }
int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }

// Scores that cluster (entropy, loss: most keys share their high bits) send many lanes of a warp to
// one histogram bin; shared-memory atomics on one address serialise, which made select_topk on real
// entropies ~6x slower than on random scores. One atomic per distinct bin per warp instead.
template <typename C>
__device__ __forceinline__ void warp_aggregated_add(C* hist, unsigned bin) {
  const unsigned peers = __match_any_sync(__activemask(), bin);
  if ((threadIdx.x & 31u) == static_cast<unsigned>(__ffs(peers) - 1)) {
    atomicAdd(&hist[bin], static_cast<C>(__popc(peers)));
  }
}


template <ScoreType T>
__global__ void __launch_bounds__(kThreads) radix_hist_kernel(const void* __restrict__ scores,
                                                              const bool* __restrict__ valid, int64_t n, int pass,
                                                              int shift, int bits, Ratio ratio, RadixState* st) {
  __shared__ unsigned hist[kMaxBins];
  __shared__ unsigned long long picked[kMaxBins];
  __shared__ unsigned long long scratch[33];
  __shared__ bool last;
  __shared__ unsigned long long k_rem;
  __shared__ unsigned s_digit;
  __shared__ unsigned long long s_above, s_count;

  if (pass > 0 && st->k == 0) return;  // nothing to select (uniform across the grid)
  const int bins = 1 << bits;
  for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();

  const unsigned prefix = pass > 0 ? st->prefix : 0u;
  const int high = shift + bits;  // < 32 when pass > 0
  unsigned long long n_valid = 0;
  // kUnroll loads in flight per thread before their shared-memory atomics.
  const int64_t step = int64_t{gridDim.x} * blockDim.x * kUnroll;
  for (int64_t i0 = int64_t{blockIdx.x} * blockDim.x * kUnroll + threadIdx.x; i0 < n; i0 += step) {
    uint32_t keys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + int64_t{u} * blockDim.x;
      keys[u] = i < n ? key_at<T>(scores, valid, i) : kInvalidKey;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + int64_t{u} * blockDim.x >= n) break;
      const uint32_t key = keys[u];
      if (pass == 0) {
        n_valid += key != kInvalidKey;
        warp_aggregated_add(hist, key >> shift);
      } else if ((key >> high) == prefix) {
        warp_aggregated_add(hist, (key >> shift) & (bins - 1));
      }
    }
  }
  if (pass == 0) {
    unsigned long long block_valid;
    block_exclusive_sum(n_valid, scratch, &block_valid);
    if (threadIdx.x == 0 && block_valid) atomicAdd(&st->n_valid, block_valid);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    if (hist[b]) atomicAdd(&st->hist[pass][b], static_cast<unsigned long long>(hist[b]));
  }
  // The last block to finish sees every block's counts and picks the digit.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&st->done[pass], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) picked[b] = __ldcg(&st->hist[pass][b]);
  if (threadIdx.x == 0) {
    if (pass == 0) {
      const long long k = quota_from_ratio(read_ratio(ratio), static_cast<int64_t>(__ldcg(&st->n_valid)));
      st->k = k;
      k_rem = static_cast<unsigned long long>(k);
    } else {
      k_rem = st->k_rem;
    }
  }
  __syncthreads();
  if (k_rem == 0) return;
  find_digit(picked, bins, k_rem, scratch, &s_digit, &s_above, &s_count);
  __syncthreads();
  if (threadIdx.x == 0) {
    st->prefix = (prefix << bits) | s_digit;
    st->k_rem = k_rem - s_above;
    st->eq_count = s_count;
  }
}

template <ScoreType T>
__global__ void __launch_bounds__(kThreads) topk_write_kernel(const void* __restrict__ scores,
                                                              const bool* __restrict__ valid, int64_t n, int shift,
                                                              RadixState* st, unsigned long long* status,
                                                              bool* __restrict__ mask) {
  __shared__ int64_t tile;
  __shared__ unsigned long long scratch[33];
  __shared__ int warp_counts[kWarps];
  __shared__ unsigned long long tile_prefix;
  if (threadIdx.x == 0) tile = atomicAdd(&st->ticket, 1u);
  __syncthreads();
  const int64_t base = tile * kTile;
  const bool any = st->k > 0;
  const unsigned threshold = st->prefix;
  const unsigned long long need = st->k_rem;
  const bool all_ties = need == st->eq_count;  // every key equal to the threshold is selected

  uint32_t greater = 0, equal = 0;  // bit j: element base + j * kThreads + threadIdx.x
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + int64_t{j} * kThreads + threadIdx.x;
    if (any && i < n) {
      const uint32_t key = key_at<T>(scores, valid, i) >> shift;
      greater |= uint32_t{key > threshold} << j;
      equal |= uint32_t{key == threshold} << j;
    }
  }
  if (!any || all_ties) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + int64_t{j} * kThreads + threadIdx.x;
      if (i < n) mask[i] = ((greater | equal) >> j) & 1u;
    }
    return;
  }
  unsigned long long tile_equal;
  block_exclusive_sum(__popc(equal), scratch, &tile_equal);
  if (threadIdx.x == 0) tile_prefix = tile_lookback(status, tile, tile_equal);
  __syncthreads();
  unsigned long long before = tile_prefix;  // equal keys at lower indices
  for (int j = 0; j < kItems; ++j) {
    const bool eq = (equal >> j) & 1u;
    int row_total;
    const int rank = block_flag_rank(eq, warp_counts, &row_total);
    const int64_t i = base + int64_t{j} * kThreads + threadIdx.x;
    if (i < n) mask[i] = ((greater >> j) & 1u) || (eq && before + rank < need);
    before += row_total;
  }
}

// --- one block per segment (small inputs, per-row minimums) -------------------------------------
// Selects within segment s = blockIdx.x, i.e. [s * len, (s + 1) * len): the top quota keys, where
// quota = min(fixed_quota, n_valid) when fixed_quota >= 0, else the ratio quota. With or_into the
// selection is ORed into the mask, else the segment's mask is overwritten. Segments of at most
// kSegmentThreads * kSegmentCache elements are read once and kept in registers.
template <ScoreType T>
__global__ void __launch_bounds__(kSegmentThreads) segment_topk_kernel(const void* __restrict__ scores,
                                                                       const bool* __restrict__ valid, int64_t len,
                                                                       Passes passes, Ratio ratio,
                                                                       int64_t fixed_quota, bool or_into,
                                                                       bool* __restrict__ mask) {
  __shared__ unsigned long long hist[kMaxBins];
  __shared__ unsigned long long scratch[33];
  __shared__ int warp_counts[kSegmentThreads / 32];
  __shared__ unsigned long long k_rem, s_above, s_count;
  __shared__ unsigned prefix, s_digit;

  const int64_t base = int64_t{blockIdx.x} * len;
  const bool cached = len <= int64_t{kSegmentCache} * blockDim.x;
  uint32_t keys[kSegmentCache];
  if (cached) {
#pragma unroll
    for (int c = 0; c < kSegmentCache; ++c) {
      const int64_t i = int64_t{c} * blockDim.x + threadIdx.x;
      keys[c] = i < len ? key_at<T>(scores, valid, base + i) : kInvalidKey;
    }
  }
  // Calls f(i, key) for every element i of the segment that this thread owns (i = tid + j * blockDim).
  auto for_each_key = [&](auto&& f) {
    if (cached) {
#pragma unroll
      for (int c = 0; c < kSegmentCache; ++c) {
        const int64_t i = int64_t{c} * blockDim.x + threadIdx.x;
        if (i < len) f(i, keys[c]);
      }
    } else {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) f(i, key_at<T>(scores, valid, base + i));
    }
  };

  if (threadIdx.x == 0) prefix = 0;
  for (int p = 0; p < passes.count; ++p) {
    const int shift = passes.shift[p], bits = passes.bits[p], bins = 1 << bits;
    for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const unsigned pre = prefix;
    const int high = shift + bits;
    unsigned long long n_valid = 0;
    for_each_key([&](int64_t, uint32_t key) {
      if (p == 0) {
        n_valid += key != kInvalidKey;
        warp_aggregated_add(hist, key >> shift);
      } else if ((key >> high) == pre) {
        warp_aggregated_add(hist, (key >> shift) & (bins - 1));
      }
    });
    if (p == 0) {
      unsigned long long total;
      block_exclusive_sum(n_valid, scratch, &total);
      if (threadIdx.x == 0) {
        const int64_t nv = static_cast<int64_t>(total);
        const int64_t k = fixed_quota >= 0 ? (fixed_quota < nv ? fixed_quota : nv)
                                           : quota_from_ratio(read_ratio(ratio), nv);
        k_rem = static_cast<unsigned long long>(k);
      }
    }
    __syncthreads();
    if (k_rem == 0) {
      if (!or_into) {
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x) mask[base + i] = false;
      }
      return;
    }
    find_digit(hist, bins, k_rem, scratch, &s_digit, &s_above, &s_count);
    __syncthreads();
    if (threadIdx.x == 0) {
      prefix = (pre << bits) | s_digit;
      k_rem -= s_above;
    }
    __syncthreads();
  }

  const int shift = passes.shift[passes.count - 1];
  const unsigned threshold = prefix;
  const unsigned long long need = k_rem;
  const auto store = [&](int64_t i, bool selected) {
    if (!or_into) {
      mask[base + i] = selected;
    } else if (selected) {
      mask[base + i] = true;
    }
  };
  if (need == s_count) {  // every key equal to the threshold is selected: no ranking needed
    for_each_key([&](int64_t i, uint32_t key) { store(i, (key >> shift) >= threshold); });
    return;
  }
  // Ties straddle the threshold: walk rows of blockDim elements in index order, ranking equal keys.
  unsigned long long before = 0;
  const auto row = [&](int64_t i, uint32_t key) {
    const bool in = i < len;
    const bool eq = in && (key >> shift) == threshold;
    int row_total;
    const int rank = block_flag_rank(eq, warp_counts, &row_total);
    if (in) store(i, (key >> shift) > threshold || (eq && before + rank < need));
    before += row_total;
  };
  if (cached) {
#pragma unroll
    for (int c = 0; c < kSegmentCache; ++c) {
      if (int64_t{c} * blockDim.x >= len) break;  // uniform across the block
      row(int64_t{c} * blockDim.x + threadIdx.x, keys[c]);
    }
  } else {
    for (int64_t start = 0; start < len; start += blockDim.x) {
      const int64_t i = start + threadIdx.x;
      row(i, i < len ? key_at<T>(scores, valid, base + i) : kInvalidKey);
    }
  }
}

template <ScoreType T>
cudaError_t launch_segments(const void* scores, const bool* valid, int64_t segments, int64_t len, Ratio ratio,
                            int64_t fixed_quota, bool or_into, bool* mask, cudaStream_t stream) {
  segment_topk_kernel<T><<<static_cast<unsigned>(segments), kSegmentThreads, 0, stream>>>(
      scores, valid, len, passes_for(T), ratio, fixed_quota, or_into, mask);
  return cudaGetLastError();
}

template <ScoreType T>
cudaError_t launch_topk(const void* scores, const bool* valid, int64_t n, Ratio ratio, bool* mask, void* workspace,
                        int sm_count, cudaStream_t stream) {
  if (n <= kSmallN) return launch_segments<T>(scores, valid, 1, n, ratio, -1, false, mask, stream);
  auto* st = static_cast<RadixState*>(workspace);
  auto* status = reinterpret_cast<unsigned long long*>(static_cast<char*>(workspace) + align_up(sizeof(RadixState)));
  cudaError_t err = cudaMemsetAsync(workspace, 0, topk_workspace_bytes(n), stream);
  if (err != cudaSuccess) return err;
  // Enough blocks to fill the GPU; few enough that flushing block histograms stays cheap.
  const int64_t wanted = (n + kTile - 1) / kTile;
  const unsigned grid = static_cast<unsigned>(wanted < 4 * int64_t{sm_count} ? wanted : 4 * int64_t{sm_count});
  const Passes passes = passes_for(T);
  for (int p = 0; p < passes.count; ++p) {
    radix_hist_kernel<T><<<grid, kThreads, 0, stream>>>(scores, valid, n, p, passes.shift[p], passes.bits[p],
                                                         ratio, st);
  }
  topk_write_kernel<T><<<static_cast<unsigned>(num_tiles(n)), kThreads, 0, stream>>>(
      scores, valid, n, passes.shift[passes.count - 1], st, status, mask);
  return cudaGetLastError();
}

// --- stratified ------------------------------------------------------------------------------------
template <ScoreType T>
__global__ void __launch_bounds__(kThreads) stratified_keys_kernel(const void* __restrict__ scores,
                                                                   const bool* __restrict__ valid, int64_t n,
                                                                   uint32_t* keys, int64_t* index,
                                                                   unsigned long long* n_valid) {
  __shared__ unsigned long long scratch[33];
  unsigned long long count = 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t key = key_at<T>(scores, valid, i);
    keys[i] = key;
    index[i] = i;
    count += key != kInvalidKey;
  }
  unsigned long long total;
  block_exclusive_sum(count, scratch, &total);
  if (threadIdx.x == 0 && total) atomicAdd(n_valid, total);
}

__global__ void stratum_quota_kernel(const unsigned long long* n_valid, Ratio ratio, int64_t strata, int64_t* quota) {
  const int64_t nv = static_cast<int64_t>(*n_valid);
  stratum_quotas(nv, quota_from_ratio(read_ratio(ratio), nv), strata, quota);
}

__global__ void __launch_bounds__(kThreads) stratified_sort_key_kernel(const int64_t* ranked, int64_t n,
                                                                       const unsigned long long* n_valid,
                                                                       int64_t strata, uint64_t seed, int bits,
                                                                       uint64_t* sort_keys) {
  const int64_t nv = static_cast<int64_t>(*n_valid);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t r = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < n; r += stride) {
    // Invalid tokens (ranks >= n_valid) go last; stability keeps them behind any equal valid key.
    sort_keys[r] = r < nv ? stratified_sort_key(r, ranked[r], nv, strata, seed, bits) : ~uint64_t{0};
  }
}

__global__ void __launch_bounds__(kThreads) stratified_write_kernel(const int64_t* order, int64_t n,
                                                                    const unsigned long long* n_valid,
                                                                    int64_t strata, const int64_t* quota,
                                                                    bool* mask) {
  const int64_t nv = static_cast<int64_t>(*n_valid);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t p = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; p < nv; p += stride) {
    const int64_t s = stratum_of_rank(p, nv, strata);
    if (p - stratum_start(s, nv, strata) < quota[s]) mask[order[p]] = true;
  }
}

struct StratifiedLayout {
  size_t keys_in, keys_out, index_in, index_out, sort_in, sort_out, quota, n_valid, temp, temp_bytes, total;
};

// Bits of the keys that the rank sort must look at: below the last radix digit keys of 16-bit
// dtypes are constant (see passes_for).
int rank_begin_bit(ScoreType type) {
  const Passes passes = passes_for(type);
  return passes.shift[passes.count - 1];
}

StratifiedLayout stratified_layout(int64_t n, int64_t strata, ScoreType type) {
  size_t rank_temp = 0, order_temp = 0;  // size queries only: no work is launched
  cub::DeviceRadixSort::SortPairsDescending(nullptr, rank_temp, static_cast<const uint32_t*>(nullptr),
                                            static_cast<uint32_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                            static_cast<int64_t*>(nullptr), n, rank_begin_bit(type), 32);
  cub::DeviceRadixSort::SortPairs(nullptr, order_temp, static_cast<const uint64_t*>(nullptr),
                                  static_cast<uint64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), n, 0, 64);
  StratifiedLayout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = at;
    at = align_up(at + bytes);
    return offset;
  };
  const size_t un = static_cast<size_t>(n);
  l.keys_in = take(un * sizeof(uint32_t));
  l.keys_out = take(un * sizeof(uint32_t));
  l.index_in = take(un * sizeof(int64_t));
  l.index_out = take(un * sizeof(int64_t));
  l.sort_in = take(un * sizeof(uint64_t));
  l.sort_out = take(un * sizeof(uint64_t));
  l.quota = take(static_cast<size_t>(strata) * sizeof(int64_t));
  l.n_valid = take(sizeof(unsigned long long));
  l.temp_bytes = rank_temp > order_temp ? rank_temp : order_temp;
  l.temp = take(l.temp_bytes);
  l.total = at;
  return l;
}

template <ScoreType T>
cudaError_t launch_stratified(const void* scores, const bool* valid, int64_t n, Ratio ratio, int64_t strata,
                              uint64_t seed, bool* mask, void* workspace, int sm_count, cudaStream_t stream) {
  const StratifiedLayout l = stratified_layout(n, strata, T);
  char* ws = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<uint32_t*>(ws + l.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(ws + l.keys_out);
  auto* index_in = reinterpret_cast<int64_t*>(ws + l.index_in);
  auto* index_out = reinterpret_cast<int64_t*>(ws + l.index_out);
  auto* sort_in = reinterpret_cast<uint64_t*>(ws + l.sort_in);
  auto* sort_out = reinterpret_cast<uint64_t*>(ws + l.sort_out);
  auto* quota = reinterpret_cast<int64_t*>(ws + l.quota);
  auto* n_valid = reinterpret_cast<unsigned long long*>(ws + l.n_valid);
  size_t temp_bytes = l.temp_bytes;

  cudaError_t err = cudaMemsetAsync(n_valid, 0, sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return err;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(wanted < 8 * int64_t{sm_count} ? wanted : 8 * int64_t{sm_count});
  stratified_keys_kernel<T><<<grid, kThreads, 0, stream>>>(scores, valid, n, keys_in, index_in, n_valid);
  // Rank order: key descending, index ascending (the radix sort is stable).
  err = cub::DeviceRadixSort::SortPairsDescending(ws + l.temp, temp_bytes, keys_in, keys_out, index_in, index_out, n,
                                                  rank_begin_bit(T), 32, stream);
  if (err != cudaSuccess) return err;
  stratum_quota_kernel<<<1, 1, 0, stream>>>(n_valid, ratio, strata, quota);
  stratified_sort_key_kernel<<<grid, kThreads, 0, stream>>>(index_out, n, n_valid, strata, seed,
                                                            stratum_bits(strata), sort_in);
  temp_bytes = l.temp_bytes;
  err = cub::DeviceRadixSort::SortPairs(ws + l.temp, temp_bytes, sort_in, sort_out, index_out, index_in, n, 0, 64,
                                        stream);
  if (err != cudaSuccess) return err;
  stratified_write_kernel<<<grid, kThreads, 0, stream>>>(index_in, n, n_valid, strata, quota, mask);
  return cudaGetLastError();
}

// --- compaction ------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) compact_kernel(const bool* __restrict__ mask, int64_t n, int64_t capacity,
                                                           unsigned* ticket, unsigned long long* status,
                                                           int64_t* __restrict__ indices, int64_t* count) {
  __shared__ int64_t tile;
  __shared__ unsigned long long scratch[33];
  __shared__ int warp_counts[kWarps];
  __shared__ unsigned long long tile_prefix;
  if (threadIdx.x == 0) tile = atomicAdd(ticket, 1u);
  __syncthreads();
  const int64_t base = tile * kTile;
  uint32_t flags = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = base + int64_t{j} * kThreads + threadIdx.x;
    if (i < n) flags |= uint32_t{mask[i]} << j;
  }
  unsigned long long tile_count;
  block_exclusive_sum(__popc(flags), scratch, &tile_count);
  if (threadIdx.x == 0) {
    tile_prefix = tile_lookback(status, tile, tile_count);
    if (tile == (int64_t)gridDim.x - 1) {
      const unsigned long long total = tile_prefix + tile_count;
      *count = total < static_cast<unsigned long long>(capacity) ? static_cast<int64_t>(total) : capacity;
    }
  }
  __syncthreads();
  unsigned long long before = tile_prefix;
  if (before >= static_cast<unsigned long long>(capacity)) return;  // uniform: nothing of this tile fits
  for (int j = 0; j < kItems; ++j) {
    const bool flag = (flags >> j) & 1u;
    int row_total;
    const int rank = block_flag_rank(flag, warp_counts, &row_total);
    const unsigned long long position = before + rank;
    if (flag && position < static_cast<unsigned long long>(capacity)) {
      indices[position] = base + int64_t{j} * kThreads + threadIdx.x;
    }
    before += row_total;
  }
}

}  // namespace

// --- launchers -------------------------------------------------------------------------------------
size_t topk_workspace_bytes(int64_t n) {
  if (n <= kSmallN) return 0;
  return align_up(sizeof(RadixState)) + static_cast<size_t>(num_tiles(n)) * sizeof(unsigned long long);
}

#define CGGR_DISPATCH_SCORE(type, FN, ...)                                   \
  switch (type) {                                                            \
    case ScoreType::kBFloat16:                                               \
      return FN<ScoreType::kBFloat16>(__VA_ARGS__);                          \
    case ScoreType::kFloat16:                                                \
      return FN<ScoreType::kFloat16>(__VA_ARGS__);                           \
    default:                                                                 \
      return FN<ScoreType::kFloat32>(__VA_ARGS__);                           \
  }

cudaError_t topk(const void* scores, ScoreType type, const bool* valid, int64_t n, Ratio ratio, bool* mask,
                 void* workspace, int sm_count, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  CGGR_DISPATCH_SCORE(type, launch_topk, scores, valid, n, ratio, mask, workspace, sm_count, stream)
}

template <ScoreType T>
cudaError_t launch_sequence_aware(const void* scores, const bool* valid, int64_t rows, int64_t cols, Ratio ratio,
                                  int64_t min_tokens, bool* mask, void* workspace, int sm_count, cudaStream_t stream) {
  cudaError_t err = launch_topk<T>(scores, valid, rows * cols, ratio, mask, workspace, sm_count, stream);
  if (err != cudaSuccess || min_tokens == 0) return err;
  // A row's ranking is the global ranking restricted to it, so ORing each row's top min_tokens into
  // the global top-k gives "global top-k plus each row's hardest tokens up to the minimum".
  return launch_segments<T>(scores, valid, rows, cols, ratio, min_tokens, true, mask, stream);
}

cudaError_t sequence_aware(const void* scores, ScoreType type, const bool* valid, int64_t rows, int64_t cols,
                           Ratio ratio, int64_t min_tokens, bool* mask, void* workspace, int sm_count,
                           cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  CGGR_DISPATCH_SCORE(type, launch_sequence_aware, scores, valid, rows, cols, ratio, min_tokens, mask, workspace,
                      sm_count, stream)
}

size_t stratified_workspace_bytes(int64_t n, int64_t num_strata, ScoreType type) {
  return n == 0 ? 0 : stratified_layout(n, num_strata, type).total;
}

cudaError_t stratified(const void* scores, ScoreType type, const bool* valid, int64_t n, Ratio ratio,
                       int64_t num_strata, uint64_t seed, bool* mask, void* workspace, size_t workspace_bytes,
                       int sm_count, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (workspace_bytes < stratified_layout(n, num_strata, type).total) return cudaErrorInvalidValue;
  CGGR_DISPATCH_SCORE(type, launch_stratified, scores, valid, n, ratio, num_strata, seed, mask, workspace,
                      sm_count, stream)
}

size_t compact_workspace_bytes(int64_t n) {
  return align_up(sizeof(unsigned)) + static_cast<size_t>(num_tiles(n)) * sizeof(unsigned long long);
}

cudaError_t compact(const bool* mask, int64_t n, int64_t capacity, int64_t* indices, int64_t* count, void* workspace,
                    cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(count, 0, sizeof(int64_t), stream);
  if (err != cudaSuccess || n == 0 || capacity == 0) return err;
  err = cudaMemsetAsync(workspace, 0, compact_workspace_bytes(n), stream);
  if (err != cudaSuccess) return err;
  auto* ticket = static_cast<unsigned*>(workspace);
  auto* status = reinterpret_cast<unsigned long long*>(static_cast<char*>(workspace) + align_up(sizeof(unsigned)));
  compact_kernel<<<static_cast<unsigned>(num_tiles(n)), kThreads, 0, stream>>>(mask, n, capacity, ticket, status,
                                                                               indices, count);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace cggr
