"""Reference NLL for ``scoring='excess_loss'``: what the reference loss is, besides a tensor you computed.

Excess (reducible) loss is the training model's NLL minus a reference NLL that stands for what cannot be
learned (RHO-LOSS, Rho-1). ``CGGRLoss`` and ``CGGRModel`` take it as ``reference_nll``, one value per
shifted target (``[B, T-1]`` for ``CGGRModel``). Three sources of that tensor:

- ``ReferenceModel(model)``: the per-token NLL of a frozen causal LM, computed on the fly under
  ``no_grad``: a small model trained on clean target data (the RHO-LOSS setting), or
  ``ReferenceModel.frozen_copy(model)``: a frozen copy of the starting checkpoint (excess = how much
  worse than at the start, for fine-tuning). It costs a forward of the reference model per batch;
  compute it once ahead of training where the rows repeat.
- ``RunningBaseline(num_keys)``: a running mean of the router's row NLL per key, used as every token's
  reference. With source ids as keys, excess = how much harder a row is than its own source usually
  is (difficulty without drifting towards high-entropy sources); with dataset row indices as keys, how
  much a row's loss has come down since it was last seen. Device-side, no host synchronisation.

The reference can also be the whole signal: ``CGGRModel(selection='reference_filter',
reference_threshold=t)`` takes the rows whose mean reference NLL is at most ``t`` first (the reference's
own domain) and fills up with random rows, without a router pass; ``selection='reference_ranked'`` takes
those rows lowest mean first, which matters when more pass than are kept (at 4 rows of 32 it reached the
standard run's final target loss in 0.36 of its time, against 0.42 shuffled; BENCHMARKS.md).
``domain_threshold(heldout_row_nll)``
picks ``t`` from the reference's NLL on clean in-domain rows it did not train on; ``otsu_threshold``
splits the training data's reference NLL without them (less reliable: see its docstring).

Typical loop with a running baseline (``CGGRModel.router_row_nll`` is the router's mean NLL per row of
the last forward)::

    ref = baseline.reference_nll(source_ids, input_ids.shape[1])
    loss = cggr_model(input_ids, labels=labels, reference_nll=ref)
    loss.backward(); optimizer.step(); cggr_model.step()
    baseline.update(source_ids, cggr_model.router_row_nll)
"""
import copy
from typing import Optional

import torch
from torch import nn

from .model import check_optional_positive_int, reference_row_means, scored_targets

LOGITS_CHUNK_BYTES = 512 << 20  # float32 logits per chunk of rows in ReferenceModel


def _check_ids(input_ids, labels, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids: expected an integer [B, T] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: need at least 2 positions to have a shifted target, got {tuple(input_ids.shape)}")
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} to match input_ids, got {tuple(t.shape)}")


