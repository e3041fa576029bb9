"""The training loop every configuration shares: same optimizer, learning-rate schedule, data order and clock.

- Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only, ``fused=True`` on CUDA), gradient
  norm clipped to 1.0.
- Learning rate: linear warm-up over the first ``warmup_frac`` of the budget, then cosine down to
  ``min_lr_frac * lr`` at the end of the budget. Progress is measured in the budget's unit: training
  seconds for ``--time-budget`` (so a slower configuration decays its LR over fewer steps), tokens for
  ``--token-budget`` (deterministic).
- Clock: only training steps count; evaluation, logging and checkpointing run outside the clock. Two
  clocks (``clock``): ``'step'`` (default) brackets every step by device synchronisations, so each step's
  measured time is its real time from an idle GPU, including the host's time to issue its first kernels;
  ``'span'`` synchronises only at evaluations and times the whole span of steps between them, so the host
  issues step n+1 while the GPU still runs step n, as in a training loop that does not read its loss
  every step (host-side work such as a router's launches then overlaps the GPU's). Both count the same
  work; in span mode the budget and the learning rate follow the host's clock between evaluations (a few
  steps ahead of the GPU at most) and the recorded times are exact at every evaluation. Batches and
  host-chosen rows reach the GPU from pinned memory, without a synchronisation, in both.
  ``untimed_warmup_steps`` steps on a throw-away copy of the model come first so that one-time costs
  (CUDA context, cuBLAS handles, autotuning, allocator growth) are not charged to whichever
  configuration happens to run first. With ``compile_blocks`` the decoder blocks are then compiled in
  place (``cggr.bench.models.compile_decoder_blocks``) and a throw-away step object runs forward and
  backward on the real model (gradients discarded, no optimizer step, so the weights are untouched):
  the graphs are compiled before the clock starts. ``graphs_compiled_in_clock`` in the result says
  whether any compilation still happened inside a timed step (it should be 0).
- Tokens: ``tokens`` counts every token drawn from the data (B * seq_len targets per step), whether or
  not a configuration trains on all of them; it is the data-consumption axis of the plots.
"""
import copy
import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .configs import Batch, Step, StepContext, to_device
from .parallel import agree, average_gradients, local_slice, mean_over_ranks
from .data import RowSet, batch_order
from .models import begin_graph_step, compile_decoder_blocks, compiled_graph_count
from .progress import Progress
from .settings import CLOCKS  # noqa: F401  (the modes train() takes)


@dataclasses.dataclass
class Budget:
    kind: str      # "time" (seconds of training) or "tokens"
    amount: float
    eval_every: float  # in the same unit

    def __post_init__(self):
        if self.kind not in ("time", "tokens") or not self.amount > 0 or not self.eval_every > 0:
            raise ValueError(f"bad budget {self}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0


def lr_at(progress: float, cfg: OptimConfig) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_frac > 0 and progress < cfg.warmup_frac:
        return cfg.lr * (progress + 1e-3) / cfg.warmup_frac  # never exactly 0 at step 0
    decay = (progress - cfg.warmup_frac) / max(1e-12, 1.0 - cfg.warmup_frac)
    low = cfg.min_lr_frac * cfg.lr
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * decay))


