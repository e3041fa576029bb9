import pytest
import torch

from cggr.scoring import score
from cggr.stats_ops import TokenStats


def _stats(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1 = torch.rand(n, generator=g) * 0.5 + 0.5
    p2 = torch.rand(n, generator=g) * (1 - p1)
    return TokenStats(lse=torch.randn(n, generator=g), nll=torch.rand(n, generator=g) * 5,
                      entropy=torch.rand(n, generator=g) * 3, p1=p1, p2=p2)


def test_single_signal_strategies():
    stats = _stats()
    valid = torch.rand(37, generator=torch.Generator().manual_seed(1)) > 0.2
    zero = torch.zeros(37)
    torch.testing.assert_close(score(stats, "entropy", valid), torch.where(valid, stats.entropy, zero))
    torch.testing.assert_close(score(stats, "margin", valid), torch.where(valid, 1 - (stats.p1 - stats.p2), zero))
    torch.testing.assert_close(score(stats, "loss", valid), torch.where(valid, stats.nll, zero))
    ref = torch.rand(37)
    torch.testing.assert_close(score(stats, "excess_loss", valid, reference_nll=ref),
                               torch.where(valid, stats.nll - ref, zero))


def test_combined_is_weighted_sum_of_standardised_signals_over_valid_tokens():
    stats = _stats(seed=3)
    valid = torch.ones(37, dtype=torch.bool)
    valid[::5] = False

    def z(x):
        x = x.double()[valid]
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    margin = 1 - (stats.p1 - stats.p2)
    expected = 1.0 * z(stats.entropy) + 2.0 * z(margin) + 0.5 * z(stats.nll)
    got = score(stats, "combined", valid, {"entropy": 1.0, "margin": 2.0, "loss": 0.5})
    torch.testing.assert_close(got[valid].double(), expected, rtol=1e-5, atol=1e-5)
    assert (got[~valid] == 0).all()
    # scaling one signal's units does not change its standardised contribution
    scaled = stats._replace(nll=stats.nll * 1000)
    torch.testing.assert_close(score(scaled, "combined", valid), score(stats, "combined", valid),
                               rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    stats = _stats()
    valid = torch.ones(37, dtype=torch.bool)
    with pytest.raises(ValueError, match="scoring must be one of"):
        score(stats, "confidence", valid)
    with pytest.raises(ValueError, match="reference_nll"):
        score(stats, "excess_loss", valid)
    with pytest.raises(ValueError, match="reference_nll: expected shape"):
        score(stats, "excess_loss", valid, reference_nll=torch.zeros(5))
    with pytest.raises(ValueError, match="valid: expected shape"):
        score(stats, "loss", valid[:3])
    with pytest.raises(ValueError, match="unknown signals"):
        score(stats, "combined", valid, {"entropi": 1.0})
    with pytest.raises(ValueError, match="non-zero"):
        score(stats, "combined", valid, {"entropy": 0.0, "margin": 0.0, "loss": 0.0})


def test_combined_ignores_non_finite_values_on_invalid_tokens():
    stats = _stats(seed=5)
    valid = torch.ones(37, dtype=torch.bool)
    valid[4] = False
    poisoned = stats._replace(nll=stats.nll.clone().index_fill_(0, torch.tensor([4]), float("nan")))
    got = score(poisoned, "combined", valid)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, score(stats, "combined", valid))
