"""Python face of the C++ selection ops ``torch.ops.cggr.select_*`` and ``compact_indices``.

The kernels live in ``csrc/`` (CPU: ``select_cpu.cpp``, CUDA: ``select_cuda.cu``); this module adds
their fake (meta) kernels for torch.compile / export and typed wrappers with argument checks.

Semantics shared by every selection op (see docs/architecture.md):

* quota ``k = ceil(clamp(ratio, 0, 1) * n_valid)``, at least 1 when ``n_valid > 0``, at most ``n_valid``;
  computed exactly (integer math) on the device that holds the data;
* scores rank by value, hardest (largest) first; NaN, +inf and -inf rank below every finite score;
  ties, including among non-finite scores, go to the lower flat index; invalid tokens are never chosen;
* the result is deterministic: the same inputs give the same mask on CPU and CUDA, bit for bit.

Host synchronisations on CUDA: none in any op, whether ``ratio`` is a CPU tensor (read on the host)
or a 0-dim device tensor (read by the kernels). The only exception is drawing a stratified seed from
a CUDA ``generator`` (one sync); the default CPU generator costs none.
"""
import numbers
from typing import Optional, Tuple, Union

import torch

from . import _C  # noqa: F401  (registers the torch.ops.cggr schemas and kernels)

__all__ = ["select_topk", "select_stratified", "select_sequence_aware", "compact_indices"]

Ratio = Union[float, torch.Tensor]

_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STRATA = 1024  # csrc/select_common.h: kMaxStrata


# --------------------------------------------------------------------------------------------------
# fakes: shapes and dtypes only (the C++ ops do the full checks on real tensors)
# --------------------------------------------------------------------------------------------------
def _fake_checks(op, scores, valid):
    torch._check(scores.dtype in _SCORE_DTYPES,
                 lambda: f"cggr.{op}: scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if valid is not None:
        torch._check(valid.dtype == torch.bool, lambda: f"cggr.{op}: valid must be a bool tensor, got {valid.dtype}")
        torch._check(valid.shape == scores.shape,
                     lambda: f"cggr.{op}: valid must have scores' shape {tuple(scores.shape)}, got {tuple(valid.shape)}")


@torch.library.register_fake("cggr::select_topk")
def _select_topk_fake(scores, valid, ratio):
    _fake_checks("select_topk", scores, valid)
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("cggr::select_stratified")
def _select_stratified_fake(scores, valid, ratio, num_strata, seed):
    _fake_checks("select_stratified", scores, valid)
    torch._check(1 <= num_strata <= MAX_STRATA,
                 lambda: f"cggr.select_stratified: num_strata must be in [1, {MAX_STRATA}], got {num_strata}")
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("cggr::select_sequence_aware")
def _select_sequence_aware_fake(scores, valid, ratio, min_tokens_per_sequence):
    _fake_checks("select_sequence_aware", scores, valid)
    torch._check(scores.dim() == 2,
                 lambda: f"cggr.select_sequence_aware: scores must be 2-D [batch, seq], got shape {tuple(scores.shape)}")
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("cggr::compact_indices")
def _compact_indices_fake(mask, capacity):
    torch._check(mask.dtype == torch.bool, lambda: f"cggr.compact_indices: mask must be a bool tensor, got {mask.dtype}")
    return mask.new_empty((capacity,), dtype=torch.int64), mask.new_empty((), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# typed wrappers
# --------------------------------------------------------------------------------------------------
def _ratio_tensor(ratio: Ratio) -> torch.Tensor:
    """A Python number becomes a CPU 0-dim float32 tensor (read on the host: no sync); tensors pass through."""
    if isinstance(ratio, torch.Tensor):
        return ratio
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a float in (0, 1] or a 0-dim float32 tensor, got {type(ratio).__name__}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return torch.tensor(float(ratio), dtype=torch.float32)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def select_topk(scores: torch.Tensor, valid: Optional[torch.Tensor] = None, ratio: Ratio = 0.25) -> torch.Tensor:
    """Boolean mask (scores' shape) of the ``k = ceil(ratio * n_valid)`` hardest valid tokens.

    ``scores``: float32/bfloat16/float16, any shape and strides. ``valid``: bool of the same shape or
    None (all valid). ``ratio``: float in (0, 1] or 0-dim float32 tensor (CPU or scores' device; a device
    tensor is clamped to [0, 1] on the device). Host syncs on CUDA: 0.
    """
    return torch.ops.cggr.select_topk(scores, valid, _ratio_tensor(ratio))


def select_stratified(scores: torch.Tensor, valid: Optional[torch.Tensor] = None, ratio: Ratio = 0.25,
                      num_strata: int = 4, seed: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Stratified random selection of exactly ``k = ceil(ratio * n_valid)`` valid tokens.

    Valid tokens, ranked hardest first, are split into ``num_strata`` (1..1024) equal-count strata
    (stratum 0 hardest). Quota: every non-empty stratum gets one token (if k allows: else the k hardest
    strata get one), the rest is shared in proportion to the weights ``num_strata - s`` (harder strata
    get more), capped at each stratum's size, with exact integer rounding. Inside a stratum the tokens
    are a uniform random sample without replacement, keyed by ``splitmix64(seed, flat index)``: the
    same seed gives the same mask on CPU and CUDA.

    ``seed``: int (any 64-bit value); when None one is drawn from ``generator`` (or torch's default
    CPU generator), so ``torch.manual_seed`` makes runs reproducible. Host syncs on CUDA: 0 (1 when
    ``generator`` is a CUDA generator, to read the drawn seed).
    """
    num_strata = _check_int("num_strata", num_strata, 1)
    if num_strata > MAX_STRATA:
        raise ValueError(f"num_strata must be <= {MAX_STRATA}, got {num_strata}")
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=device).item())
    else:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        seed = _check_int("seed", seed, -(2**63))
        if seed >= 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {seed}")
        if seed >= 2**63:  # the schema's int is signed: keep the same 64-bit pattern
            seed -= 2**64
    return torch.ops.cggr.select_stratified(scores, valid, _ratio_tensor(ratio), num_strata, seed)


def select_sequence_aware(scores: torch.Tensor, valid: Optional[torch.Tensor] = None, ratio: Ratio = 0.25,
                          min_tokens_per_sequence: int = 1) -> torch.Tensor:
    """Global top-k of ``scores`` [B, T] plus, per row, its hardest valid tokens until the row has at
    least ``min_tokens_per_sequence`` selected (all its valid tokens if it has fewer). Host syncs on CUDA: 0.
    """
    min_tokens_per_sequence = _check_int("min_tokens_per_sequence", min_tokens_per_sequence, 0)
    return torch.ops.cggr.select_sequence_aware(scores, valid, _ratio_tensor(ratio), min_tokens_per_sequence)


def compact_indices(mask: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 indices of ``mask``'s True entries (ascending) in a ``[capacity]`` tensor padded with -1,
    and a 0-dim int64 ``count = min(number of True, capacity)`` on the mask's device. Host syncs on CUDA: 0.
    """
    capacity = _check_int("capacity", capacity, 0)
    return torch.ops.cggr.compact_indices(mask, capacity)
