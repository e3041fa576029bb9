"""Confidence-gated pruning of the data itself: multi-pass training that skips rows the model already fits.

The row policies of ``cggr.policies`` choose rows inside a batch after a router pass. ``ConfidenceGate``
acts before the forward, on the data order: a row whose loss, remembered from its last training forward,
is below the mean of the remembered losses is "well fit", and each well-fit row is left out of the next
pass with probability ``prune_ratio``; the well-fit rows that stay carry loss weight ``1 / (1 - prune_ratio)``,
so that over a pass the expected gradient is the full data's (the rescaling of InfoBatch, Qin et al., ICLR
2024). The last ``anneal`` fraction of the passes trains on every row with weight 1. Pruned rows cost
nothing (no forward, no router); the scores are free (the training forward's own per-row loss).

``ConfidenceGatedSampler`` is a ``torch.utils.data.Sampler`` over dataset indices (shuffled per pass,
sharded over data-parallel ranks like ``DistributedSampler``), holding the score table; the training loop
passes each batch's indices and per-row losses back through ``update`` (all ranks all-gather them, so
every rank holds the same table and draws the same plan) and weights the loss with ``weights`` /
``gated_causal_lm_loss``. ``state_dict`` holds the table, the pass and its plan: a run resumed mid-pass
iterates the same remaining order.
"""
import dataclasses
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .rows import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class ConfidenceGate:
    """Settings of confidence-gated pruning (see the module docstring).

    Args:
        prune_ratio: probability, in [0, 1), that a well-fit row is left out of a pass.
        anneal: fraction of the passes, in [0, 1], at the end of training that use every row (weight 1).
    """
    prune_ratio: float = 0.5
    anneal: float = 0.125

    def __post_init__(self):
        for name, value, ok, expected in (("prune_ratio", self.prune_ratio, lambda v: 0 <= v < 1, "in [0, 1)"),
                                          ("anneal", self.anneal, lambda v: 0 <= v <= 1, "in [0, 1]")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"ConfidenceGate.{name} must be a number {expected}, got {value!r}")

    def full_pass(self, epoch: int, num_epochs: int) -> bool:
        """Whether pass ``epoch`` (0-based) of ``num_epochs`` is in the annealing tail (every row)."""
        # rounded first: 10 * (1 - 0.7) is 3.0000000000000004 in floats, and its ceiling 4, not 3
        return epoch >= math.ceil(round(num_epochs * (1.0 - self.anneal), 9))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ConfidenceGatedSampler(Sampler):
    """Dataset indices of each pass, well-fit rows pruned at random (``ConfidenceGate``).

    Args:
        num_samples: the dataset's length.
        num_epochs: the passes the training will make (the annealing tail is counted from it).
        gate: a ``ConfidenceGate``.
        seed: seeds the pruning draws and the shuffling (the same on every rank).
        shuffle: shuffle each pass's kept rows.
        num_replicas, rank: data-parallel ranks (default: the initialised default process group, else 1, 0).
            Each rank iterates every ``num_replicas``-th kept index (the list padded by its first entries
            to a multiple, as ``DistributedSampler`` does; ``drop_last=True`` drops the remainder instead).
        sync_updates: all-gather every ``update`` over the default process group (default: when one is
            initialised with more than one process). Pass ``num_replicas=1, rank=0, sync_updates=True`` when
            something else shards the batches (accelerate's prepared dataloader).

    Call ``set_epoch(epoch)`` before each pass (as for ``DistributedSampler``; ``DataLoader`` does not),
    ``update(indices, row_losses)`` after each training forward, and weight each row's loss by
    ``weights(indices)``. Rows never trained keep an unknown score and are never pruned.
    """

    def __init__(self, num_samples: int, num_epochs: int, gate: Optional[ConfidenceGate] = None, seed: int = 0,
                 shuffle: bool = True, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 drop_last: bool = False, sync_updates: Optional[bool] = None):
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.num_epochs = _check_int("num_epochs", num_epochs, 1)
        self.gate = ConfidenceGate() if gate is None else gate
        if not isinstance(self.gate, ConfidenceGate):
            raise TypeError(f"gate must be a cggr.ConfidenceGate, got {type(self.gate).__name__}")
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        _check_int("num_replicas", self.num_replicas, 1)
        self.sync_updates = (distributed and dist.get_world_size() > 1) if sync_updates is None else bool(sync_updates)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        # NaN: never trained (unknown: never well fit). float64: a mean over millions of rows stays exact.
        self._scores = torch.full((num_samples,), math.nan, dtype=torch.float64)
        self._pending = []  # (indices, losses) reported by update, still on their device (no sync per step)
        self.epoch = 0
        self._plan = None  # (order [n] int64: this pass's kept indices, weights [num_samples] float32)
        self._full_pass = None  # whether this pass was drawn as a full one (set_epoch may decide it)

    # -- the plan of a pass ---------------------------------------------------------------------------------
    @property
    def scores(self) -> torch.Tensor:
        """[num_samples] float64 (CPU): each row's last reported loss, NaN if never trained."""
        self._fold()
        return self._scores

    def _fold(self):
        """Move the losses reported since the last call into the table (one device-to-host copy)."""
        if not self._pending:
            return
        indices = torch.cat([i.reshape(-1) for i, _ in self._pending]).cpu()
        values = torch.cat([v.reshape(-1) for _, v in self._pending]).cpu()
        self._pending = []
        finite = torch.isfinite(values)  # a row without targets keeps its earlier score
        self._scores[indices[finite]] = values[finite]

    def set_epoch(self, epoch: int, full_pass: Optional[bool] = None):
        """Choose pass ``epoch``'s rows from the scores as they are now (call before iterating). A pass is
        drawn once: setting the current pass again keeps its plan (a resumed run's, from the checkpoint).
        ``full_pass``: None (the annealing tail of ``num_epochs``), or True / False to decide it here (a
        loop that knows its progress by time rather than by passes)."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch or self._plan is None:
            self.epoch = epoch
            full = self.gate.full_pass(epoch, self.num_epochs) if full_pass is None else bool(full_pass)
            self._plan, self._full_pass = self._draw_plan(epoch, full), full

    def _make_plan(self, epoch):
        self._full_pass = self.gate.full_pass(epoch, self.num_epochs)
        return self._draw_plan(epoch, self._full_pass)

    def _draw_plan(self, key: int, full: bool):
        """(order, weights) of one pass from the scores as they are now; ``key`` seeds its draws."""
        gen = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + key) % (1 << 63))
        weights = torch.ones(self.num_samples, dtype=torch.float32)
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        scores = self.scores
        known = ~torch.isnan(scores)
        if self.gate.prune_ratio > 0 and known.any() and not full:
            well_fit = known & (scores < scores[known].mean())
            drawn = torch.rand(self.num_samples, generator=gen) < self.gate.prune_ratio
            keep = ~(well_fit & drawn)
            weights[well_fit & keep] = 1.0 / (1.0 - self.gate.prune_ratio)
        order = torch.nonzero(keep).flatten()
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=gen)]
        return order, weights

    def _this_pass(self):
        if self._plan is None:
            self._plan = self._make_plan(self.epoch)
        return self._plan

    def _rank_indices(self) -> torch.Tensor:
        order, _ = self._this_pass()
        n = order.numel()
        if self.drop_last:
            order = order[: n - n % self.num_replicas]
        elif n % self.num_replicas:
            pad = self.num_replicas - n % self.num_replicas
            order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices().tolist())

    def __len__(self) -> int:
        return int(self._rank_indices().numel())

    # -- training feedback ------------------------------------------------------------------------------------
    def weights(self, indices: torch.Tensor) -> torch.Tensor:
        """[B] float32 loss weights of these dataset indices in the current pass, on ``indices``' device."""
        _, weights = self._this_pass()
        return weights.index_select(0, self._check_indices(indices).cpu()).to(indices.device)

    def update(self, indices: torch.Tensor, row_losses: torch.Tensor):
        """Remember each row's loss (its mean NLL in this training forward). Under data parallelism every
        rank must call it with the same batch size (one all-gather of indices and losses)."""
        indices = self._check_indices(indices)
        if not isinstance(row_losses, torch.Tensor) or tuple(row_losses.shape) != tuple(indices.shape):
            raise ValueError(f"row_losses: expected a tensor of shape {tuple(indices.shape)} (one loss per index), "
                             f"got {tuple(row_losses.shape) if isinstance(row_losses, torch.Tensor) else type(row_losses).__name__}")
        values = row_losses.detach().to(torch.float64)
        if self.sync_updates:
            indices, values = _all_gather(indices.to(row_losses.device)), _all_gather(values)
        self._pending.append((indices, values))  # folded in when a plan is drawn or the scores are read

    def _check_indices(self, indices):
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
            raise ValueError(f"indices: expected a 1-D int64 tensor of dataset indices, got "
                             f"{(tuple(indices.shape), indices.dtype) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        if indices.numel() and indices.device.type == "cpu" and (int(indices.min()) < 0
                                                                  or int(indices.max()) >= self.num_samples):
            raise ValueError(f"indices: dataset indices must be in [0, {self.num_samples}), got "
                             f"{int(indices.min())}..{int(indices.max())}")
        return indices

    # -- what a pass does -------------------------------------------------------------------------------------
    def pass_stats(self) -> dict:
        """The current pass: rows kept and pruned, whether it was drawn full (the annealing tail, or
        ``set_epoch(..., full_pass=True)``)."""
        order, weights = self._this_pass()
        return {"epoch": self.epoch, "rows_kept": int(order.numel()), "rows_total": self.num_samples,
                "rows_pruned": self.num_samples - int(order.numel()), "full_pass": self._full_pass,
                "rows_upweighted": int((weights > 1).sum())}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        order, weights = self._this_pass()
        return {"scores": self.scores.clone(), "epoch": self.epoch, "order": order.clone(), "weights": weights.clone(),
                "full_pass": self._full_pass, "gate": dataclasses.asdict(self.gate), "num_epochs": self.num_epochs,
                "seed": self.seed}

    def load_state_dict(self, state: dict):
        scores = state["scores"]
        if tuple(scores.shape) != (self.num_samples,):
            raise ValueError(f"state_dict: scores of {tuple(scores.shape)[0] if scores.dim() == 1 else tuple(scores.shape)} "
                             f"rows, this sampler has {self.num_samples}")
        saved = (state["gate"], state["num_epochs"], state["seed"])
        mine = (dataclasses.asdict(self.gate), self.num_epochs, self.seed)
        if saved != mine:
            raise ValueError(f"state_dict: saved with gate, num_epochs, seed = {saved}, this sampler has {mine}")
        self._scores = scores.to(torch.float64).clone()
        self._pending = []
        self.epoch = int(state["epoch"])
        self._plan = (state["order"].to(torch.int64).clone(), state["weights"].to(torch.float32).clone())
        # a state saved before full_pass was kept: the annealing tail's answer, what pass_stats reported then
        self._full_pass = bool(state["full_pass"]) if "full_pass" in state else \
            self.gate.full_pass(self.epoch, self.num_epochs)


