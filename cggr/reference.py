"""Reference NLL for excess loss: what the reference loss is, besides a tensor you computed.

Excess (reducible) loss is the training model's NLL minus a reference NLL that stands for what cannot be
learned (RHO-LOSS, Rho-1). ``CGGRModel(policy=ExcessLossRows())`` and ``CGGRLoss(scoring='excess_loss')``
take it as ``reference_nll``, one value per shifted target (``[B, T-1]`` for ``CGGRModel``).

- ``ReferenceModel(model)``: the per-token NLL of a frozen causal LM, computed under ``no_grad``: a small
  model trained on clean target data (the RHO-LOSS setting), or ``ReferenceModel.frozen_copy(model)``: a
  frozen copy of the starting checkpoint (excess = how much worse than at the start). It costs a forward
  of the reference model per call; compute it once ahead of training where the rows repeat.
- ``domain_threshold(heldout_row_nll)``: the threshold of ``ReferenceFilter`` / ``ReferenceRanked`` (the
  reference as a domain filter), from the reference's NLL on clean in-domain rows it did not train on.

Typical loop::

    reference = ReferenceModel(small_model)
    cggr_model = CGGRModel(model, policy=ExcessLossRows(), min_tokens_ratio=0.25, warmup_steps=0)
    # the router reads every 8th target only: score those (1/8 of the reference's LM head and loss)
    stride = cggr_model.reference_token_stride
    loss = cggr_model(input_ids, labels=labels, reference_nll=reference(input_ids, labels, token_stride=stride))
    loss.backward(); optimizer.step(); cggr_model.step()

Parked alternatives (``RunningBaseline``, ``otsu_threshold``) live in ``cggr.experimental``.
"""
import copy
import math
import warnings
from typing import Optional

import torch
from torch import nn

from .router_adapters import build_adapter
from .rows import check_optional_positive_int, reference_row_means, scored_targets

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

    For the Hugging Face decoder-only models the router supports (``cggr.router_adapters``) the model's
    layers run once over the whole batch and only its LM head (with its logit scale and soft cap) runs per
    chunk of rows; any other causal LM runs its whole forward per chunk (slower where the host bounds the
    step: one warning at construction says so, with the reason).
    """

    def __init__(self, model: nn.Module, rows_per_chunk: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a causal LM), got {type(model).__name__}")
        self.rows_per_chunk = check_optional_positive_int("rows_per_chunk", rows_per_chunk)
        self.model = model.eval().requires_grad_(False)
        self._trunk = None  # the router's adapter at full depth: the layers once, the head per chunk
        try:
            depth = build_adapter(model, 1, "ReferenceModel").depth()
            self._trunk = build_adapter(model, depth, "ReferenceModel")
            self._trunk.head()  # an nn.Linear LM head (not, e.g., a LoRA-wrapped one), or a TypeError now
        except TypeError as unsupported:  # the adapters' one refusal: not a decoder-only HF causal LM they know
            warnings.warn(f"{unsupported}; so its whole forward runs once per chunk of rows (not only its LM head)",
                          stacklevel=2)

    @classmethod
    def frozen_copy(cls, model: nn.Module, rows_per_chunk: Optional[int] = None) -> "ReferenceModel":
        """A frozen deep copy of ``model`` as it is now (the starting checkpoint); ``model`` is untouched."""
        return cls(copy.deepcopy(model), rows_per_chunk)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, token_stride: int = 1) -> torch.Tensor:
        """``token_stride=s``: only the targets ``s-1, 2s-1, ...`` (0-based, of the ``T-1``), the ones a router
        with ``RouterSettings(token_stride=s)`` scores (``CGGRModel.reference_token_stride``), get their NLL;
        the others are NaN. The LM head and the cross entropy then run on ``1/s`` of the positions."""
        _check_ids(input_ids, labels, attention_mask)
        if isinstance(token_stride, bool) or not isinstance(token_stride, int) or token_stride < 1:
            raise ValueError(f"token_stride must be an int >= 1, got {token_stride!r}")
        labels = input_ids if labels is None else labels
        B, T = input_ids.shape
        scored = slice(token_stride - 1, None, token_stride)  # of the T-1 shifted targets
        targets = labels[:, 1:][:, scored]
        valid = scored_targets(labels, attention_mask)[:, scored]
        fill = 0.0 if token_stride == 1 else math.nan
        out = torch.full((B, T - 1), fill, dtype=torch.float32, device=input_ids.device)
        n_scored = targets.shape[1]
        if n_scored == 0:  # a stride longer than the row: nothing to score
            return out
        step = self.rows_per_chunk or max(1, LOGITS_CHUNK_BYTES // (n_scored * self._vocab_size() * 4))
        hidden = None if self._trunk is None else self._trunk.trunk(input_ids, attention_mask, None, None)
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            if hidden is None:
                mask = None if attention_mask is None else attention_mask[rows]
                logits = self.model(input_ids=input_ids[rows], attention_mask=mask).logits[:, :-1][:, scored]
            else:
                logits = self._head_logits(hidden[rows, :-1][:, scored])
            keep = valid[rows]
            chunk_targets = torch.where(keep, targets[rows], torch.zeros_like(targets[rows]))  # any in-range id
            # flattened to [N, V]: the [N, V, T] layout (class dim in the middle) runs CUDA's spatial
            # log-softmax, several times slower at a large vocabulary
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk_targets.reshape(-1),
                                              reduction="none").view(chunk_targets.shape)
            out[rows, scored] = torch.where(keep, nll, torch.zeros_like(nll))
        return out

    def _head_logits(self, hidden):
        """The model's logits from its final hidden states: LM head, then the soft cap where it has one."""
        head = self._trunk.head()
        logits = nn.functional.linear(hidden, head.weight, head.bias)
        cap = self._trunk.softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

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


_MOVED = {"RunningBaseline": "cggr.experimental.RunningBaseline", "otsu_threshold": "cggr.experimental.otsu_threshold"}


def __getattr__(name):
    if name in _MOVED:
        from ._legacy import MovedError

        raise MovedError(f"cggr.reference.{name} moved to {_MOVED[name]} (it lost in every measured regime; "
                             "BENCHMARKS.md)")
    raise AttributeError(f"module 'cggr.reference' has no attribute {name!r}")
