"""How many tokens to keep: a curriculum on the step count, then an optional dynamic threshold.

Curriculum (``schedule``):
- ``linear`` (default): ratio = 1 - (1 - r_min) * min(step / warmup_steps, 1)
- ``cosine``: ratio = r_min + (1 - r_min) * (1 + cos(pi * min(step / warmup_steps, 1))) / 2
- ``constant``: ratio = r_min from the first step
``warmup_steps=0`` means r_min from the first step for every schedule.

Dynamic threshold: with c the batch confidence (mean top-1 probability over valid tokens, in [0, 1]),
ratio = clamp(curriculum_ratio + sensitivity * (0.5 - c), r_min, 1). Low confidence keeps more tokens,
high confidence fewer, never below r_min nor above 1; a non-finite confidence (a NaN or inf logit in the
batch) leaves the curriculum ratio. It is computed on the device (a 0-dim tensor the
selection ops read there), so it costs no host synchronisation.
"""
import math
from typing import Optional, Union

import torch

SCHEDULES = ("linear", "cosine", "constant")


def check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class RatioSchedule:
    def __init__(self, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000, schedule: str = "linear",
                 dynamic_threshold: bool = False, threshold_sensitivity: float = 0.5):
        self.min_tokens_ratio = check_ratio("min_tokens_ratio", min_tokens_ratio)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(threshold_sensitivity, (int, float)) or not (0.0 <= threshold_sensitivity <= 2.0):
            raise ValueError(f"threshold_sensitivity must be a number in [0, 2], got {threshold_sensitivity!r}")
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.dynamic_threshold = bool(dynamic_threshold)
        self.threshold_sensitivity = float(threshold_sensitivity)

    def __repr__(self):
        return (f"RatioSchedule(min_tokens_ratio={self.min_tokens_ratio!r}, warmup_steps={self.warmup_steps!r}, "
                f"schedule={self.schedule!r}, dynamic_threshold={self.dynamic_threshold!r}, "
                f"threshold_sensitivity={self.threshold_sensitivity!r})")

    def curriculum_ratio(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        r_min = self.min_tokens_ratio
        if self.schedule == "constant" or self.warmup_steps == 0:
            return r_min
        progress = min(step / self.warmup_steps, 1.0)
        if self.schedule == "linear":
            return 1.0 - (1.0 - r_min) * progress
        return r_min + (1.0 - r_min) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def ratio(self, step: int, confidence: Optional[torch.Tensor] = None) -> Union[float, torch.Tensor]:
        """Host float without a dynamic threshold; else a 0-dim float32 tensor on confidence's device."""
        base = self.curriculum_ratio(step)
        if not self.dynamic_threshold:
            return base
        if confidence is None:
            raise ValueError("dynamic_threshold=True needs the batch confidence")
        adjusted = base + self.threshold_sensitivity * (0.5 - confidence.to(torch.float32))
        # a non-finite confidence (a NaN or inf logit) leaves the curriculum ratio: never below r_min
        adjusted = torch.where(torch.isfinite(adjusted), adjusted, torch.full_like(adjusted, base))
        return adjusted.clamp(self.min_tokens_ratio, 1.0)


def batch_confidence(p1: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean top-1 probability over valid tokens (0-dim, on p1's device; 1.0 when nothing is valid)."""
    n_valid = valid.sum()
    total = torch.where(valid, p1, torch.zeros_like(p1)).sum()
    return torch.where(n_valid > 0, total / n_valid.clamp_min(1), torch.ones_like(total))
