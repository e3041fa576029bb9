"""Configurations: one builder per configuration, each returning the object that computes a step's loss.

A builder is ``build(model, ratio, ctx) -> Step``; the training loop (``cggr.bench.train``) only calls
``step.loss(batch)``, then backward and the optimizer, then ``step.after_step()``; ``step.module``
holds the parameters to optimise and ``step.metrics()`` the selection numbers recorded at evaluations.
Each builder is the only place that knows its library API, so an API change is a one-line fix here.

Every configuration sees the same rows: a batch of ``B`` rows of ``seq_len + 1`` tokens, with
Hugging Face labels (``labels = input_ids``; the model shifts them), so every row has ``seq_len``
targets. Ratio-based configurations keep ``k = ceil(r * B)`` rows (or the top r of the tokens); ``r``
follows the same curriculum (``cggr.schedule.RatioSchedule``, linear from 1 to the ratio over
``--selection-warmup-steps``, then constant) for every configuration.
"""
import dataclasses
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..rows import rows_for_ratio
from .settings import REGIMES



@dataclasses.dataclass
class Batch:
    rows: torch.Tensor        # [B, seq_len + 1] int64 on the training device
    index: torch.Tensor       # [B] int64 indices of the rows in the training RowSet (device)
    source_ids: np.ndarray    # [B] int64 source index of every row (host: the oracle decides on the host)
    host_index: np.ndarray    # [B] int64, ``index`` on the host (host-side policies)


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device`` without a host synchronisation: through pinned memory on CUDA (a copy
    from pageable memory may wait for the stream, and the bench's clock='span' lets the host run ahead)."""
    device = torch.device(device)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclasses.dataclass
class StepContext:
    seed: int
    selection_warmup_steps: int = 0
    router_layers: int = 4
    target_source_id: Optional[int] = None            # regime "target": the goal domain
    reference_token_nll: Optional[torch.Tensor] = None  # [n_train_rows, seq_len] reference NLL (regime "target")
    reference_thresholds: Optional[Dict[str, float]] = None  # domain thresholds of reference_filter, by method
    num_sources: int = 0      # source ids are in [0, num_sources) (running per-source baselines)
    num_train_rows: int = 0   # Batch.index is in [0, num_train_rows) (running per-row baselines)
    forward_impl: str = "model"  # CGGRModel's forward_impl, for every configuration alike (FORWARD_IMPLS)
    data_parallel: str = "per_rank"  # cggr.DataParallel.selection when the bench runs on several processes


def model_trunk(model, ctx: StepContext):
    """``cggr.router.ModelTrunk`` of the model with ``forward_impl='trunk'``, else None (the model's forward)."""
    if ctx.forward_impl == "model":
        return None
    if ctx.forward_impl != "trunk":
        raise ValueError(f"forward_impl must be 'model' or 'trunk', got {ctx.forward_impl!r}")
    from cggr.router import ModelTrunk

    return ModelTrunk(model)


def causal_lm_loss(model, rows: torch.Tensor, trunk=None) -> torch.Tensor:
    """Mean next-token cross entropy over the rows, the model's own ``labels=`` path (float32 loss); with a
    ``ModelTrunk``, the same modules and loss function without the model's forward (as CGGRModel's
    ``forward_impl='trunk'``: no host synchronisation)."""
    if trunk is None:
        return model(input_ids=rows, labels=rows).loss
    return trunk.labels_loss(trunk.head()(trunk(rows)), rows)


class Step:
    def __init__(self, module: nn.Module):
        self.module = module

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self):
        pass

    def metrics(self) -> dict:
        return {}

    def selected_rows(self):
        """Batch positions the last ``loss`` trained on: None (every row), a host array or a device tensor.
        Read after the step's clock, to count the trained rows' sources for the report. Positions in this
        rank's batch, or in the global batch when ``rows_in_global_batch``."""
        return None

    @property
    def rows_in_global_batch(self) -> bool:
        """True when ``selected_rows`` are positions in the whole global batch (several processes with
        ``--data-parallel global``: this rank trains rows of other ranks' shares)."""
        return False


class FullBatch(Step):
    def __init__(self, model, trunk=None):
        super().__init__(model)
        self.trunk = trunk

    def loss(self, batch):
        return causal_lm_loss(self.module, batch.rows, self.trunk)