class ReferenceModel:
    """Per-token NLL ``[B, T-1]`` (float32) of a frozen causal LM, shifted as Hugging Face shifts labels.

    The model is put in eval mode and its parameters stop requiring grad (it is never trained through
    this object). ``rows_per_chunk`` bounds the logits alive at once (default: about
    ``LOGITS_CHUNK_BYTES`` of float32 logits). Targets that are ``-100`` in ``labels``, or whose
    predicting or target position is padding in ``attention_mask``, get NLL 0: the excess-loss scoring
    never reads them.
    """

    def __init__(self, model: nn.Module, rows_per_chunk: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a causal LM), got {type(model).__name__}")
        self.rows_per_chunk = check_optional_positive_int("rows_per_chunk", rows_per_chunk)
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def frozen_copy(cls, model: nn.Module, rows_per_chunk: Optional[int] = None) -> "ReferenceModel":
        """A frozen deep copy of ``model`` as it is now (the starting checkpoint); ``model`` is untouched."""
        return cls(copy.deepcopy(model), rows_per_chunk)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_ids(input_ids, labels, attention_mask)
        labels = input_ids if labels is None else labels
        B, T = input_ids.shape
        targets = labels[:, 1:]
        valid = scored_targets(labels, attention_mask)
        out = torch.zeros(B, T - 1, dtype=torch.float32, device=input_ids.device)
        step = self.rows_per_chunk or max(1, LOGITS_CHUNK_BYTES // (T * self._vocab_size() * 4))
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            mask = None if attention_mask is None else attention_mask[rows]
            logits = self.model(input_ids=input_ids[rows], attention_mask=mask).logits[:, :-1]
            keep = valid[rows]
            chunk_targets = torch.where(keep, targets[rows], torch.zeros_like(targets[rows]))  # any in-range id
            nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), chunk_targets, reduction="none")
            out[rows] = torch.where(keep, nll, torch.zeros_like(nll))
        return out

    def row_nll(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B] float32 mean NLL over each row's scored targets (the row value ``reference_filter`` compares
        with its threshold, and what ``domain_threshold`` takes on held-out rows); NaN for a row with none."""
        return reference_row_means(self(input_ids, labels, attention_mask),
                                    input_ids if labels is None else labels, attention_mask)

    def _vocab_size(self) -> int:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None or not hasattr(head, "weight"):
            raise TypeError(f"{type(self.model).__name__}: no LM head from get_output_embeddings() to size the "
                            "logit chunks by; pass rows_per_chunk")
        return head.weight.shape[0]


class RunningBaseline(nn.Module):
    """Running mean of the router's row NLL per key, as a reference NLL (see the module docstring).

    ``values[key]`` starts unset; ``update(keys, row_nll)`` sets a key's first value to the batch mean of
    its rows, then moves it by ``momentum`` (``new = momentum * old + (1 - momentum) * batch mean``).
    ``reference_nll(keys, seq_len)`` returns ``[B, seq_len - 1]`` (every token of a row gets its key's
    value; keys not seen yet get the mean over the keys seen, or 0 before any update, so they rank by
    their own loss). State (``values``, ``seen``) is in buffers: ``state_dict`` saves it. Everything
    stays on the buffers' device; no host synchronisation.
    """

    def __init__(self, num_keys: int, momentum: float = 0.9, device=None):
        super().__init__()
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
            raise ValueError(f"num_keys must be an int >= 1, got {num_keys!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("values", torch.zeros(num_keys, dtype=torch.float32, device=device))
        self.register_buffer("seen", torch.zeros(num_keys, dtype=torch.bool, device=device))

    def _keys(self, keys: torch.Tensor, name: str = "keys") -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.is_floating_point() or keys.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor of keys, got "
                             f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        if keys.device != self.values.device:
            raise ValueError(f"{name}: on {keys.device}, the baseline is on {self.values.device}")
        return keys.long()

    @torch.no_grad()
    def reference_nll(self, keys: torch.Tensor, seq_len: int) -> torch.Tensor:
        keys = self._keys(keys)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (the rows' length, T), got {seq_len!r}")
        seen = self.seen.to(torch.float32)
        fill = (self.values * seen).sum() / seen.sum().clamp_min(1.0)
        keys = self._in_range(keys)
        row = torch.where(self.seen[keys], self.values[keys], fill)
        return row[:, None].expand(len(keys), seq_len - 1)

    def _in_range(self, keys: torch.Tensor) -> torch.Tensor:
        # A key outside [0, num_keys) fails a device assert (no host sync); the clamp keeps the reads that
        # were already queued in bounds.
        torch._assert_async(((keys >= 0) & (keys < len(self.values))).all(),
                            "RunningBaseline: a key is outside [0, num_keys)")
        return keys.clamp(0, len(self.values) - 1)

    @torch.no_grad()
    def update(self, keys: torch.Tensor, row_nll: torch.Tensor):
        keys = self._keys(keys)
        if not isinstance(row_nll, torch.Tensor) or tuple(row_nll.shape) != tuple(keys.shape):
            raise ValueError(f"row_nll: expected shape {tuple(keys.shape)} (one value per key), got "
                             f"{tuple(row_nll.shape) if isinstance(row_nll, torch.Tensor) else type(row_nll).__name__}")
        keys = self._in_range(keys)
        row_nll = row_nll.detach().to(torch.float32)
        finite = torch.isfinite(row_nll)  # rows with nothing scored (-inf / nan) teach the baseline nothing
        sums = torch.zeros_like(self.values).index_add_(0, keys, torch.where(finite, row_nll, torch.zeros_like(row_nll)))
        counts = torch.zeros_like(self.values).index_add_(0, keys, finite.to(torch.float32))
        hit = counts > 0
        batch_mean = sums / counts.clamp_min(1.0)
        moved = torch.where(self.seen, self.momentum * self.values + (1.0 - self.momentum) * batch_mean, batch_mean)
        self.values.copy_(torch.where(hit, moved, self.values))
        self.seen.logical_or_(hit)


def _row_values(row_nll, name: str) -> torch.Tensor:
    values = torch.as_tensor(row_nll).detach().to("cpu", torch.float64)
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of row NLLs, got shape {tuple(values.shape)}")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise ValueError(f"{name}: {int((~finite).sum())} of {len(values)} values are not finite")
    return values


def domain_threshold(heldout_row_nll, recall: float = 0.95) -> float:
    """``reference_threshold`` from the reference's own domain: the ``recall`` quantile of its mean NLL
    per row on in-domain rows it never trained on (hold a few clean documents out of its training).

    On such rows a fraction ``recall`` falls at or below the threshold, and so, in expectation, does that
    fraction of the in-domain rows of the training data; how many other rows pass depends on how far
    their NLL under the reference is from its domain's (``cggr bench`` reports the precision it got).
    ``heldout_row_nll``: 1-D, finite (a tensor or anything ``torch.as_tensor`` takes). A Python float back.
    """
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 < float(recall) <= 1.0:
        raise ValueError(f"recall must be a number in (0, 1], got {recall!r}")
    values = _row_values(heldout_row_nll, "heldout_row_nll")
    return float(torch.quantile(values, float(recall)))


def otsu_threshold(row_nll) -> float:
    """A split of rows into two groups by their reference NLL alone, without labels or held-out data:
    Otsu's threshold (the cut that maximises the between-group variance; Otsu, 1979).

    It finds the reference's domain only when that domain is the low group of a two-group mix: measured in
    ``cggr bench`` regime 3 (BENCHMARKS.md) it cut between the dictionary and the other sources instead
    (precision 20 % for the 8 % of target rows); prefer ``domain_threshold``. ``row_nll``: 1-D, finite, at
    least 2 distinct values. Returns the midpoint between the two values the cut falls between.
    """
    values = _row_values(row_nll, "row_nll")
    x = torch.sort(values).values
    n = len(x)
    if n < 2 or bool(x[0] == x[-1]):
        raise ValueError(f"row_nll: need at least 2 distinct values to split, got {n} value(s)"
                         + ("" if n < 2 else f", all {float(x[0])}"))
    # Split after position i (i = 1 .. n-1): w0 = i/n, w1 = 1 - w0, between-class variance w0 w1 (m0 - m1)^2.
    csum = torch.cumsum(x, 0)
    i = torch.arange(1, n, dtype=torch.float64)
    m0 = csum[:-1] / i
    m1 = (csum[-1] - csum[:-1]) / (n - i)
    between = (i / n) * (1 - i / n) * (m0 - m1) ** 2
    between = torch.where(x[1:] > x[:-1], between, torch.full_like(between, -1.0))  # no cut between equal values
    cut = int(torch.argmax(between))
    return float((x[cut] + x[cut + 1]) / 2)
