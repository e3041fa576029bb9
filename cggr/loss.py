"""CGGRLoss: score every token in one pass, keep the hard ones, put loss and gradient on them only."""
import math
from typing import Mapping, Optional

import torch
from torch import nn

from . import distributed as dp_ops
from . import ops
from .schedule import RatioSchedule, batch_confidence, check_ratio
from .scoring import check_combined_weights, check_strategy, score

SELECTIONS = ("topk", "stratified", "sequence_aware")
REDUCTIONS = ("mean", "sum", "none")


class SelectiveCrossEntropy(torch.autograd.Function):
    """Cross entropy on the selected tokens, from statistics the scoring pass already computed.

    Forward reads no logits (the NLL is saved by ``token_stats``); backward writes
    (softmax - onehot) * scale into the selected rows and zeros elsewhere, in one kernel.
    """

    @staticmethod
    def forward(ctx, logits, targets, lse, nll, selected, ignore_index: int, reduction: str):
        chosen = torch.where(selected, nll, torch.zeros_like(nll))
        n_selected = selected.sum()
        if reduction == "mean":
            # an empty selection gives 0 (sum of nothing over 1), never NaN
            loss = chosen.sum() / n_selected.clamp_min(1).to(nll.dtype)
        elif reduction == "sum":
            loss = chosen.sum()
        else:
            loss = chosen
        ctx.save_for_backward(logits, targets, lse, selected, n_selected)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, selected, n_selected = ctx.saved_tensors
        row_weight = None
        if ctx.reduction == "mean":
            scale = grad_loss.to(torch.float32) / n_selected.clamp_min(1).to(torch.float32)
        elif ctx.reduction == "sum":
            scale = grad_loss.to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=logits.device)
            row_weight = grad_loss.to(torch.float32).reshape(-1).contiguous()
        grad_logits = ops.selective_ce_backward(logits, targets, lse, selected, scale, row_weight,
                                                ignore_index=ctx.ignore_index)
        return grad_logits, None, None, None, None, None, None