class RowSubset(Step):
    """Train on ``k`` rows of the batch chosen on the host by ``choose(batch, k, rng, ctx) -> row positions``:
    for the oracle only, which decides on the domain labels that the library never sees."""

    def __init__(self, model, ratio: float, ctx: StepContext, choose: Callable):
        super().__init__(model)
        from cggr.schedule import RatioSchedule

        self.schedule = RatioSchedule(ratio, ctx.selection_warmup_steps, "linear", dynamic_threshold=False)
        self.choose = choose
        self.ctx = ctx
        self.trunk = model_trunk(model, ctx)
        self.rng = np.random.default_rng([ctx.seed, 0xC0FFEE])  # independent of the data-order stream
        self.steps = 0
        self.last_k = None
        self.last_picked = None

    def loss(self, batch):
        k = rows_for_ratio(self.schedule.curriculum_ratio(self.steps), len(batch.source_ids))
        picked = np.sort(np.asarray(self.choose(batch, k, self.rng, self.ctx), dtype=np.int64))
        self.last_k, self.last_picked = k, picked
        rows = batch.rows.index_select(0, to_device(picked, batch.rows.device))
        return causal_lm_loss(self.module, rows, self.trunk)

    def after_step(self):
        self.steps += 1

    def metrics(self):
        return {"rows_selected": self.last_k, "curriculum_ratio": self.schedule.curriculum_ratio(self.steps)}

    def selected_rows(self):
        return self.last_picked


def _choose_oracle(batch, k, rng, ctx):
    """Target-domain rows first (in batch order, itself random), then random rows of the other domains."""
    is_target = batch.source_ids == ctx.target_source_id
    others = np.flatnonzero(~is_target)
    return np.concatenate([np.flatnonzero(is_target), rng.permutation(others)])[:k]


class CGGRModelStep(Step):
    def __init__(self, cggr_model, reference: Optional[torch.Tensor] = None):
        super().__init__(cggr_model)  # its parameters are exactly the wrapped model's (the router owns none)
        self.reference = reference

    def loss(self, batch):
        kwargs = {}
        if self.reference is not None:
            kwargs["reference_nll"] = self.reference.index_select(0, batch.index).float()
        return self.module(batch.rows, labels=batch.rows, attention_mask=None, **kwargs)

    def after_step(self):
        self.module.step()

    def metrics(self):
        return self.module.get_metrics()

    def selected_rows(self):
        return self.module.selected_rows

    @property
    def rows_in_global_batch(self) -> bool:
        setting = self.module.data_parallel
        return setting is not None and setting.selection == "global"


class RunningBaselineStep(CGGRModelStep):
    """CGGRModel excess-loss rows against a ``cggr.experimental.RunningBaseline`` keyed by ``key(batch)``."""

    def __init__(self, cggr_model, baseline, key: Callable):
        super().__init__(cggr_model)
        self.baseline, self.key = baseline, key
        self._keys = None

    def loss(self, batch):
        self._keys = self.key(batch)
        reference = self.baseline.reference_nll(self._keys, batch.rows.shape[1])
        return self.module(batch.rows, labels=batch.rows, attention_mask=None, reference_nll=reference)

    def after_step(self):
        if self.module.router_row_nll is not None:
            self.baseline.update(self._keys, self.module.router_row_nll)
        super().after_step()


def _source_keys(batch):
    return to_device(batch.source_ids, batch.rows.device)


def _row_keys(batch):
    return batch.index


def _cggr_model(model, ratio, ctx, policy):
    from cggr import distributed
    from cggr.model import CGGRModel
    from cggr.options import StepOptions

    # several processes (torchrun): the bench averages the gradients (cggr.bench.parallel), CGGRModel
    # normalises the loss over the group and chooses per rank or over the global batch
    data_parallel = None
    if distributed.is_initialized() and distributed.dist.get_world_size() > 1:
        data_parallel = distributed.DataParallel(selection=ctx.data_parallel)
    return CGGRModel(model, policy=policy, min_tokens_ratio=ratio, warmup_steps=ctx.selection_warmup_steps,
                     seed=ctx.seed, step_options=StepOptions(forward_impl=ctx.forward_impl),
                     data_parallel=data_parallel)


