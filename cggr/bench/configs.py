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
import math
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

REGIMES = ("pretrain", "finetune", "target")


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
    reference_row_nll: Optional[np.ndarray] = None      # [n_train_rows] its row means, on the host
    reference_thresholds: Optional[Dict[str, float]] = None  # domain thresholds of reference_filter, by method
    num_sources: int = 0      # source ids are in [0, num_sources) (running per-source baselines)
    num_train_rows: int = 0   # Batch.index is in [0, num_train_rows) (running per-row baselines)
    forward_impl: str = "model"  # CGGRModel's forward_impl, for every configuration alike (FORWARD_IMPLS)


def rows_for_ratio(ratio: float, batch_size: int) -> int:
    """ceil(ratio * B), at least 1, at most B (the slack absorbs float error, as in cggr.model)."""
    return min(batch_size, max(1, math.ceil(ratio * batch_size - 1e-9)))


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
        Read after the step's clock, to count the trained rows' sources for the report."""
        return None


class FullBatch(Step):
    def __init__(self, model, trunk=None):
        super().__init__(model)
        self.trunk = trunk

    def loss(self, batch):
        return causal_lm_loss(self.module, batch.rows, self.trunk)


class RowSubset(Step):
    """Train on ``k`` rows of the batch chosen on the host by ``choose(batch, k, rng) -> row positions``."""

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


def _choose_random(batch, k, rng, ctx):
    return rng.permutation(len(batch.source_ids))[:k]


def _choose_oracle(batch, k, rng, ctx):
    """Target-domain rows first (in batch order, itself random), then random rows of the other domains."""
    is_target = batch.source_ids == ctx.target_source_id
    others = np.flatnonzero(~is_target)
    return np.concatenate([np.flatnonzero(is_target), rng.permutation(others)])[:k]


def _reference_order(batch, ctx):
    """Batch positions by ascending mean reference NLL (stable: ties keep the batch's own, random, order)."""
    return np.argsort(ctx.reference_row_nll[batch.host_index], kind="stable")


def _choose_reference_stratified(batch, k, rng, ctx):
    """Half the rows (rounded up) with the lowest reference NLL, the rest random: the reference model's
    domain signal alone, no router (it is computed once before training, so selection costs nothing)."""
    k_low = (k + 1) // 2
    order = _reference_order(batch, ctx)
    low, rest = order[:k_low], order[k_low:]
    return np.concatenate([low, rng.permutation(rest)])[:k]


def _choose_reference_lowest(batch, k, rng, ctx):
    """The k rows with the lowest reference NLL: the reference's ranking alone, no threshold, no router.
    Unlike ``reference_filter`` (rows under a threshold in random order), a row the reference finds less
    in-domain never takes a slot from one it finds more in-domain; the filler is the next-lowest rows."""
    return _reference_order(batch, ctx)[:k]


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


class RunningBaselineStep(CGGRModelStep):
    """CGGRModel excess-loss rows against a ``cggr.reference.RunningBaseline`` keyed by ``key(batch)``."""

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


def running_baseline_builder(per: str):
    """``per='source'``: one running mean per source; ``per='row'``: one per training row."""
    def build(model, ratio, ctx):
        from cggr.model import CGGRModel
        from cggr.reference import RunningBaseline

        num_keys, key = (ctx.num_sources, _source_keys) if per == "source" else (ctx.num_train_rows, _row_keys)
        if num_keys < 1:
            raise ValueError(f"a running per-{per} baseline needs the number of keys in the context "
                             f"(num_sources / num_train_rows), got {num_keys}")
        # the router as in every other bench configuration: --router-layers deep, every position scored
        m = CGGRModel(model, min_tokens_ratio=ratio, warmup_steps=ctx.selection_warmup_steps, selection="hardest",
                      router_layers=ctx.router_layers, router_token_stride=1, seed=ctx.seed, scoring="excess_loss",
                      forward_impl=ctx.forward_impl)
        device = next(model.parameters()).device
        return RunningBaselineStep(m, RunningBaseline(num_keys, momentum=0.9, device=device), key)
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


# -- builders: one per configuration ------------------------------------------------------------
def build_standard(model, ratio, ctx):
    return FullBatch(model, model_trunk(model, ctx))


def build_random(model, ratio, ctx):
    return RowSubset(model, ratio, ctx, _choose_random)


def reference_rows_builder(name: str, choose: Callable):
    """Rows chosen on the host from the reference model's mean NLL per row (computed before training)."""
    def build(model, ratio, ctx):
        if ctx.reference_row_nll is None:
            raise ValueError(f"{name} needs the reference model's NLL (regime 'target')")
        return RowSubset(model, ratio, ctx, choose)
    return build


def build_oracle(model, ratio, ctx):
    if ctx.target_source_id is None:
        raise ValueError("oracle needs a target domain (regime 'target')")
    return RowSubset(model, ratio, ctx, _choose_oracle)


def cggr_model_builder(policy: str, scoring: Optional[str] = None, max_router_layers: Optional[int] = None,
                       router_token_stride: int = 1, router_max_positions: Optional[int] = None):
    """``max_router_layers``: a shallower router than ``--router-layers`` for this configuration alone;
    ``router_token_stride``, ``router_max_positions``: CGGRModel's (the router scores every s-th position,
    of the first P only)."""
    def build(model, ratio, ctx):
        from cggr.model import CGGRModel

        kwargs = {} if scoring is None else {"scoring": scoring}
        m = CGGRModel(model, min_tokens_ratio=ratio, warmup_steps=ctx.selection_warmup_steps, selection=policy,
                      router_layers=router_depth(ctx, max_router_layers), router_token_stride=router_token_stride,
                      router_max_positions=router_max_positions, seed=ctx.seed, forward_impl=ctx.forward_impl,
                      **kwargs)
        return CGGRModelStep(m, ctx.reference_token_nll if scoring == "excess_loss" else None)
    return build


def reference_filter_builder(method: str, selection: str = "reference_filter"):
    """CGGRModel ``selection='reference_filter'`` (or ``'reference_ranked'``: the passing rows lowest reference
    NLL first instead of shuffled): rows below the reference's domain threshold first, random filler, no
    router. ``method``: ``'heldout'`` / ``'heldout99'`` (``cggr.reference.domain_threshold`` of the
    reference's NLL on clean documents it never trained on, recall 0.95 / 0.99) or ``'otsu'``
    (``otsu_threshold`` of its NLL over the pool)."""
    def build(model, ratio, ctx):
        from cggr.model import CGGRModel

        if ctx.reference_thresholds is None:
            raise ValueError("reference_filter needs the reference model's thresholds (regime 'target')")
        m = CGGRModel(model, min_tokens_ratio=ratio, warmup_steps=ctx.selection_warmup_steps,
                      selection=selection, reference_threshold=ctx.reference_thresholds[method],
                      seed=ctx.seed, forward_impl=ctx.forward_impl)
        return CGGRModelStep(m, ctx.reference_token_nll)
    return build


def router_depth(ctx: StepContext, max_router_layers: Optional[int]) -> int:
    return ctx.router_layers if max_router_layers is None else min(ctx.router_layers, max_router_layers)


def cggr_loss_builder(scoring: Optional[str] = None):
    def build(model, ratio, ctx):
        from cggr.loss import CGGRLoss

        kwargs = {} if scoring is None else {"scoring": scoring}
        # Fixed ratio (no dynamic threshold) so that it is comparable with the row configurations; targets
        # are in range by construction (the vocabulary is checked once), so no per-step validation sync.
        criterion = CGGRLoss(selection="topk", min_tokens_ratio=ratio, warmup_steps=ctx.selection_warmup_steps,
                             dynamic_threshold=False, seed=ctx.seed, validate_targets=False, **kwargs)
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


_ALL = REGIMES


def _excess_variant(max_router_layers: int, router_token_stride: int, doc: str,
                    router_max_positions: Optional[int] = None) -> Config:
    """``excess`` with a cheaper router; the depth is recorded in the run files from the same number."""
    build = cggr_model_builder("hardest", "excess_loss", max_router_layers, router_token_stride, router_max_positions)
    return Config(_require_reference(build), True, ("target",), doc, max_router_layers)


CONFIGS: Dict[str, Config] = {
    "standard": Config(build_standard, False, _ALL, "every row, full loss"),
    "random": Config(build_random, True, _ALL, "random rows at the ratio"),
    "cggr_hardest": Config(cggr_model_builder("hardest"), True, _ALL, "CGGRModel, hardest rows by the router"),
    "cggr_stratified": Config(cggr_model_builder("stratified"), True, _ALL, "CGGRModel, stratified rows"),
    "cggr_random": Config(cggr_model_builder("random"), True, _ALL, "CGGRModel, random rows (no router)"),
    "cggr_loss": Config(cggr_loss_builder(), True, _ALL, "CGGRLoss token level through forward_linear"),
    "source_baseline": Config(running_baseline_builder("source"), True, _ALL,
                              "CGGRModel rows with the highest router NLL minus their source's running mean"),
    "row_baseline": Config(running_baseline_builder("row"), True, _ALL,
                           "CGGRModel rows with the highest router NLL minus the row's own running mean"),
    "oracle": Config(build_oracle, True, ("target",), "target-domain rows first, random filler"),
    "excess": Config(_require_reference(cggr_model_builder("hardest", "excess_loss")), True, ("target",),
                     "CGGRModel rows with the highest router NLL minus reference NLL (RHO-LOSS)"),
    "excess_router2": _excess_variant(2, 1, "excess with a 2-block router (half the router's blocks)"),
    "excess_fast": _excess_variant(2, 4, "excess with a 2-block router scoring every 4th position"),
    "excess_lean": _excess_variant(1, 8, "excess with a 1-block router scoring every 8th position"),
    "excess_short": _excess_variant(1, 8, "excess_lean on the first 256 positions of each row only (the trunk "
                                          "runs on them alone: a quarter of its cost at seq 1024)", 256),
    "excess_stratified": Config(_require_reference(cggr_model_builder("stratified", "excess_loss")), True,
                                ("target",), "CGGRModel: half the rows by the highest excess loss, the rest random"),
    "reference_stratified": Config(reference_rows_builder("reference_stratified", _choose_reference_stratified),
                                   True, ("target",),
                                   "half the rows by the lowest reference NLL (no router), the rest random"),
    "reference_lowest": Config(reference_rows_builder("reference_lowest", _choose_reference_lowest), True,
                               ("target",), "the rows with the lowest reference NLL (no threshold, no router)"),
    "reference_filter": Config(reference_filter_builder("heldout"), True, ("target",),
                               "CGGRModel reference_filter: rows the reference finds as easy as its held-out "
                               "clean documents first, random filler, no router"),
    "reference_filter_r99": Config(reference_filter_builder("heldout99"), True, ("target",),
                                   "reference_filter with the held-out rows' 99th percentile as threshold "
                                   "(recall 0.99: more target rows pass, and more false positives)"),
    "reference_filter_ranked": Config(reference_filter_builder("heldout", "reference_ranked"), True, ("target",),
                                      "CGGRModel reference_ranked: reference_filter with the passing rows taken "
                                      "lowest reference NLL first, then random filler"),
    "reference_filter_r99_ranked": Config(reference_filter_builder("heldout99", "reference_ranked"), True,
                                          ("target",), "reference_filter_ranked at held-out recall 0.99"),
    "reference_filter_otsu": Config(reference_filter_builder("otsu"), True, ("target",),
                                    "reference_filter with Otsu's split of the pool's reference NLL as threshold"),
    "excess_tokens": Config(_require_reference(cggr_loss_builder("excess_loss")), True, ("target",),
                            "CGGRLoss tokens with the highest NLL minus reference NLL (Rho-1)"),
}


def get_config(name: str) -> Config:
    """A configuration by name; ``cggr_<policy>`` also accepts any policy registered in cggr.model."""
    if name in CONFIGS:
        return CONFIGS[name]
    if name.startswith("cggr_"):
        from cggr.model import ROW_POLICIES

        policy = name[len("cggr_"):]
        if policy in ROW_POLICIES:
            return Config(cggr_model_builder(policy), True, _ALL, f"CGGRModel, policy {policy}")
    raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)} and cggr_<policy> for the "
                     "policies registered in cggr.model.ROW_POLICIES")


def default_configs(regime: str):
    return [name for name, c in CONFIGS.items() if regime in c.regimes]