class CGGRLoss(nn.Module):
    """Drop-in selective cross entropy.

    ``criterion(logits, targets)``: logits [N, V] or [B, T, V], targets aligned with them ([N] or
    [B, T]); with ``shift_labels=True`` the targets are Hugging Face-style labels (position t is
    scored against labels[t + 1]). Tokens whose target is ``ignore_index`` are never selected or
    counted. ``reduction='mean'`` averages over the selected tokens; a batch with nothing valid
    gives a loss of 0 with a zero gradient.

    Options: ``scoring`` in entropy|margin|loss|combined|excess_loss (see ``cggr.scoring``),
    ``selection`` in topk|stratified|sequence_aware, the curriculum (``min_tokens_ratio``,
    ``warmup_steps``, ``schedule``) and the dynamic threshold (see ``cggr.schedule``).
    ``selection='stratified'`` is the strata op ``cggr.ops.select_stratified`` (a uniform sample inside
    equal-count difficulty strata, more from the harder strata).
    Defaults agree with ``CGGRModel`` where they share a concept: ``scoring='loss'``, a fixed ratio
    (``dynamic_threshold=False``), ``min_tokens_ratio=0.25``, ``warmup_steps=1000``, ``schedule='linear'``
    (BENCHMARKS.md, "Defaults").
    Call ``step()`` once per optimizer step; ``get_metrics()`` reads the last call's numbers
    (it synchronises; ``forward`` does not, except target validation when ``validate_targets``).

    ``data_parallel``: None (default: this process's tokens only, like ``nn.CrossEntropyLoss``), ``'auto'``
    (``cggr.DataParallel()`` when torch.distributed runs more than one process) or a ``cggr.DataParallel``
    (per-rank selection only: tokens are chosen on each rank). Then ``reduction='mean'`` returns
    ``sum of the selected NLL * W / N``, ``N`` the selected tokens all-reduced over the group, so that
    DDP's / FSDP2's gradient mean is the gradient of the mean over every rank's selected tokens; the dynamic
    threshold uses the group's mean confidence (one ratio for every rank); the first call compares the
    configuration across ranks (``cggr.distributed``).
    """

    def __init__(self, scoring: str = "loss", selection: str = "topk", num_strata: int = 4,
                 min_tokens_per_sequence: int = 1, dynamic_threshold: bool = False,
                 threshold_sensitivity: float = 0.5, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000,
                 ignore_index: int = -100, reduction: str = "mean", schedule: str = "linear",
                 combined_weights: Optional[Mapping[str, float]] = None, shift_labels: bool = False,
                 seed: int = 0, validate_targets: bool = True, data_parallel=None):
        super().__init__()
        self.scoring = check_strategy(scoring)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(num_strata, int) or num_strata < 1:
            raise ValueError(f"num_strata must be an int >= 1, got {num_strata!r}")
        if not isinstance(min_tokens_per_sequence, int) or min_tokens_per_sequence < 0:
            raise ValueError(f"min_tokens_per_sequence must be an int >= 0, got {min_tokens_per_sequence!r}")
        check_ratio("min_tokens_ratio", min_tokens_ratio)
        self.selection = selection
        self.num_strata = num_strata
        self.min_tokens_per_sequence = min_tokens_per_sequence
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.combined_weights = check_combined_weights(combined_weights)
        self.shift_labels = bool(shift_labels)
        self.seed = int(seed)
        self.validate_targets = bool(validate_targets)
        self.schedule = RatioSchedule(min_tokens_ratio, warmup_steps, schedule, dynamic_threshold,
                                      threshold_sensitivity)
        self.step_count = 0
        self._calls = 0
        self._last = None
        if not (data_parallel is None or data_parallel == dp_ops.DATA_PARALLEL_AUTO):
            data_parallel = dp_ops.resolve_data_parallel(data_parallel, "CGGRLoss")
            if data_parallel.selection != "per_rank":
                raise ValueError("CGGRLoss(data_parallel=DataParallel(selection='global')): CGGRLoss selects tokens "
                                 "on each rank; global selection chooses rows (CGGRModel). Use selection='per_rank'")
        self._data_parallel_arg = data_parallel
        self._dp_resolved = False
        self._dp = None

    def _data_parallel(self):
        """The resolved setting (None: no collectives); the first call compares the ranks' configuration."""
        if not self._dp_resolved:
            self._dp = dp_ops.resolve_data_parallel(self._data_parallel_arg, "CGGRLoss")
            if self._dp is not None and self._dp.check_config:
                dp_ops.check_same_config({"scoring": self.scoring, "selection": self.selection,
                                          "schedule": self.schedule, "step": self.step_count, "seed": self.seed,
                                          "reduction": self.reduction, "ignore_index": self.ignore_index},
                                         self._dp, "CGGRLoss")
            self._dp_resolved = True
        return self._dp

    # -- curriculum state -------------------------------------------------------------------
    def step(self):
        """Advance the curriculum by one step; call once per optimizer step (after ``optimizer.step()``).
        No synchronisation."""
        self.step_count += 1

    def get_extra_state(self):
        return {"step": self.step_count, "calls": self._calls}

    def set_extra_state(self, state):
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict: step must be an int >= 0, got {step!r}")
        self.step_count = step
        self._calls = int(state.get("calls", 0))

    @property
    def current_ratio(self) -> float:
        """The curriculum ratio for the current step (before any dynamic threshold)."""
        return self.schedule.curriculum_ratio(self.step_count)

    # -- selection --------------------------------------------------------------------------
    def select(self, stats, valid: torch.Tensor, reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores, ratio and mask for one batch: the shared path of the logits and linear entry points."""
        scores = score(stats, self.scoring, valid, self.combined_weights, reference_nll)
        confidence = batch_confidence(stats.p1, valid)
        dp = self._data_parallel()
        if dp is not None and self.schedule.dynamic_threshold:
            confidence = dp_ops.mean_over_ranks(confidence, dp)  # one ratio for every rank
        ratio = self.schedule.ratio(self.step_count, confidence)
        if isinstance(ratio, torch.Tensor):
            ratio = ratio.to(scores.device)
        if self.selection == "topk":
            mask = ops.select_topk(scores, valid, ratio)
        elif self.selection == "stratified":
            # a fresh draw every call, reproducible from (seed, call number); ranks draw independently
            rank = dp.rank if dp is not None else 0
            mask = ops.select_stratified(scores, valid, ratio, num_strata=self.num_strata,
                                         seed=self.seed * 1_000_003 + self._calls + rank * 0x9E3779B1)
        else:
            if scores.dim() != 2:
                raise ValueError("selection='sequence_aware' needs [B, T, V] logits (or [B, T, H] hidden) with "
                                 f"[B, T] targets; got targets of shape {tuple(scores.shape)}")
            mask = ops.select_sequence_aware(scores, valid, ratio,
                                             min_tokens_per_sequence=self.min_tokens_per_sequence)
        self._calls += 1
        self._last = {"ratio": ratio, "mask": mask, "valid": valid, "confidence": confidence, "stats": stats}
        return mask

    # -- entry points -----------------------------------------------------------------------
    def _align(self, inputs: torch.Tensor, targets: torch.Tensor, what: str):
        """Check shapes and apply the label shift; returns (inputs, targets) with matching leading dims."""
        last = "V" if what == "logits" else "H"
        if inputs.dim() not in (2, 3):
            raise ValueError(f"{what} must be [N, {last}] or [B, T, {last}], got shape {tuple(inputs.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
        if self.shift_labels:
            if inputs.dim() != 3:
                raise ValueError(f"shift_labels=True needs [B, T, ...] {what}, got shape {tuple(inputs.shape)}")
            inputs, targets = inputs[:, :-1], targets[:, 1:]
        if tuple(targets.shape) != tuple(inputs.shape[:-1]):
            raise ValueError(f"targets: expected shape {tuple(inputs.shape[:-1])} to match {what} "
                             f"{tuple(inputs.shape)}, got {tuple(targets.shape)}")
        return inputs, targets

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                reference_nll: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Selective cross entropy of ``logits`` against ``targets``.

        ``logits``: [N, V] or [B, T, V], float32/bfloat16/float16, last-dim stride 1. ``targets``: int64 (or
        int32) [N] or [B, T] aligned with the logits (with ``shift_labels=True``: Hugging Face labels, shifted
        here). ``reference_nll``: like ``targets``, float, required by ``scoring='excess_loss'`` only. Scores
        every token in one pass, keeps the ratio of the curriculum (``current_ratio``; with the dynamic
        threshold, adjusted by the batch's confidence on the device) and returns the loss of the kept tokens
        (``reduction``); the backward writes gradient to the kept tokens' logits only. Synchronisation: one,
        the target check (``validate_targets=False`` skips it). Errors: a ``ValueError`` naming the argument
        for a wrong shape, dtype or target.
        """
        logits, targets = self._align(logits, targets, "logits")
        token_shape = targets.shape
        flat_logits = logits.reshape(-1, logits.shape[-1])  # a view when rows are evenly strided
        flat_targets = targets.reshape(-1)
        stats = ops.token_stats(flat_logits, flat_targets, ignore_index=self.ignore_index,
                                validate_targets=self.validate_targets)
        stats = type(stats)(*(s.view(token_shape) for s in stats))
        valid = targets != self.ignore_index
        mask = self.select(stats, valid, reference_nll)
        dp = self._data_parallel()
        group_mean = dp is not None and self.reduction == "mean"
        loss = SelectiveCrossEntropy.apply(flat_logits, flat_targets, stats.lse.reshape(-1),
                                           stats.nll.reshape(-1), mask.reshape(-1), self.ignore_index,
                                           "sum" if group_mean else self.reduction)
        if group_mean:
            return dp_ops.global_token_mean(loss, (mask & valid).sum(), dp)
        return loss.view(token_shape) if self.reduction == "none" else loss

    def forward_linear(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, reference_nll: Optional[torch.Tensor] = None,
                       chunk_size: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
        """Same selection on ``hidden @ weight.T (+ bias)`` without materialising the logits.

        hidden [N, H] or [B, T, H]; weight [V, H] (the LM head, tied embeddings included).
        Only the selected rows are recomputed and carry gradient (see ``cggr.linear``).
        """
        from .linear import fused_linear_selective_ce

        hidden, targets = self._align(hidden, targets, "hidden")

        def select_fn(stats, valid):
            return self.select(stats, valid, reference_nll)

        dp = self._data_parallel()
        group_mean = dp is not None and self.reduction == "mean"
        loss, _, mask = fused_linear_selective_ce(hidden, weight, targets, select_fn, bias=bias,
                                                  ignore_index=self.ignore_index,
                                                  reduction="sum" if group_mean else self.reduction,
                                                  chunk_size=chunk_size, softcap=softcap,
                                                  validate_targets=self.validate_targets,
                                                  max_selected=self._selection_bound(targets.shape))
        if group_mean:
            selected = (mask.reshape(targets.shape) & (targets != self.ignore_index)).sum()
            return dp_ops.global_token_mean(loss, selected, dp)
        return loss

    def _selection_bound(self, token_shape) -> int:
        """A host-known upper bound on the tokens the next selection can keep (sizes the backward's buffers
        without reading the count back from the device)."""
        n = math.prod(token_shape)
        ratio = self.current_ratio
        if self.schedule.dynamic_threshold:
            ratio = min(1.0, ratio + 0.5 * self.schedule.threshold_sensitivity)
        bound = math.ceil(ratio * n) + 1  # +1: the device computes the ratio in float32
        if self.selection == "sequence_aware":
            bound += token_shape[0] * self.min_tokens_per_sequence
        return min(n, bound)

    # -- metrics ----------------------------------------------------------------------------
    def get_metrics(self) -> dict:
        """Numbers of the last call (host values: this synchronises once)."""
        metrics = {"step": self.step_count, "token_ratio": self.current_ratio}
        if self._last is None:
            return metrics
        last = self._last
        valid = last["valid"]
        n_valid = valid.sum()
        entropy = torch.where(valid, last["stats"].entropy, torch.zeros_like(last["stats"].entropy))
        ratio = last["ratio"]
        metrics.update(
            token_ratio=float(ratio) if not isinstance(ratio, torch.Tensor) else float(ratio.item()),
            curriculum_ratio=self.current_ratio,
            tokens_selected=int(last["mask"].sum().item()),
            tokens_total=int(n_valid.item()),
            avg_confidence=float(last["confidence"].item()),
            avg_entropy=float((entropy.sum() / n_valid.clamp_min(1)).item()),
        )
        return metrics