def running_baseline_builder(per: str):
    """``per='source'``: one running mean per source; ``per='row'``: one per training row."""
    def build(model, ratio, ctx):
        from cggr.experimental import RunningBaseline
        from cggr.policies import ExcessLossRows, RouterSettings

        num_keys, key = (ctx.num_sources, _source_keys) if per == "source" else (ctx.num_train_rows, _row_keys)
        if num_keys < 1:
            raise ValueError(f"a running per-{per} baseline needs the number of keys in the context "
                             f"(num_sources / num_train_rows), got {num_keys}")
        # the router as in the other router configurations: --router-layers deep, every position scored
        policy = ExcessLossRows(RouterSettings(layers=ctx.router_layers, token_stride=1))
        device = next(model.parameters()).device
        return RunningBaselineStep(_cggr_model(model, ratio, ctx, policy),
                                   RunningBaseline(num_keys, momentum=0.9, device=device), key)
    return build


class CGGRLossStep(Step):
    """Full forward of the decoder; the LM head and loss go through ``CGGRLoss.forward_linear`` (token level)."""

    def __init__(self, model, criterion, reference: Optional[torch.Tensor] = None, trunk=None):
        super().__init__(model)
        self.trunk = trunk
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"cggr_loss needs an nn.Linear LM head, got {type(head).__name__}")
        self.criterion, self.head, self.reference = criterion, head, reference

    def loss(self, batch):
        if self.trunk is not None:
            hidden = self.trunk(batch.rows)
        else:
            hidden = self.module.get_decoder()(input_ids=batch.rows).last_hidden_state
        kwargs = {}
        if self.reference is not None:
            kwargs["reference_nll"] = self.reference.index_select(0, batch.index).float()
        return self.criterion.forward_linear(hidden[:, :-1], self.head.weight, batch.rows[:, 1:],
                                             bias=self.head.bias, **kwargs)

    def after_step(self):
        self.criterion.step()

    def metrics(self):
        return self.criterion.get_metrics()


class ConfidenceGateStep(Step):
    """``cggr.pruning``: the data order itself. Each pass over the training rows leaves out, at random, half
    of the rows whose last training loss was below the mean (weight 2 for the well-fit rows that stay);
    passes that start in the last ``anneal`` fraction of the budget use every row. Every row of a batch
    trains; the loss is ``cggr.pruning.gated_causal_lm_loss`` (weighted NLL over weighted target count).
    The training loop takes its batches from ``batch_order`` and sets ``progress`` (used / budget)."""

    def __init__(self, model, ctx: StepContext, prune_ratio: float = 0.5, anneal: float = 0.125):
        super().__init__(model)
        from cggr.pruning import ConfidenceGate

        self.gate = ConfidenceGate(prune_ratio, anneal)
        self.trunk = model_trunk(model, ctx)
        # replaced by each batch_order (its own seed); this one serves steps fed batches directly
        self.sampler = self._sampler(ctx.num_train_rows, ctx.seed) if ctx.num_train_rows > 0 else None
        self.progress = 0.0
        self._update = None

    def batch_order(self, n_rows: int, batch_size: int, seed: int):
        """Endless batches of row indices, pass after pass, the last partial batch of a pass dropped (as
        ``cggr.bench.data.batch_order``)."""
        self.sampler = self._sampler(n_rows, seed)
        pass_index = 0
        while True:
            self.sampler.set_epoch(pass_index, full_pass=self.progress >= 1.0 - self.gate.anneal)
            order = np.fromiter(iter(self.sampler), dtype=np.int64)
            if len(order) < batch_size:
                raise ValueError(f"a pass kept {len(order)} rows, fewer than a batch of {batch_size}")
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield order[i:i + batch_size]
            pass_index += 1

    def _sampler(self, n_rows, seed):
        from cggr.pruning import ConfidenceGate, ConfidenceGatedSampler

        # passes are counted by the loop's progress, not by a number of epochs: anneal=0 here, decided by
        # batch_order
        return ConfidenceGatedSampler(n_rows, num_epochs=1, gate=ConfidenceGate(self.gate.prune_ratio, 0.0),
                                      seed=seed, num_replicas=1, rank=0)

    def loss(self, batch):
        from cggr.pruning import gated_causal_lm_loss

        rows = batch.rows
        logits = (self.module(input_ids=rows).logits if self.trunk is None
                  else self.trunk.head()(self.trunk(rows)))
        weights = to_device(self.sampler.weights(torch.from_numpy(batch.host_index)).numpy(), rows.device)
        num_items = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # several processes (cggr.bench.parallel): the group's weighted target count, so that the
            # averaged gradients are one process's on the whole batch
            count = (weights.double() * (rows.shape[1] - 1)).sum()
            torch.distributed.all_reduce(count)
            num_items = (count / torch.distributed.get_world_size()).float()
        loss, row_nll = gated_causal_lm_loss(logits, rows, weights, num_items)
        self._update = (batch.index, row_nll)
        return loss

    def after_step(self):
        if self._update is not None:
            self.sampler.update(*self._update)  # on the device: folded into the table at the next pass
            self._update = None

    def metrics(self):
        return self.sampler.pass_stats() if self.sampler is not None else {}


