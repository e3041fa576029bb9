// Selection math shared by the CPU and CUDA implementations (host and device), so that both
// compute bit-identical keys, quotas and random draws. No ATen here: nvcc includes it too.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CGGR_HD __host__ __device__ __forceinline__
#else
#define CGGR_HD inline
#endif

namespace cggr {

// Order-preserving 32-bit keys: a larger key is a harder token.
//   invalid tokens            -> 0                  (never selected: k <= n_valid)
//   NaN, +inf, -inf           -> kNonFiniteKey      (below every finite score, above invalid)
//   finite x                  -> monotone map of the IEEE bits, >= 0x00800000 (-FLT_MAX)
// -0.0 is folded into +0.0 so that equal values tie (and ties go to the lower index).
// kNonFiniteKey sits in bit 16 so that 16-bit dtypes can stop the radix search at bit 16 (bf16)
// or bit 13 (fp16): below those bits keys of one sign are constant for such dtypes.
constexpr uint32_t kInvalidKey = 0u;
constexpr uint32_t kNonFiniteKey = 0x00010000u;

CGGR_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

CGGR_HD uint32_t order_key(float x) {
  uint32_t b = float_bits(x);
  if ((b & 0x7F800000u) == 0x7F800000u) return kNonFiniteKey;
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Quota k = ceil(r * n * (1 - 2^-24)) with r = clamp(ratio, 0, 1), at least 1 when n > 0, at most n.
// The factor (1 - 2^-24) absorbs the float32 rounding of the ratio: 0.1f is 0.1000000015, and
// ceil(0.1000000015 * 10) would be 2; with it, any ratio whose intended product with n is an
// integer j < 2^23 gives exactly j, as the same formula in double precision does. Computed exactly
// in integers (r = m * 2^-shift), so CPU and CUDA agree for every n.
CGGR_HD int64_t quota_from_ratio(float ratio, int64_t n) {
  if (n <= 0) return 0;
  if (!(ratio > 0.f)) return 1;  // <= 0 or NaN clamps to 0; the floor of one token applies
  if (ratio >= 1.f) return n;
  const uint32_t b = float_bits(ratio);
  const uint32_t e = b >> 23;
  uint64_t m = b & 0x7FFFFFu;
  int shift;
  if (e == 0) {
    shift = 149 + 24;  // subnormal: m * 2^-149
  } else {
    m |= 0x800000u;
    shift = 150 - static_cast<int>(e) + 24;  // >= 48 because ratio < 1
  }
  // m * n * (2^24 - 1) < 2^24 * 2^63 * 2^24 = 2^111.
  const unsigned __int128 p =
      static_cast<unsigned __int128>(m) * static_cast<uint64_t>(n) * ((uint64_t{1} << 24) - 1);
  int64_t k;
  if (shift >= 128) {
    k = p != 0;  // p < 2^111 < 2^shift
  } else {
    const unsigned __int128 one = 1;
    k = static_cast<int64_t>((p + ((one << shift) - 1)) >> shift);
  }
  return k < 1 ? 1 : (k > n ? n : k);
}

// --- select_stratified -------------------------------------------------------------------------
// Valid tokens, ranked hardest first (key desc, index asc), fall into S equal-count strata:
// rank r is in stratum floor(r * S / n); stratum s starts at rank ceil(s * n / S).
constexpr int64_t kMaxStrata = 1024;

CGGR_HD int64_t stratum_start(int64_t s, int64_t n, int64_t S) {
  return static_cast<int64_t>((static_cast<uint64_t>(s) * n + S - 1) / S);
}

CGGR_HD int64_t stratum_of_rank(int64_t r, int64_t n, int64_t S) {
  return static_cast<int64_t>(static_cast<uint64_t>(r) * S / n);
}

// Per-stratum quotas q[0..S) summing to k (k <= n). Rule:
//  * if k < m (m = number of non-empty strata): the k hardest non-empty strata get 1 each;
//  * else every non-empty stratum gets 1, and the remaining k - m are water-filled in proportion
//    to the weights w_s = S - s (harder strata get more), capped at the stratum size: strata whose
//    proportional share reaches their spare capacity are filled and removed, the rest re-shared;
//    the shares of the uncapped strata are rounded by cumulative rounding
//    (q_s = floor(R * W_<=s / W) - floor(R * W_<s / W)), which is exact and integer-only.
// Worst case O(S^2) on one thread (S <= kMaxStrata); usually one or two rounds.
CGGR_HD void stratum_quotas(int64_t n, int64_t k, int64_t S, int64_t* q) {
  for (int64_t s = 0; s < S; ++s) q[s] = 0;
  if (k <= 0 || n <= 0) return;
  int64_t m = 0;
  for (int64_t s = 0; s < S; ++s) m += stratum_start(s + 1, n, S) > stratum_start(s, n, S);
  if (k < m) {
    int64_t left = k;
    for (int64_t s = 0; s < S && left > 0; ++s) {
      if (stratum_start(s + 1, n, S) > stratum_start(s, n, S)) {
        q[s] = 1;
        --left;
      }
    }
    return;
  }
  // q[s] == 1 with size >= 2 marks an active (uncapped) stratum; a capped one holds its size.
  for (int64_t s = 0; s < S; ++s) q[s] = stratum_start(s + 1, n, S) > stratum_start(s, n, S);
  uint64_t remaining = static_cast<uint64_t>(k - m);
  uint64_t weight = 0;
  while (true) {
    weight = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t size = stratum_start(s + 1, n, S) - stratum_start(s, n, S);
      if (q[s] == 1 && size >= 2) weight += static_cast<uint64_t>(S - s);
    }
    if (weight == 0) break;
    bool capped = false;
    uint64_t filled = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t size = stratum_start(s + 1, n, S) - stratum_start(s, n, S);
      if (q[s] != 1 || size < 2) continue;
      const unsigned __int128 share = static_cast<unsigned __int128>(remaining) * static_cast<uint64_t>(S - s);
      const unsigned __int128 cap = static_cast<unsigned __int128>(size - 1) * weight;
      if (share >= cap) {
        q[s] = size;
        filled += static_cast<uint64_t>(size - 1);
        capped = true;
      }
    }
    remaining -= filled;
    if (!capped) break;
  }
  if (weight == 0) return;
  uint64_t cum_weight = 0, given = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t size = stratum_start(s + 1, n, S) - stratum_start(s, n, S);
    if (q[s] != 1 || size < 2) continue;
    cum_weight += static_cast<uint64_t>(S - s);
    const uint64_t upto = static_cast<uint64_t>(static_cast<unsigned __int128>(remaining) * cum_weight / weight);
    q[s] += static_cast<int64_t>(upto - given);
    given = upto;
  }
}

// Random key of flat index i: the (i+1)-th output of SplitMix64 seeded with `seed`. The map
// i -> key is a bijection, so keys never tie.
CGGR_HD uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

CGGR_HD int stratum_bits(int64_t S) {
  int bits = 0;
  while ((int64_t{1} << bits) < S) ++bits;
  return bits;
}

// Sort key (ascending) of the valid token at rank r with flat index i: stratum in the high bits,
// then the random key descending. Stable sorting by it (ties: lower rank first) orders each
// stratum by its random draw; the first q[s] of stratum s are selected.
CGGR_HD uint64_t stratified_sort_key(int64_t r, int64_t i, int64_t n, int64_t S, uint64_t seed, int bits) {
  const uint64_t draw = ~splitmix64(seed, static_cast<uint64_t>(i));
  if (bits == 0) return draw;
  return (static_cast<uint64_t>(stratum_of_rank(r, n, S)) << (64 - bits)) | (draw >> bits);
}

}  // namespace cggr
