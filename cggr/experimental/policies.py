"""Row policies that lost in every measured regime (BENCHMARKS.md), kept runnable. Contract: ``cggr.policies``."""
import math
from typing import Optional

import torch

from ..policies import HardestRows, RouterSettings, RowPolicy, RowSelection, _ascending


class HalfHardestRows(HardestRows):
    """Half the rows (rounded up) with the highest router score, the rest uniformly from the others.

    ``scoring`` as in ``HardestRows``, ``'excess_loss'`` included (then the call passes ``reference_nll``;
    the default router is then ``ExcessLossRows``'s: 1 block, every 8th position, unless ``router`` says
    otherwise). Measured as ``cggr_half_hardest`` / ``excess_half_hardest`` in ``cggr bench`` (earlier ``cggr_stratified`` / ``excess_stratified``).
    """

    accepts_excess_loss = True

    def select(self, row_scores, k, generator):
        k_hard = (k + 1) // 2
        hard = torch.topk(row_scores, k_hard, sorted=False).indices
        if k_hard == k:
            return RowSelection(_ascending(hard), None)
        keys = torch.rand(row_scores.shape, generator=generator, device=row_scores.device)
        keys = keys.index_fill(0, hard, -1.0)  # rand is in [0, 1): taken rows lose every draw
        rest = torch.topk(keys, k - k_hard, sorted=False).indices
        return RowSelection(_ascending(torch.cat([hard, rest])), None)


def _check_importance_options(mix, temperature):
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix must be a number in [0, 1], got {mix!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(float(temperature)) or float(temperature) <= 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(mix), float(temperature)


def importance_probabilities(row_scores: torch.Tensor, mix: float = 0.9, temperature: float = 1.0) -> torch.Tensor:
    """Sampling distribution of ``ImportanceRows``: [B] float32, sums to 1, no host sync.

    ``p_i = (1 - mix) / B + mix * q_i`` with ``q = softmax(row_scores / temperature)`` over the rows with a
    finite score; rows without one get ``q = 0``, and if no row is scored ``q`` is uniform.
    """
    B = row_scores.shape[0]
    scores = row_scores.to(torch.float32)
    scored = torch.isfinite(scores)
    logits = torch.where(scored, scores / temperature, torch.full_like(scores, -math.inf))
    q = torch.softmax(logits, 0)  # NaN everywhere when no row is scored: replaced by uniform below
    q = torch.where(scored.any(), q, torch.full_like(q, 1.0 / B))
    return (1.0 - mix) / B + mix * q


class ImportanceRows(HardestRows):
    """k i.i.d. draws WITH replacement from ``importance_probabilities`` (``mix`` in [0, 1], ``temperature``
    > 0), each weighted ``1 / (k p)``, the loss divided by the whole batch's valid target count
    (``loss_norm='batch'``): its expectation, and its gradient's, is the plain model's token-mean loss on
    all B rows. A row drawn twice appears twice. Rows with ``p = 0`` are never drawn."""
    loss_norm = "batch"
    accepts_excess_loss = True

    def __init__(self, mix: float = 0.9, temperature: float = 1.0, scoring: str = "loss",
                 router: Optional[RouterSettings] = None, combined_weights=None):
        super().__init__(scoring, router, combined_weights)
        self.mix, self.temperature = _check_importance_options(mix, temperature)

    def _fields(self):
        return {"mix": self.mix, "temperature": self.temperature, **super()._fields()}

    def select(self, row_scores, k, generator):
        p = importance_probabilities(row_scores, self.mix, self.temperature)
        draws = torch.multinomial(p, k, replacement=True, generator=generator)
        indices = torch.sort(draws).values
        weight = 1.0 / (k * p.index_select(0, indices))
        return RowSelection(indices, weight.to(torch.float32))


class ReferenceLowest(RowPolicy):
    """The k rows with the lowest mean reference NLL: the reference's ranking alone, no threshold, no router.
    Rows with nothing scored (NaN) come last."""
    uses_reference_rows = True

    def select(self, row_reference, k, generator):
        keys = torch.where(torch.isnan(row_reference), -math.inf, -row_reference.to(torch.float32))
        return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


class ReferenceHalfLowest(RowPolicy):
    """Half the rows (rounded up) with the lowest mean reference NLL, the rest uniformly from the others."""
    uses_reference_rows = True

    def select(self, row_reference, k, generator):
        keys = torch.where(torch.isnan(row_reference), -math.inf, -row_reference.to(torch.float32))
        return HalfHardestRows.select(self, keys, k, generator)
