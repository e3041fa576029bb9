"""Turn per-token statistics into one difficulty score per token (higher = harder).

Strategies (stats come from one pass of ``token_stats`` over the logits):

- ``entropy``:  H = -sum_v p_v log p_v                      (nats)
- ``margin``:   1 - (p1 - p2)                               (p1, p2: top-1 and top-2 probabilities)
- ``loss``:     nll = lse - logit[target]
- ``combined``: w_H * z(H) + w_m * z(margin) + w_l * z(nll), where z(x) = (x - mean) / (std + 1e-6)
  over the batch's valid tokens, so the three signals are comparable whatever their units;
  weights default to 1 each (``combined_weights``).
- ``excess_loss``: nll - reference_nll, the part of the loss a reference model says is learnable
  (RHO-LOSS / Rho-1); needs ``reference_nll`` shaped like the targets.

Everything stays on the device: no host synchronisation.
"""
from typing import Mapping, Optional

import torch

STRATEGIES = ("entropy", "margin", "loss", "combined", "excess_loss")
DEFAULT_COMBINED_WEIGHTS = {"entropy": 1.0, "margin": 1.0, "loss": 1.0}


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"scoring must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def check_combined_weights(weights: Optional[Mapping[str, float]]) -> dict:
    if weights is None:
        return dict(DEFAULT_COMBINED_WEIGHTS)
    unknown = set(weights) - set(DEFAULT_COMBINED_WEIGHTS)
    if unknown:
        raise ValueError(f"combined_weights: unknown signals {sorted(unknown)}; expected keys from "
                         f"{sorted(DEFAULT_COMBINED_WEIGHTS)}")
    merged = {name: float(weights.get(name, 0.0)) for name in DEFAULT_COMBINED_WEIGHTS}
    if all(w == 0.0 for w in merged.values()):
        raise ValueError(f"combined_weights: at least one weight must be non-zero, got {dict(weights)}")
    return merged


def _combined(signals, weights, valid: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * z(signal_i), all signals standardised together as one [S, N] tensor: a handful of
    kernels instead of ten per signal (at 16K tokens the launches, not the bytes, are the cost)."""
    keep = valid.reshape(1, -1)
    # where, not a multiply: a non-finite value on an ignored token must not leak into the statistics
    x = torch.where(keep, torch.stack([s.reshape(-1) for s in signals]), 0.0)
    n_valid = keep.sum().clamp_min(1).to(x.dtype)
    mean = x.sum(1, keepdim=True) / n_valid
    centred = torch.where(keep, x - mean, 0.0)
    std = (centred.square().sum(1, keepdim=True) / n_valid).sqrt()
    z = centred / (std + 1e-6)
    # weights stay Python floats: a weight tensor built on the GPU would be a host-to-device copy per call
    combined = z[0] * weights[0]
    for i in range(1, len(weights)):
        combined = combined + z[i] * weights[i]
    return combined.reshape(valid.shape)


def score(stats, strategy: str, valid: torch.Tensor, combined_weights: Optional[Mapping[str, float]] = None,
          reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difficulty per token, float32, shaped like ``stats.nll``; 0 on invalid tokens.

    ``stats``: a ``TokenStats`` (lse, nll, entropy, p1, p2). ``valid``: bool, same shape.
    """
    check_strategy(strategy)
    if valid.shape != stats.nll.shape:
        raise ValueError(f"valid: expected shape {tuple(stats.nll.shape)}, got {tuple(valid.shape)}")
    margin = 1.0 - (stats.p1 - stats.p2)
    if strategy == "entropy":
        raw = stats.entropy
    elif strategy == "margin":
        raw = margin
    elif strategy == "loss":
        raw = stats.nll
    elif strategy == "excess_loss":
        if reference_nll is None:
            raise ValueError("scoring='excess_loss' needs reference_nll (per-token NLL of a reference model)")
        if reference_nll.shape != stats.nll.shape:
            raise ValueError(f"reference_nll: expected shape {tuple(stats.nll.shape)} (one value per target), "
                             f"got {tuple(reference_nll.shape)}")
        raw = stats.nll - reference_nll.to(device=stats.nll.device, dtype=torch.float32)
    else:
        weights = check_combined_weights(combined_weights)
        used = [(w, signal) for w, signal in ((weights["entropy"], stats.entropy), (weights["margin"], margin),
                                              (weights["loss"], stats.nll)) if w != 0.0]
        raw = _combined([signal for _, signal in used], [w for w, _ in used], valid)
    return torch.where(valid, raw, torch.zeros_like(raw))