def build_confidence_gate(model, ratio, ctx):
    return ConfidenceGateStep(model, ctx)


# -- builders: one per configuration ------------------------------------------------------------
def build_standard(model, ratio, ctx):
    return FullBatch(model, model_trunk(model, ctx))


def build_oracle(model, ratio, ctx):
    if ctx.target_source_id is None:
        raise ValueError("oracle needs a target domain (regime 'target')")
    return RowSubset(model, ratio, ctx, _choose_oracle)


def policy_builder(make_policy: Callable, max_router_layers: Optional[int] = None):
    """CGGRModel with the library policy ``make_policy(router_settings_or_None, ctx)``. A router policy gets
    ``RouterSettings`` whose depth is ``--router-layers`` capped at ``max_router_layers``."""
    def build(model, ratio, ctx):
        policy = make_policy(ctx, router_depth(ctx, max_router_layers))
        if policy.needs_reference_nll and ctx.reference_token_nll is None:
            raise ValueError(f"{policy!r} needs the reference model's NLL (regime 'target')")
        reference = ctx.reference_token_nll if policy.needs_reference_nll else None
        return CGGRModelStep(_cggr_model(model, ratio, ctx, policy), reference)
    return build


def router_depth(ctx: StepContext, max_router_layers: Optional[int]) -> int:
    return ctx.router_layers if max_router_layers is None else min(ctx.router_layers, max_router_layers)


def cggr_loss_builder(scoring: Optional[str] = None):
    def build(model, ratio, ctx):
        from cggr.loss import CGGRLoss

        # 'combined' is what the published cggr_loss runs used (CGGRLoss's default then); a fixed ratio (no
        # dynamic threshold) keeps it comparable with the row configurations; targets are in range by
        # construction (the vocabulary is checked once), so no per-step validation sync.
        criterion = CGGRLoss(scoring=scoring or "combined", selection="topk", min_tokens_ratio=ratio,
                             warmup_steps=ctx.selection_warmup_steps, dynamic_threshold=False, seed=ctx.seed,
                             validate_targets=False)
        return CGGRLossStep(model, criterion, ctx.reference_token_nll if scoring == "excess_loss" else None,
                            model_trunk(model, ctx))
    return build


def _require_reference(builder):
    def build(model, ratio, ctx):
        if ctx.reference_token_nll is None:
            raise ValueError("this configuration needs the reference model's NLL (regime 'target')")
        return builder(model, ratio, ctx)
    return build


@dataclasses.dataclass(frozen=True)
class Config:
    build: Callable
    uses_ratio: bool
    regimes: tuple
    doc: str
    max_router_layers: Optional[int] = None  # recorded: the router depth this configuration really used
    in_defaults: bool = True  # in the regimes' default lists (False: runs only when named)


_ALL = REGIMES


