"""Plain-Python/PyTorch references for the selection ops (shared by the CPU and GPU tests).

Written from the contract in docs/architecture.md and the rules documented in csrc/select_common.h,
independently of the C++ code.
"""
import math
from fractions import Fraction

import torch

MASK64 = (1 << 64) - 1


def ranked_valid(scores, valid=None):
    """Flat indices of the valid tokens, hardest first: finite by value desc, then non-finite; ties by index."""
    s = scores.detach().reshape(-1).float().cpu()
    v = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.reshape(-1).cpu()
    key = torch.where(torch.isfinite(s), s, torch.full_like(s, -math.inf))
    idx = torch.nonzero(v).reshape(-1)
    order = torch.sort(key[idx], descending=True, stable=True).indices
    return idx[order]


def quota(ratio, n):
    """k = ceil(clamp(r, 0, 1) * n * (1 - 2^-24)) exactly, r the float32 ratio; 1 <= k <= n when n > 0."""
    r = float(torch.tensor(float(ratio), dtype=torch.float32))
    if n == 0:
        return 0
    if not r > 0:
        return 1
    if r >= 1:
        return n
    k = math.ceil(Fraction(r) * n * Fraction(2**24 - 1, 2**24))
    return min(max(k, 1), n)


def topk(scores, valid=None, ratio=0.25):
    ranked = ranked_valid(scores, valid)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[ranked[: quota(ratio, ranked.numel())]] = True
    return mask.reshape(scores.shape)


def sequence_aware(scores, valid=None, ratio=0.25, min_tokens=1):
    mask = topk(scores, valid, ratio).clone()
    for b in range(scores.shape[0]):
        row_valid = None if valid is None else valid[b]
        ranked = ranked_valid(scores[b], row_valid)
        mask[b, ranked[: min(min_tokens, ranked.numel())]] = True
    return mask


def stratum_start(s, n, strata):
    return -(-s * n // strata)


def stratum_quotas(n, k, strata):
    """The documented rule (csrc/select_common.h): 1 per non-empty stratum, weighted water-fill of the rest."""
    sizes = [stratum_start(s + 1, n, strata) - stratum_start(s, n, strata) for s in range(strata)]
    q = [0] * strata
    if k == 0:
        return q
    nonempty = [s for s in range(strata) if sizes[s] > 0]
    if k < len(nonempty):
        for s in nonempty[:k]:
            q[s] = 1
        return q
    for s in nonempty:
        q[s] = 1
    remaining = k - len(nonempty)
    active = [s for s in nonempty if sizes[s] >= 2]
    while active:
        weight = sum(strata - s for s in active)
        capped = [s for s in active if remaining * (strata - s) >= (sizes[s] - 1) * weight]
        if not capped:
            break
        for s in capped:
            q[s] = sizes[s]
            remaining -= sizes[s] - 1
        active = [s for s in active if s not in capped]
    if active:
        weight = sum(strata - s for s in active)
        cum, given = 0, 0
        for s in active:
            cum += strata - s
            upto = remaining * cum // weight
            q[s] += upto - given
            given = upto
    return q


def splitmix64(seed, i):
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stratified(scores, valid=None, ratio=0.25, num_strata=4, seed=0):
    ranked = ranked_valid(scores, valid).tolist()
    n = len(ranked)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    k = quota(ratio, n)
    q = stratum_quotas(n, k, num_strata)
    seed &= MASK64
    for s in range(num_strata):
        members = ranked[stratum_start(s, n, num_strata):stratum_start(s + 1, n, num_strata)]
        # Uniform draw without replacement: the members with the largest random keys.
        members.sort(key=lambda i: splitmix64(seed, i), reverse=True)
        mask[members[: q[s]]] = True
    return mask.reshape(scores.shape)