def make_optimizer(module: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Evaluator:
    """Mean next-token NLL per source over fixed rows (the same rows for every run)."""

    def __init__(self, sets: Dict[str, np.ndarray], batch_size: int, device, autocast):
        self.sets = {name: torch.from_numpy(rows) for name, rows in sets.items()}
        self.batch_size, self.device, self.autocast = batch_size, device, autocast

    @torch.no_grad()
    def __call__(self, model) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        out = {}
        for name, rows in self.sets.items():
            total, count = 0.0, 0
            for i in range(0, len(rows), self.batch_size):
                batch = rows[i:i + self.batch_size].to(self.device)
                nll = token_nll(model, batch, self.autocast)
                total += float(nll.sum())
                count += nll.numel()
            out[name] = total / count
        model.train(was_training)
        return out


def token_nll(model, rows: torch.Tensor, autocast) -> torch.Tensor:
    """[B, seq_len] float32 NLL of every target (no grad by the caller)."""
    begin_graph_step()
    with autocast():
        logits = model(input_ids=rows).logits[:, :-1]
    targets = rows[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             reduction="none").view(targets.shape)




@dataclasses.dataclass
class RunResult:
    curve: List[dict]
    steps: int
    train_time: float
    tokens: int
    diverged: bool
    final_val: Dict[str, float]
    host_time: float = 0.0  # seconds the host spent issuing the steps (before each step's final sync)
    graphs_compiled_in_clock: Optional[int] = None  # with compile_blocks: Dynamo graphs built in timed steps
    trained_rows_source_share: Optional[Dict[str, float]] = None  # sources of the rows the steps trained on


class TrainedRowSources:
    """Rows trained per source, summed over the run (repeats counted: importance sampling draws with
    replacement). Counted outside the clock (after each step, or at the end of a span): a device selection
    is counted on the device (no sync); the source labels never reach a configuration."""

    def __init__(self, rows: RowSet, device, process_group=None):
        self.process_group = process_group  # several processes: share() counts every rank's rows
        self.sources = rows.sources
        self.source_ids = rows.source_ids
        self.host_counts = np.zeros(len(rows.sources), dtype=np.int64)
        self.device = device
        self._device_source_ids = None
        self._device_counts = None
        self._pending = []

    def add(self, batch: Batch, selected, global_index: Optional[np.ndarray] = None):
        """Remember a step's selection (host bookkeeping only: the counting waits for ``flush``). Only the
        batch's row indices are kept, not its tokens (a span of steps would hold them all on the GPU).
        ``global_index``: the global batch's rows, when ``selected`` holds positions in it."""
        if global_index is not None and selected is not None:
            self._pending.append((global_index, self.source_ids[global_index], selected))
        else:
            self._pending.append((batch.index, batch.source_ids, selected))

    def flush(self):
        """Count the remembered steps (outside the clock)."""
        for index, source_ids, selected in self._pending:
            self._count(index, source_ids, selected)
        self._pending.clear()

    def _count(self, index: torch.Tensor, source_ids: np.ndarray, selected):
        if selected is None:
            self.host_counts += np.bincount(source_ids, minlength=len(self.sources))
        elif isinstance(selected, torch.Tensor):
            if self._device_counts is None:
                self._device_source_ids = torch.from_numpy(self.source_ids).to(self.device)
                self._device_counts = torch.zeros(len(self.sources), dtype=torch.int64, device=self.device)
            if isinstance(index, np.ndarray):  # a global batch's rows (host), moved here outside the clock
                index = torch.from_numpy(index).to(self.device)
            rows = index.index_select(0, selected.to(index.device))
            self._device_counts.index_add_(0, self._device_source_ids.index_select(0, rows),
                                           torch.ones_like(rows))
        else:
            self.host_counts += np.bincount(source_ids[np.asarray(selected)], minlength=len(self.sources))

    def share(self) -> Dict[str, float]:
        self.flush()
        counts = self.host_counts.copy()
        if self._device_counts is not None:
            counts += self._device_counts.cpu().numpy()
        if self.process_group is not None:  # every rank trained its own rows: their sum
            summed = torch.from_numpy(counts).to(self.device)
            torch.distributed.all_reduce(summed)
            counts = summed.cpu().numpy()
        total = max(1, int(counts.sum()))
        return {name: int(c) / total for name, c in zip(self.sources, counts)}


def train(model, build: Callable[..., Step], ratio: Optional[float], ctx: StepContext, train_rows: RowSet,
          evaluator: Evaluator, budget: Budget, optim: OptimConfig, batch_size: int, device, autocast,
          untimed_warmup_steps: int = 2, label: str = "", log=print, compile_blocks: Optional[str] = None,
          clock: str = "step", process_group=None) -> RunResult:
    """Train ``model`` in place with the configuration ``build`` until the budget is spent.

    ``compile_blocks``: None (eager) or a mode of ``cggr.bench.models.COMPILE_MODES``; ``clock``: one of
    ``CLOCKS`` (module docstring). ``process_group``: a ``cggr.bench.parallel.ProcessGroupInfo`` to train
    data-parallel (this rank's share of every global batch of ``batch_size`` rows, gradients averaged), or
    None; only rank 0 prints progress.
    """
    pg = process_group
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    device = torch.device(device)
    if untimed_warmup_steps > 0:
        _warm_up(model, build, ratio, ctx, train_rows, optim, batch_size, device, autocast, untimed_warmup_steps, pg)
    if compile_blocks:
        compile_decoder_blocks(model, compile_blocks)
        # CUDA graph trees run a block eagerly once, record it the next time, replay after: 3 passes
        _compile_outside_clock(model, build, ratio, ctx, train_rows, batch_size, device, autocast,
                               n=3 if compile_blocks == "blocks-cudagraphs" else 2, process_group=pg)
    graphs_in_clock = 0
    torch.manual_seed(ctx.seed)  # any torch-side randomness of a configuration starts from the run seed
    step_obj = build(model, ratio, ctx)
    optimizer = make_optimizer(step_obj.module, optim, device)
    # a configuration that chooses the data order itself (ConfidenceGateStep) gives its own batches
    make_order = getattr(step_obj, "batch_order", None) or batch_order
    order = make_order(len(train_rows), batch_size, ctx.seed)
    tokens_per_step = batch_size * (train_rows.rows.shape[1] - 1)
    trained_sources = TrainedRowSources(train_rows, device, pg)
    rows_in_global_batch = pg is not None and getattr(step_obj, "rows_in_global_batch", False)

    curve: List[dict] = []
    train_time, host_time, tokens, steps = 0.0, 0.0, 0, 0
    loss_sum = torch.zeros((), device=device)
    loss_steps = 0
    next_eval = 0.0
    diverged = False
    quiet = pg is not None and pg.rank != 0
    progress = Progress(label, budget.amount, "s" if budget.kind == "time" else "tok",
                        stream=open(os.devnull, "w") if quiet else None)

    span_start = None  # clock='span': perf_counter() at the start of the open span (after a synchronisation)

    def used():
        if budget.kind != "time":
            return float(tokens)
        return train_time + (time.perf_counter() - span_start if span_start is not None else 0.0)

    def close_span():
        nonlocal train_time, span_start
        if span_start is not None:
            _sync(device)
            train_time += time.perf_counter() - span_start
            span_start = None
            trained_sources.flush()

    def evaluate():
        nonlocal loss_sum, loss_steps
        # every rank's loss is its share of the global batch's mean (times W): their mean is the batch's
        # mean, the same on every rank, so the divergence check agrees too
        loss_sum = mean_over_ranks(loss_sum, pg)
        train_loss = float(loss_sum) / loss_steps if loss_steps else float("nan")
        val = evaluator(model)
        point = {"step": steps, "time": train_time, "tokens": tokens, "lr": lr, "train_loss": train_loss,
                 "val": val, "val_mean": float(np.mean(list(val.values())))}
        if steps:
            point["selection"] = step_obj.metrics()
        curve.append(point)
        loss_sum, loss_steps = torch.zeros((), device=device), 0
        progress.note(f"val {point['val_mean']:.3f}")
        return train_loss

    lr = lr_at(0.0, optim)

    def used_by_all():
        # a time budget under torchrun: rank 0's clock on every rank, so that every rank evaluates, stops
        # and sets the learning rate at the same step (token budgets agree by construction)
        return agree(used(), pg) if budget.kind == "time" else used()

    while True:
        now = used_by_all()
        if now >= next_eval:
            close_span()
            train_loss = evaluate()
            if steps and not math.isfinite(train_loss):
                diverged = True
                log(f"{label}: training loss is {train_loss} at step {steps}: stopping this run (diverged)")
                break
            now = used_by_all()
            next_eval = (math.floor(now / budget.eval_every) + 1) * budget.eval_every
        if now >= budget.amount:
            close_span()
            break
        lr = lr_at(now / budget.amount, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(step_obj, "progress"):
            step_obj.progress = now / budget.amount
        global_idx = next(order)
        idx = local_slice(global_idx, pg)  # the same global batch on every rank, this rank's share
        graphs_before = compiled_graph_count() if compile_blocks else 0
        if clock == "step" or span_start is None:
            _sync(device)
        start = time.perf_counter()
        if clock == "span" and span_start is None:
            span_start = start
        batch = _batch(train_rows, idx, device)  # inside the clock, as the data loading it stands for
        loss = training_step(step_obj, batch, optimizer, autocast, optim.grad_clip, pg)
        loss_sum += loss.float()
        host_time += time.perf_counter() - start  # about equal to elapsed when the host's launches bound the step
        trained_sources.add(batch, step_obj.selected_rows(), global_idx if rows_in_global_batch else None)
        if clock == "step":
            _sync(device)
            train_time += time.perf_counter() - start
            trained_sources.flush()  # outside the clock
        elapsed = time.perf_counter() - start  # span: the host's time for the step (the progress bar only)
        if compile_blocks:
            graphs_in_clock += compiled_graph_count() - graphs_before
        tokens += tokens_per_step
        steps += 1
        loss_steps += 1
        progress.advance(elapsed if budget.kind == "time" else tokens_per_step)
    close_span()
    if curve[-1]["step"] != steps:
        evaluate()
    progress.close()
    if graphs_in_clock:
        log(f"{label}: {graphs_in_clock} graph(s) were compiled inside timed steps: its step times include "
            "compilation")
    return RunResult(curve, steps, train_time, tokens, diverged, curve[-1]["val"], host_time,
                     graphs_in_clock if compile_blocks else None, trained_sources.share())


def training_step(step_obj: Step, batch: Batch, optimizer, autocast, grad_clip: float,
                  process_group=None) -> torch.Tensor:
    """One step of the loop (loss, backward, the gradients averaged over the ranks when data-parallel,
    clipping, optimizer, the step object's bookkeeping), issued without any host synchronisation; returns
    the detached loss (this rank's)."""
    begin_graph_step()
    with autocast():
        loss = step_obj.loss(batch)
    loss.backward()
    average_gradients(step_obj.module.parameters(), process_group)
    torch.nn.utils.clip_grad_norm_(step_obj.module.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_obj.after_step()
    return loss.detach()


def _batch(rows: RowSet, idx: np.ndarray, device) -> Batch:
    return Batch(to_device(rows.rows[idx], device), to_device(idx, device), rows.source_ids[idx], idx)


def _warm_up(model, build, ratio, ctx, train_rows, optim, batch_size, device, autocast, n, process_group=None):
    """A few steps on a deep copy (its own optimizer), discarded: nothing of it reaches the timed run."""
    clone = copy.deepcopy(model)
    step_obj = build(clone, ratio, ctx)
    optimizer = make_optimizer(step_obj.module, optim, device)
    order = (getattr(step_obj, "batch_order", None) or batch_order)(len(train_rows), batch_size, ctx.seed + 1_000_003)
    for _ in range(n):
        training_step(step_obj, _batch(train_rows, local_slice(next(order), process_group), device), optimizer,
                      autocast, optim.grad_clip, process_group)
    _sync(device)
    del clone, step_obj, optimizer


def _compile_outside_clock(model, build, ratio, ctx, train_rows, batch_size, device, autocast, n=2,
                           process_group=None):
    """Forward + backward of a throw-away step object on ``model`` itself (compiled blocks are per module
    instance, so a copy would not do), gradients dropped and no optimizer step: the weights stay as they
    were, and every graph a timed step needs exists before the clock starts."""
    step_obj = build(model, ratio, ctx)
    order = (getattr(step_obj, "batch_order", None) or batch_order)(len(train_rows), batch_size, ctx.seed + 2_000_003)
    for _ in range(n):
        begin_graph_step()
        with autocast():
            loss = step_obj.loss(_batch(train_rows, local_slice(next(order), process_group), device))
        loss.backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    del step_obj
