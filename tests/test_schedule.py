import math

import pytest
import torch

from cggr.schedule import RatioSchedule, batch_confidence


def test_linear_curriculum_falls_from_one_to_min():
    s = RatioSchedule(min_tokens_ratio=0.25, warmup_steps=100, dynamic_threshold=False)
    assert s.curriculum_ratio(0) == 1.0
    assert s.curriculum_ratio(50) == pytest.approx(0.625)
    assert s.curriculum_ratio(100) == pytest.approx(0.25)
    assert s.curriculum_ratio(10_000) == pytest.approx(0.25)
    assert s.ratio(50) == pytest.approx(0.625)


def test_cosine_and_constant_schedules():
    cos = RatioSchedule(0.2, 10, schedule="cosine", dynamic_threshold=False)
    assert cos.curriculum_ratio(0) == pytest.approx(1.0)
    assert cos.curriculum_ratio(5) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 2)) / 2)
    assert cos.curriculum_ratio(10) == pytest.approx(0.2)
    const = RatioSchedule(0.3, 10, schedule="constant", dynamic_threshold=False)
    assert const.curriculum_ratio(0) == pytest.approx(0.3)
    assert RatioSchedule(0.4, 0, dynamic_threshold=False).curriculum_ratio(0) == pytest.approx(0.4)


def test_dynamic_threshold_direction_and_bounds():
    s = RatioSchedule(0.25, 0, dynamic_threshold=True, threshold_sensitivity=0.5)
    low, mid, high = (s.ratio(0, torch.tensor(c)) for c in (0.05, 0.5, 0.95))
    assert low.item() > mid.item() > high.item() - 1e-7
    assert mid.item() == pytest.approx(0.25)
    assert high.item() == pytest.approx(0.25)  # never below min_tokens_ratio
    assert low.item() == pytest.approx(0.25 + 0.5 * 0.45)
    warm = RatioSchedule(0.25, 100, dynamic_threshold=True, threshold_sensitivity=2.0)
    assert warm.ratio(0, torch.tensor(0.0)).item() == pytest.approx(1.0)  # never above 1
    with pytest.raises(ValueError, match="confidence"):
        s.ratio(0)


def test_default_is_the_curriculum_alone():
    """dynamic_threshold defaults to False (as in CGGRModel and CGGRLoss): ratio() is the curriculum's host
    float, it needs no batch confidence and costs no synchronisation."""
    s = RatioSchedule()
    assert s.dynamic_threshold is False
    assert (s.min_tokens_ratio, s.warmup_steps, s.schedule) == (0.25, 1000, "linear")
    assert isinstance(s.ratio(500), float) and s.ratio(500) == pytest.approx(0.625)
    assert s.ratio(500, torch.tensor(0.0)) == pytest.approx(0.625)  # a confidence changes nothing


def test_batch_confidence_ignores_invalid_tokens():
    p1 = torch.tensor([0.9, 0.1, 0.5])
    valid = torch.tensor([True, False, True])
    assert batch_confidence(p1, valid).item() == pytest.approx(0.7)
    assert batch_confidence(p1, torch.zeros(3, dtype=torch.bool)).item() == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"min_tokens_ratio": 0.0}, "min_tokens_ratio"),
    ({"min_tokens_ratio": 1.5}, "min_tokens_ratio"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"schedule": "exp"}, "schedule"),
    ({"threshold_sensitivity": -0.1}, "threshold_sensitivity"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RatioSchedule(**kwargs)
    with pytest.raises(ValueError, match="step"):
        RatioSchedule().curriculum_ratio(-1)