def _policies():
    from cggr import experimental as X
    from cggr import policies as P

    def router(token_stride=1, max_positions=None):
        return lambda depth: P.RouterSettings(layers=depth, token_stride=token_stride, max_positions=max_positions)

    def excess(max_layers, stride, doc, max_positions=None):
        make = router(stride, max_positions)
        return Config(policy_builder(lambda ctx, depth: P.ExcessLossRows(make(depth)), max_layers), True,
                      ("target",), doc, max_layers)

    def threshold(method, cls):
        def make(ctx, depth):
            if ctx.reference_thresholds is None:
                raise ValueError("the reference filter needs the reference model's thresholds (regime 'target')")
            return cls(ctx.reference_thresholds[method])
        return policy_builder(make)

    return {
        "random": Config(policy_builder(lambda ctx, depth: P.RandomRows()), True, _ALL,
                         "RandomRows: random rows at the ratio (no router)"),
        "cggr_hardest": Config(policy_builder(lambda ctx, depth: P.HardestRows(router=router()(depth))), True, _ALL,
                               "HardestRows: the rows the router finds hardest"),
        "cggr_half_hardest": Config(policy_builder(lambda ctx, depth: X.HalfHardestRows(router=router()(depth))),
                                    True, _ALL, "experimental HalfHardestRows: half hardest rows, half random"),
        "source_baseline": Config(running_baseline_builder("source"), True, _ALL,
                                  "experimental: rows with the highest router NLL minus their source's running mean"),
        "row_baseline": Config(running_baseline_builder("row"), True, _ALL,
                               "experimental: rows with the highest router NLL minus the row's own running mean"),
        "excess": excess(None, 1, "ExcessLossRows, --router-layers deep, every position (RHO-LOSS)"),
        "excess_router2": excess(2, 1, "excess with a 2-block router"),
        "excess_fast": excess(2, 4, "excess with a 2-block router scoring every 4th position"),
        "excess_lean": excess(1, 8, "ExcessLossRows() as defaulted: a 1-block router scoring every 8th position"),
        "excess_short": excess(1, 8, "excess_lean on the first 256 positions of each row only", 256),
        "excess_half_hardest": Config(policy_builder(lambda ctx, depth: X.HalfHardestRows(
            "excess_loss", router()(depth))), True, ("target",),
            "experimental HalfHardestRows(scoring='excess_loss'): half by excess loss, half random"),
        "reference_half_lowest": Config(policy_builder(lambda ctx, depth: X.ReferenceHalfLowest()), True, ("target",),
                                        "experimental ReferenceHalfLowest: half by lowest reference NLL, half random"),
        "reference_lowest": Config(policy_builder(lambda ctx, depth: X.ReferenceLowest()), True, ("target",),
                                   "experimental ReferenceLowest: the rows with the lowest reference NLL"),
        "reference_filter": Config(threshold("heldout", P.ReferenceFilter), True, ("target",),
                                   "ReferenceFilter at the held-out rows' 95th percentile, random filler"),
        "reference_filter_r99": Config(threshold("heldout99", P.ReferenceFilter), True, ("target",),
                                       "ReferenceFilter at the held-out rows' 99th percentile"),
        "reference_filter_ranked": Config(threshold("heldout", P.ReferenceRanked), True, ("target",),
                                          "ReferenceRanked: passing rows lowest reference NLL first"),
        "reference_filter_r99_ranked": Config(threshold("heldout99", P.ReferenceRanked), True, ("target",),
                                              "ReferenceRanked at held-out recall 0.99"),
        "reference_filter_otsu": Config(threshold("otsu", P.ReferenceFilter), True, ("target",),
                                        "ReferenceFilter at experimental otsu_threshold of the pool"),
        "cggr_importance": Config(policy_builder(lambda ctx, depth: X.ImportanceRows(router=router()(depth))),
                                  True, _ALL, "experimental ImportanceRows (alpha 0.9, T 1); runs only when named",
                                  in_defaults=False),
    }


CONFIGS: Dict[str, Config] = {
    "standard": Config(build_standard, False, _ALL, "every row, full loss"),
    **_policies(),
    "cggr_loss": Config(cggr_loss_builder(), True, _ALL, "CGGRLoss token level through forward_linear"),
    "confidence_gate": Config(build_confidence_gate, False, ("pretrain", "finetune"),
                              "cggr.pruning ConfidenceGate(0.5, 0.125): well-fit rows pruned from each pass, "
                              "unbiased weights, full passes in the last 12.5 % (InfoBatch); runs only when named",
                              in_defaults=False),
    "oracle": Config(build_oracle, True, ("target",), "target-domain rows first, random filler (domain labels)"),
    "excess_tokens": Config(_require_reference(cggr_loss_builder("excess_loss")), True, ("target",),
                            "CGGRLoss tokens with the highest NLL minus reference NLL (Rho-1)"),
}

# Names of earlier rounds (BENCHMARKS.md quotes them): "stratified" meant three different things, and
# cggr_random was the same policy as random.
RENAMED = {"cggr_stratified": "cggr_half_hardest", "excess_stratified": "excess_half_hardest",
           "reference_stratified": "reference_half_lowest", "cggr_random": "random"}


def get_config(name: str) -> Config:
    """A configuration by name (``RENAMED`` maps the names of earlier rounds)."""
    name = RENAMED.get(name, name)
    if name in CONFIGS:
        return CONFIGS[name]
    raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)} (earlier names: {sorted(RENAMED)})")


def default_configs(regime: str):
    return [name for name, c in CONFIGS.items() if regime in c.regimes and c.in_defaults]