class ConfidenceGatedStream(ConfidenceGatedSampler):
    """The passes of ``ConfidenceGatedSampler`` as one stream, cut into epochs of ``num_samples`` rows: the
    fixed-length epochs that the Hugging Face Trainer's step accounting (and its resume) assumes. A pass
    ends when its kept rows are used up and the next is drawn from the scores at that moment, so an epoch
    may span several (shorter) passes: the same number of steps trains more passes. The annealing tail is
    the last ``anneal`` fraction of the stream (``num_epochs * num_samples`` rows): passes that start
    there use every row.

    Iteration yields ``(dataset index, loss weight)`` pairs (``cggr.hf.gate.IndexedDataset`` takes them),
    so that a batch fetched ahead of training keeps the weights of the pass it was drawn in. The passes
    that overlap the current epoch are kept (and saved), so a resumed run iterates the same rows; positions
    before them (skipped by the Trainer on resume) yield a placeholder row of weight 0. One process's
    stream: accelerate (or the caller) shards its batches; ``update`` all-gathers with ``sync_updates``.
    """

    def __init__(self, num_samples: int, num_epochs: int, gate: Optional[ConfidenceGate] = None, seed: int = 0,
                 sync_updates: Optional[bool] = None):
        super().__init__(num_samples, num_epochs, gate, seed, shuffle=True, num_replicas=1, rank=0,
                         sync_updates=sync_updates)
        self._passes = []  # [(stream start, order, weights)] in stream order, the last one current
        self.pass_index = -1

    def set_epoch(self, epoch: int):
        self.epoch = _check_int("epoch", epoch, 0)
        start = self.epoch * self.num_samples
        self._passes = [p for p in self._passes if p[0] + p[1].numel() > start] or self._passes[-1:]

    def __len__(self) -> int:
        return self.num_samples

    def _next_pass(self):
        start = self._passes[-1][0] + self._passes[-1][1].numel() if self._passes else 0
        self.pass_index += 1
        full = start >= (1.0 - self.gate.anneal) * self.num_epochs * self.num_samples
        self._passes.append((start, *self._draw_plan(self.pass_index, full)))
        self._full_pass = full  # the current pass's, saved by state_dict

    def __iter__(self):
        start = self.epoch * self.num_samples
        for position in range(start, start + self.num_samples):
            if not self._passes:
                self._next_pass()
            while position >= self._passes[-1][0] + self._passes[-1][1].numel():
                self._next_pass()
            for first, order, weights in self._passes:
                if first <= position < first + order.numel():
                    index = int(order[position - first])
                    yield index, float(weights[index])
                    break
            else:  # before every kept pass: a position the resumed Trainer skips
                yield int(self._passes[0][1][0]), 0.0

    def _this_pass(self):
        if not self._passes:
            self._next_pass()
        return self._passes[-1][1:]

    def pass_stats(self) -> dict:
        stats = super().pass_stats()
        start = self._passes[-1][0] if self._passes else 0
        stats.update(epoch=self.epoch, pass_index=max(self.pass_index, 0),
                     full_pass=start >= (1.0 - self.gate.anneal) * self.num_epochs * self.num_samples)
        return stats

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(pass_index=self.pass_index, passes=[(start, order.clone(), weights.clone())
                                                         for start, order, weights in self._passes])
        return state

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.pass_index = int(state["pass_index"])
        self._passes = [(int(start), order.to(torch.int64), weights.to(torch.float32))
                        for start, order, weights in state["passes"]]


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def gated_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor,
                         num_items: Optional[torch.Tensor] = None):
    """The loss of a batch of kept rows and each row's mean NLL (for ``ConfidenceGatedSampler.update``).

    ``logits`` [B, T, V] and ``labels`` [B, T] as a Hugging Face causal LM's (position t predicts
    ``labels[t + 1]``; -100 ignored), ``row_weight`` [B] from ``weights``. Returns ``(loss, row_nll)``:
    ``loss = sum_i w_i * (sum of row i's NLL) / n``, ``n = sum_i w_i * (row i's targets)`` or ``num_items``
    (the weighted count of a whole accumulation window, summed over ranks by the caller), float32;
    ``row_nll`` [B] float32, NaN for a row without targets.
    """
    expected = (labels.shape[0],)
    if not isinstance(row_weight, torch.Tensor) or tuple(row_weight.shape) != expected:
        # a [B, 1] or [1] weight would broadcast against the [B] counts into a wrong loss without an error
        got = tuple(row_weight.shape) if isinstance(row_weight, torch.Tensor) else type(row_weight).__name__
        raise ValueError(f"row_weight: expected a tensor of shape {expected} (one weight per row of labels), got {got}")
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                            reduction="none").view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(1).to(torch.float32)
    row_sum = nll.sum(1)
    row_nll = torch.where(counts > 0, row_sum / counts.clamp_min(1), torch.full_like(row_sum, math.nan))
    w = row_weight.to(nll.device, torch.float32)
    n = (w * counts).sum() if num_items is None else torch.as_tensor(num_items, device=nll.device)
    loss = (w * row_sum).sum() / n.to(torch.float32).clamp_min(1e-12)
    return loss, row_nll.detach()
