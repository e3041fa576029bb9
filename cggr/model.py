"""CGGRModel: train a Hugging Face causal LM on the rows of each batch that a row policy picks.

One training step (``loss = cggr_model(input_ids, labels=labels, attention_mask=mask)``):

1. Row values, only what the policy needs (``cggr.policies``): a router pass for ``HardestRows`` /
   ``ExcessLossRows`` (``torch.no_grad``, the model's own first blocks + final norm + LM head,
   ``cggr.router``; scored chunk by chunk through ``cggr.linear.token_stats_from_hidden``, no [B, T, V]
   logits), the mean ``reference_nll`` per row for ``ReferenceFilter`` / ``ReferenceRanked``, nothing for
   ``RandomRows``.
2. ``k = ceil(ratio * B)`` rows chosen by the policy; the ratio follows the curriculum (``RatioSchedule``).
3. The full forward (and the caller's backward) on those k rows only.

Contracts
---------
- Row difficulty (router policies): mean token score over the row's scored targets. A shifted target
  (position t predicts ``labels[t + 1]``) is scored when it is not -100 and, with an ``attention_mask``,
  both positions are real tokens. Rows with none, and non-finite means, rank below every finite row.
- Row count: ``k = ceil(curriculum_ratio * B)`` (at least 1), a host int: no synchronisation, and static
  shapes per ratio for ``torch.compile`` / CUDA graphs. A ``RatioSchedule(dynamic_threshold=True)``
  adjusts the ratio by the router's batch confidence and reads it back once per step (one device-to-host
  synchronisation, a row count that varies; router policies only).
- Loss: Hugging Face's causal-LM loss on the selected rows (mean over their valid shifted targets, the
  model's own ``labels=`` path). A policy that returns row weights gets ``sum_i w_row(i) * nll_i / n``
  in float32, ``n`` the valid targets of the selected rows (``loss_norm='selected'``) or of the whole
  batch (``'batch'``). With ratio 1.0 no router runs and the whole batch goes through unchanged.
- ``reference_nll`` ([B, T-1], one value per shifted target) is required by the policies that use it
  (``policy.needs_reference_nll``) and rejected by the others.
- state_dict: exactly the plain model's keys plus ``cggr_step`` (0-dim int64, the curriculum step), also
  when nested in a parent module; ``load_state_dict`` resumes the step. The router registers nothing (it
  shares the model's tensors). A plain model's state_dict loads with ``strict=False``.
- Synchronisation: none in the router/selection path unless the schedule has a dynamic threshold or
  ``StepOptions(collect_timing=True)``; ``get_metrics()`` reads device values. Hugging Face's own forward
  (transformers 5.x) synchronises once per call (mask creation or the packed-sequence check);
  ``StepOptions(forward_impl='trunk')`` avoids it for ``attention_mask=None``.
"""
import dataclasses
import math
from typing import Optional, Union

import torch
from torch import nn

from . import _legacy, ops
from . import distributed as dp_ops
from .distributed import DATA_PARALLEL_AUTO, DataParallel
from .model_checks import (check_causal_lm, check_fused_head, check_select_inputs, check_selection,
                           model_class_name, ratio_schedule)
from .model_parallel import DataParallelRows
from .linear import fused_linear_selective_ce, token_stats_from_hidden
from .compile_blocks import begin_graph_call, compile_decoder_blocks
from .options import BLOCK_SCOPES, StepOptions
from .policies import POLICY_AUTO, RowPolicy, RowSelection, resolve_policy
from .router import SUPPORTED_ARCHITECTURES, ModelTrunk, TruncatedRouter, create_truncated_router
from .rows import IGNORE_INDEX, reference_row_means, rows_for_ratio, shifted_targets, weighted_row_loss
from .schedule import RatioSchedule, batch_confidence
from .scoring import score
from .model_state import STEP_KEY, StepStateDict, step_metrics
from .step_timing import StepTimer

# Router scoring chunks: 512 MiB of logits. The router keeps no activations for backward, so it can afford
# larger chunks than cggr.linear's training-path default, and fewer launches.
ROUTER_CHUNK_BYTES = 512 << 20
# What forward_impl='trunk' can honour besides input_ids / attention_mask / labels: the trunk's own inputs,
# and the loss's (HF's loss_function takes num_items_in_batch).
TRUNK_INPUTS = ("position_ids", "token_type_ids")
TRUNK_LOSS_KWARGS = ("num_items_in_batch",)


def _router_chunk_rows(n_tokens: int, vocab_size: int, itemsize: int) -> int:
    return max(1, min(n_tokens, ROUTER_CHUNK_BYTES // max(1, vocab_size * itemsize)))


class CGGRModel(DataParallelRows, StepStateDict, nn.Module):
    """Selective training of a Hugging Face causal LM (see the module docstring for the contracts).

    Args:
        model: a causal LM (the router families of ``cggr.router`` for router policies and the fused or
            trunk paths).
        policy: ``'auto'`` or a ``cggr.RowPolicy``: ``RandomRows()``, ``HardestRows(scoring, router)``,
            ``ExcessLossRows(router)`` (needs ``reference_nll`` in the call), ``ReferenceFilter(threshold)``,
            ``ReferenceRanked(threshold)``, or one of ``cggr.experimental``. ``'auto'``: ``HardestRows()``
            over ``router`` when one is given, else ``RandomRows()``.
        router: a ``TruncatedRouter`` built on ``model`` (``create_truncated_router(model, num_layers)``);
            default: built from the policy's ``RouterSettings.layers`` when the policy uses a router.
            Passing one with a policy that runs no router is an error.
        min_tokens_ratio, warmup_steps: the curriculum's floor (fraction of rows kept, in (0, 1]) and the
            steps from ratio 1.0 down to it.
        schedule: the curriculum's shape, ``'linear'`` | ``'cosine'`` | ``'constant'``, or a whole
            ``cggr.RatioSchedule`` (then leave ``min_tokens_ratio`` / ``warmup_steps`` at their defaults).
        step_options: ``cggr.StepOptions`` (compilation, fused loss, trunk forward, timing).
        seed: seeds the generator of the random policies.
        data_parallel: ``'auto'`` (``cggr.DataParallel()`` when torch.distributed runs more than one process
            at the first step, else None), None (no collectives) or a ``cggr.DataParallel``. Every rank trains
            the same number of rows; the loss is ``sum of the trained NLL * W / N``, ``N`` all-reduced: DDP's
            and FSDP2's gradient mean is one process's on the concatenated batch (``cggr.distributed``).

    The keyword arguments of the 0.5 API (``scoring``, ``selection``, ``router_layers``, ...) still work
    for one release with a ``FutureWarning`` naming the new spelling.
    """

    def __init__(self, model: nn.Module, policy: Union[str, RowPolicy] = POLICY_AUTO,
                 router: Optional[TruncatedRouter] = None, min_tokens_ratio: float = 0.25,
                 warmup_steps: int = 1000, schedule: Union[str, RatioSchedule] = "linear",
                 step_options: Optional[StepOptions] = None, seed: int = 0,
                 data_parallel: Union[str, DataParallel, None] = DATA_PARALLEL_AUTO, **deprecated):
        super().__init__()
        check_causal_lm(model)
        defaults_given = min_tokens_ratio == 0.25 and warmup_steps == 1000
        if isinstance(schedule, RatioSchedule) and not defaults_given:
            raise ValueError("pass the ratio and warm-up either as min_tokens_ratio= / warmup_steps= or inside "
                             "schedule=RatioSchedule(...), not both")
        if deprecated:
            policy, schedule, legacy_options = _legacy.translate(deprecated, policy, router is not None,
                                                                 min_tokens_ratio, warmup_steps, schedule)
            if legacy_options is not None:
                if step_options is not None:
                    raise ValueError("pass either step_options=StepOptions(...) or the old "
                                     f"{', '.join(k for k in _legacy.STEP_KEYS if k in deprecated)}, not both")
                step_options = legacy_options
            defaults_given = True  # translate built the schedule from these very values, or checked above
        self.schedule = ratio_schedule(schedule, min_tokens_ratio, warmup_steps, defaults_given)
        self.policy = resolve_policy(policy, router is not None)
        options = StepOptions() if step_options is None else step_options
        if not isinstance(options, StepOptions):
            raise TypeError(f"step_options must be a cggr.StepOptions, got {type(options).__name__}")
        self.step_options = options
        check_fused_head(model, options.loss_impl)  # before the architecture check: a PEFT wrapper's name fails it
        for name in ("fused", "trunk"):
            active = options.loss_impl == "fused" if name == "fused" else options.forward_impl == "trunk"
            if active and model_class_name(model) not in SUPPORTED_ARCHITECTURES:
                # the fused path applies get_output_embeddings() to base_model's output itself, the trunk path
                # runs the model's modules itself: only for the families whose forward does exactly that
                raise TypeError(f"StepOptions({'loss_impl' if name == 'fused' else 'forward_impl'}={name!r}): "
                                f"unsupported architecture {model_class_name(model)}; looked for one of "
                                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if options.loss_impl == "fused" and getattr(getattr(model, "config", None), "output_router_logits", False):
            raise ValueError("StepOptions(loss_impl='fused') computes the cross entropy only: this MoE model's "
                             "config has output_router_logits=True, whose load-balancing loss the model adds to "
                             "its own loss; use loss_impl='model' (or set output_router_logits=False)")
        if self.policy.loss_norm == "batch" and options.token_ratio < 1.0:
            raise ValueError(f"{self.policy!r} estimates the full batch's loss; StepOptions(token_ratio < 1) would "
                             "drop tokens and bias it: use token_ratio=1.0")
        if self.schedule.dynamic_threshold and not self.policy.uses_router:
            raise ValueError(f"a dynamic threshold adjusts the ratio by the router's batch confidence, and "
                             f"{self.policy!r} runs no router: use a router policy (HardestRows, ExcessLossRows) "
                             "or RatioSchedule(dynamic_threshold=False)")
        self.model = model
        self.seed = int(seed)
        if not (data_parallel is None or data_parallel == DATA_PARALLEL_AUTO):
            data_parallel = dp_ops.resolve_data_parallel(data_parallel, "CGGRModel")  # checks it now
        self._data_parallel_arg = data_parallel
        self._dp_state = None  # (DataParallel or None, DeferredRowCheck) once resolved at the first step
        self.loss_impl, self.forward_impl = options.loss_impl, options.forward_impl
        self.token_ratio, self.loss_chunk_size = float(options.token_ratio), options.loss_chunk_size
        if router is not None:
            if not isinstance(router, TruncatedRouter):
                raise TypeError(f"router must be a cggr TruncatedRouter (create_truncated_router), "
                                f"got {type(router).__name__}")
            if router.model is not model:
                raise ValueError("router must be built on the same model instance it routes for "
                                 "(create_truncated_router(model, ...)): it shares that model's tensors")
        self._router_settings = self.policy.router
        if self.policy.uses_router and router is not None:  # the given router's depth wins over the policy's
            self._router_settings = dataclasses.replace(self._router_settings, layers=router.num_layers)
        elif self.policy.uses_router:
            router = self._default_router(model)
        # Held outside nn.Module's registry: the router owns no tensors, and a registered submodule would
        # only add a second path to the model's modules in repr/apply.
        self.__dict__["router"] = router

        compile_scope, compile_options = options.compile_scope, dict(options.compile_options or {})
        trunk = router.trunk if router is not None else None
        # 'fused' runs the base model (hidden states) and cggr.linear's LM head + CE; 'model' the whole model;
        # forward_impl='trunk': the hidden states come from ModelTrunk (head and loss here).
        self.__dict__["_model_trunk"] = ModelTrunk(model) if self.forward_impl == "trunk" else None
        if self.forward_impl == "trunk":
            forward_model = self._model_trunk.__call__  # a bound method: what torch.compile takes
        else:
            forward_model = model.base_model if self.loss_impl == "fused" else model
        if compile_scope in ("router", "all") and trunk is not None:
            trunk = torch.compile(trunk, **compile_options)
        if compile_scope in ("model", "all"):
            forward_model = torch.compile(forward_model, **compile_options)
        self._cuda_graphs = compile_scope == "blocks-cudagraphs"
        if compile_scope in BLOCK_SCOPES:  # in place: router, trained rows and evaluation run them compiled
            compile_decoder_blocks(model, cuda_graphs=self._cuda_graphs, **compile_options)
        # Plain attributes: the compiled wrapper (an nn.Module) must not register the model twice.
        self.__dict__["_trunk_fn"] = trunk
        self.__dict__["_forward_model"] = forward_model

        self._step = 0
        self._loading_prefix = ""
        self._loading_found_step = False
        self.register_load_state_dict_pre_hook(self._load_pre_hook)
        self.register_load_state_dict_post_hook(self._load_post_hook)
        self._generators = {}
        self._calls_in_step = 0
        self._last = None
        self._router_row_nll = None
        self.last_row_values = None  # [B] values the policy chose on in the last select_rows (or None)
        self._ratio, self._confidence = None, None
        self._timer = StepTimer() if options.collect_timing else None
        self._in_forward = False

    def _default_router(self, model):
        layers = self._router_settings.layers
        try:
            return create_truncated_router(model, num_layers=layers)
        except ValueError as error:
            if "num_layers" not in str(error):
                raise
            depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            raise ValueError(f"{self.policy!r}: its router runs the model's first {layers} block(s) "
                             f"(RouterSettings(layers={layers})), and a router must be shallower than the model "
                             f"({depth} blocks). Pass a shallower router, e.g. "
                             f"{type(self.policy).__name__}(router=cggr.RouterSettings(layers=1))") from None

    # -- curriculum state ----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self._step

    @property
    def reference_token_stride(self) -> int:
        """``s`` when this model reads the reference NLL of the targets ``s-1, 2s-1, ...`` only (an excess-loss
        router scoring every s-th position, no token selection by it): pass it to ``ReferenceModel(...,
        token_stride=s)`` to score only those. 1 when every target's value may be read."""
        policy = self.policy
        if not policy.uses_router or policy.scoring != "excess_loss" or self.token_ratio < 1.0:
            return 1
        return self._router_settings.token_stride

    @property
    def current_ratio(self) -> float:
        return self.schedule.curriculum_ratio(self._step)

    def step(self):
        """Advance the curriculum; call once per optimizer step (after ``optimizer.step()``)."""
        if self._timer is not None:
            self._timer.finish()
        self._step += 1
        self._calls_in_step = 0

    # -- forward -------------------------------------------------------------------------------------
    def select_rows(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    reference_nll: Optional[torch.Tensor] = None, **kwargs) -> Optional[RowSelection]:
        """The rows the next training forward would train on, without training: the checks, the router pass
        or reference row means the policy needs, and the policy's choice at the current step's ratio.

        Returns a ``RowSelection`` ([k] indices on the batch's device, optional row weights) or None when
        every row is kept. ``last_row_values`` then holds the [B] values the policy chose on (router scores
        or reference row means; None for ``RandomRows``; under ``DataParallel(selection='global')`` the
        [W * B] values of every rank, and the indices are positions in that concatenated batch). Draws from
        the same generator stream as ``forward`` (which calls it): integrations that choose rows ahead of
        the forward (``cggr.hf``) call this, then ``forward(..., rows=selection)``. Same synchronisation
        contract as ``forward``.
        """
        check_select_inputs(self.policy, input_ids, labels, attention_mask, reference_nll)
        if self._cuda_graphs and not self._in_forward:  # an integration's call ahead of forward(rows=...)
            begin_graph_call(input_ids.device, "CGGRModel.select_rows")
        B, T = input_ids.shape
        dp = self._data_parallel(B, input_ids.device)
        self._router_row_nll = None
        self.last_row_values = None
        self._confidence = None
        self._ratio = ratio = self.current_ratio
        k = rows_for_ratio(ratio, B)
        # Under data parallelism every rank runs the same collectives (router gathers under FSDP2, the
        # exchange of global selection): leave before them only on a decision that does not depend on this
        # rank's B, which may differ from another rank's (reported, not hung on)
        keep_every_row = ratio >= 1.0 if dp is not None else k >= B
        if keep_every_row and not self.schedule.dynamic_threshold:
            return None
        if dp is not None and dp.selection == "global":
            dp_ops.gather_sizes(B, T, input_ids.device, dp, "CGGRModel")  # every rank, before any leaves
        row_scores = None
        if self.policy.uses_router:
            with self._router_params_gathered():
                row_scores, self._confidence = self._score_rows(input_ids, labels, attention_mask, kwargs,
                                                                reference_nll)
        if self.schedule.dynamic_threshold:
            if dp is not None:  # one ratio for every rank: the group's mean confidence
                self._confidence = dp_ops.mean_over_ranks(self._confidence, dp)
            # Opt-in host decision (module docstring): one synchronisation per step.
            self._ratio = ratio = float(self.schedule.ratio(self._step, self._confidence).item())
            k = rows_for_ratio(ratio, B)
        if self.policy.uses_reference_rows:
            self.last_row_values = reference_row_means(reference_nll, labels, attention_mask)
        elif self.policy.uses_router:
            self.last_row_values = row_scores
        if k >= B:
            return None
        values = self.last_row_values if self.last_row_values is not None else B
        if dp is not None and dp.selection == "global":
            return self._select_global(values, k, B, dp, input_ids.device)
        rank = dp.rank if dp is not None else 0  # per-rank draws differ between ranks
        selection = self.policy.select(values, k, self._generator(input_ids.device, rank))
        check_selection(selection, B, input_ids.device)
        return selection

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, rows: Union[RowSelection, str, None] = "policy",
                **kwargs):
        """Loss on the selected rows; without ``labels``, the plain model's output on the whole batch.

        ``rows``: ``'policy'`` (default) chooses them now (``select_rows``); a ``RowSelection`` from an
        earlier ``select_rows`` on this batch, or None (every row), trains those without choosing again.
        ``reference_nll`` ([B, T-1]) as the policy requires. ``num_items_in_batch`` (Hugging Face's
        gradient-accumulation normaliser) replaces the selected rows' target count as the loss's divisor;
        under data parallelism it counts every rank's trained targets (``trained_targets``), and the loss
        is multiplied by W as without it (``cggr.distributed``).

        With ``DataParallel(selection='global')`` a given ``RowSelection`` holds positions in the rank-major
        concatenation of every rank's batch (what ``select_rows`` returns there); this rank trains those
        rows, received from their ranks.
        """
        if self._cuda_graphs:
            begin_graph_call(input_ids.device, "CGGRModel")
        if labels is None:
            return self.model(input_ids, attention_mask=attention_mask, **kwargs)
        self._in_forward = True
        try:
            return self._training_forward(input_ids, labels, attention_mask, rows, kwargs)
        finally:
            self._in_forward = False

    def _training_forward(self, input_ids, labels, attention_mask, rows, kwargs):
        reference_nll = kwargs.pop("reference_nll", None)
        if not self.training:
            # evaluation: the model's own loss over every row; no selection, no draw from the generator
            self._flush_row_check()  # the last training step's row counts (data parallel)
            return self.model(input_ids, labels=labels, attention_mask=attention_mask, **kwargs).loss
        if self._timer is not None:
            self._timer.start(input_ids.device)
        if isinstance(rows, str):
            if rows != "policy":
                raise ValueError(f"rows must be 'policy', a RowSelection or None, got {rows!r}")
            selection = self.select_rows(input_ids, labels, attention_mask, reference_nll, **kwargs)
        else:
            if rows is not None and not isinstance(rows, RowSelection):
                raise TypeError(f"rows must be 'policy', a RowSelection or None, got {type(rows).__name__}")
            selection = rows
            if self._ratio is None:  # no select_rows before: the curriculum's ratio (else the one it used)
                self._ratio = self.current_ratio
        batch_rows = input_ids.shape[0]
        dp = self._data_parallel(batch_rows, input_ids.device)
        if self.loss_impl == "fused" or self.forward_impl == "trunk":
            self._check_fsdp_root()
        batch_targets = (labels[:, 1:] != IGNORE_INDEX).sum()  # this rank's whole batch
        if dp is not None and dp.selection == "global" and selection is not None:
            # the rows this rank trains come from every rank's batch (select_rows chose them)
            taken = self._take_global(selection, dp, batch_rows, dict(
                kwargs, input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                reference_nll=reference_nll))
            input_ids, labels, attention_mask, reference_nll = (
                taken.pop(name) for name in ("input_ids", "labels", "attention_mask", "reference_nll"))
            kwargs = taken
            trained_positions = selection.indices  # positions in the concatenated batch (selected_rows)
            selection = RowSelection(torch.arange(input_ids.shape[0], device=input_ids.device), selection.row_weight)
        else:
            trained_positions = selection.indices if selection is not None else None
        B = input_ids.shape[0]
        if selection is not None:
            check_selection(selection, B, input_ids.device)
        ratio, confidence = self._ratio, self._confidence
        k = B if selection is None else int(selection.indices.shape[0])
        if self._timer is not None:
            self._timer.mark_router_end()

        if selection is None:
            rows_ids, rows_labels, rows_mask, rows_kwargs = input_ids, labels, attention_mask, kwargs
        else:
            idx = selection.indices

            def take(t):
                return t.index_select(0, idx if t.device == idx.device else idx.to(t.device))

            rows_ids, rows_labels = take(input_ids), take(labels)
            rows_mask = take(attention_mask) if attention_mask is not None else None
            # Every per-row tensor kwarg follows its rows; anything else (flags, num_items_in_batch,
            # [1, T] position_ids) passes through unchanged.
            rows_kwargs = {name: take(v) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v
                           for name, v in kwargs.items()}

        row_weight = selection.row_weight if selection is not None else None
        target_valid = labels[:, 1:] != IGNORE_INDEX
        per_row = target_valid.sum(1)
        # n_total for loss_norm='batch' (device tensor, no sync): counted like the plain model's loss.
        n_norm = per_row.sum() if row_weight is not None and self.policy.loss_norm == "batch" else None
        rows_selected_tokens = None
        # Data parallel without the caller's normaliser: the trained targets all-reduced over the group
        # (the fused loss's count is known after it), and the loss times W (cggr.distributed)
        dp_norm = dp is not None and "num_items_in_batch" not in rows_kwargs
        dp_count = None
        if dp_norm:
            if row_weight is not None and self.policy.loss_norm == "batch":
                dp_count = batch_targets
            elif self.loss_impl != "fused":
                dp_count = (rows_labels[:, 1:] != IGNORE_INDEX).sum()
            if dp_count is not None:
                total = self._data_parallel_total(dp_count, batch_rows, dp)
                rows_kwargs = dict(rows_kwargs, num_items_in_batch=total.clamp_min(1))
        elif dp is not None:  # the caller's normaliser: the ranks' batch rows are still compared
            self._data_parallel_total(batch_targets, batch_rows, dp)
        # Hugging Face's gradient-accumulation normaliser: the model's own loss takes it; the fused and the
        # weighted losses here divide by it instead of their own count
        num_items = rows_kwargs.get("num_items_in_batch") if (self.loss_impl == "fused" or row_weight is not None) else None
        if num_items is not None:
            rows_kwargs = {name: v for name, v in rows_kwargs.items() if name != "num_items_in_batch"}
            # (for loss_norm='batch' too: the window's count replaces this batch's)
            n_norm = torch.as_tensor(num_items, device=input_ids.device)
        if self.loss_impl == "fused":
            rows_ref = None
            if reference_nll is not None:
                rows_ref = reference_nll if selection is None else reference_nll.index_select(
                    0, selection.indices.to(reference_nll.device))
            loss, rows_selected_tokens = self._fused_loss(rows_ids, rows_labels, rows_mask, rows_kwargs,
                                                          row_weight, rows_ref)
            if n_norm is None and dp_norm:
                n_norm = self._data_parallel_total(rows_selected_tokens, batch_rows, dp)
            if n_norm is not None:
                # fused 'mean' divides by the selected valid tokens: rescale to the requested divisor
                loss = loss * (rows_selected_tokens.clamp_min(1).to(loss.dtype)
                               / n_norm.clamp_min(1).to(loss.dtype))
        elif row_weight is not None:
            logits = self._rows_logits(rows_ids, rows_mask, rows_kwargs)
            loss = weighted_row_loss(logits, rows_labels, row_weight, n_norm)
        else:
            loss = self._rows_model_loss(rows_ids, rows_labels, rows_mask, rows_kwargs)
        if dp is not None:
            loss = loss * dp.world_size  # DDP / FSDP2 average the gradients over the W ranks

        self._last = {
            "ratio": ratio,
            "sequences_selected": k,
            "sequences_total": batch_rows,
            "tokens_total": batch_targets,
            "tokens_selected": (rows_selected_tokens if rows_selected_tokens is not None
                                else per_row.sum() if selection is None
                                else per_row.index_select(0, selection.indices).sum()),
            "confidence": confidence,
            "rows": trained_positions,  # for tests / inspection
        }
        self._ratio, self._confidence = None, None  # consumed: the next forward(rows=...) needs its own
        return loss

    def _score_rows(self, input_ids, labels, attention_mask, kwargs, reference_nll):
        """[B] row difficulty (float32, -inf for rows without a scored token) and the batch confidence."""
        router, settings = self.router, self._router_settings
        B, T = input_ids.shape
        # Causal attention: the hidden state at position t depends on tokens <= t only, so running the trunk on
        # the first P positions gives exactly the full run's states there (a cost in proportion to P).
        P = T if settings.max_positions is None else min(T, settings.max_positions)

        def prefix(t):
            return t[..., :P] if isinstance(t, torch.Tensor) and P < T else t

        with torch.no_grad():
            with router.scoring_mode():
                hidden = self._trunk_fn(prefix(input_ids), prefix(attention_mask), prefix(kwargs.get("position_ids")),
                                        prefix(kwargs.get("token_type_ids")))
            weight, bias = router.head_params()
            if weight.dtype != hidden.dtype:
                # Under autocast the trunk ends in the autocast dtype while the head weight stays fp32; the
                # model's own LM head would run in the autocast dtype too, so the scoring matmul does.
                weight = weight.to(hidden.dtype)
                bias = bias.to(hidden.dtype) if bias is not None else None
            targets, valid = (t[:, :P] for t in shifted_targets(labels, attention_mask))  # position P-1 keeps its target
            targets = torch.where(valid, targets, torch.full_like(targets, IGNORE_INDEX))
            ref = None
            if reference_nll is not None:  # shape checked in forward
                ref = nn.functional.pad(reference_nll.to(torch.float32), (0, 1))[:, :P]
            stride = settings.token_stride
            if stride > 1:  # the scored positions only: s-1, 2s-1, ... (hidden is copied, 1/s of it)
                hidden, targets, valid = (t[:, stride - 1::stride] for t in (hidden, targets, valid))
                ref = ref[:, stride - 1::stride] if ref is not None else None
            n_pos = hidden.shape[1]
            stats = token_stats_from_hidden(hidden.reshape(B * n_pos, hidden.shape[-1]), weight,
                                            targets.reshape(B * n_pos), bias=bias, ignore_index=IGNORE_INDEX,
                                            chunk_size=settings.chunk_size or _router_chunk_rows(
                                                B * n_pos, weight.shape[0], hidden.element_size()),
                                            softcap=router.logit_softcap,  # Gemma 2 caps its logits
                                            # targets are sanitised above; validation would sync
                                            validate_targets=False)
            stats = type(stats)(*(s.view(B, n_pos) for s in stats))
            scores = score(stats, self.policy.scoring, valid, self.policy.combined_weights, ref)
            n_scored = valid.sum(1)
            per_row = n_scored.clamp_min(1).to(torch.float32)
            rows = scores.sum(1) / per_row
            # the router's own mean NLL per row (NaN with nothing scored): what a RunningBaseline tracks
            # (stats.nll is 0 where the target is ignore_index, i.e. not valid: targets are sanitised above)
            self._router_row_nll = torch.where(n_scored > 0, stats.nll.sum(1) / per_row,
                                               torch.full_like(per_row, math.nan))
            rows = torch.where((n_scored > 0) & torch.isfinite(rows), rows, torch.full_like(rows, -math.inf))
            confidence = batch_confidence(stats.p1, valid) if self.schedule.dynamic_threshold else None
        return rows, confidence

    def _fused_loss(self, ids, labels, attention_mask, kwargs, row_weight, reference_nll):
        """Base model -> hidden states -> cggr.linear's fused LM head + CE: no [k, T, V] logits.

        Same loss as the model's (mean over valid shifted targets) up to float rounding; with
        ``token_ratio < 1`` only the hardest ``ceil(token_ratio * n)`` valid tokens of these rows (by the
        full model's own statistics and ``scoring``) carry loss and gradient. No host sync.
        """
        k, T = ids.shape
        hidden = self._rows_hidden(ids, attention_mask, kwargs)
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:
            # autocast: the model's head would run in the trunk's output dtype (differentiable cast)
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        # The HF shift without slicing hidden (no copy): the last position's target is ignore_index.
        targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        n = k * T
        if self.token_ratio < 1.0:
            token_ratio = self.token_ratio
            ref = None if reference_nll is None else nn.functional.pad(reference_nll.to(torch.float32), (0, 1))

            def select_fn(stats, valid):
                scores = score(stats, self.policy.scoring, valid, self.policy.combined_weights, ref)
                return ops.select_topk(scores, valid, token_ratio)

            max_selected = min(n, math.ceil(token_ratio * n))
        else:
            def select_fn(stats, valid):
                return valid

            max_selected = n
        weights = None if row_weight is None else row_weight.to(torch.float32)[:, None].expand(k, T)
        loss, _, mask = fused_linear_selective_ce(hidden, weight, targets, select_fn, bias=bias,
                                                  ignore_index=IGNORE_INDEX, reduction="mean",
                                                  chunk_size=self.loss_chunk_size, row_weight=weights,
                                                  # no host sync: targets unchecked (as the model's own CE on
                                                  # CUDA), the selected count bounded on the host
                                                  validate_targets=False, max_selected=max_selected)
        return loss, (mask & (targets != IGNORE_INDEX)).sum()

    # -- the selected rows' forward: the model's own, or ModelTrunk (forward_impl='trunk') ------------------
    def _trunk_inputs(self, kwargs):
        unsupported = sorted(set(kwargs) - set(TRUNK_INPUTS) - set(TRUNK_LOSS_KWARGS))
        if unsupported:
            raise ValueError(f"forward_impl='trunk' runs the model's modules itself and takes only "
                             f"{', '.join(TRUNK_INPUTS + TRUNK_LOSS_KWARGS)} besides input_ids, attention_mask "
                             f"and labels; got {', '.join(unsupported)} (use forward_impl='model')")
        return kwargs.get("position_ids"), kwargs.get("token_type_ids")

    def _rows_hidden(self, ids, attention_mask, kwargs):
        """Hidden states after the final norm (loss_impl='fused')."""
        if self.forward_impl == "trunk":
            return self._forward_model(ids, attention_mask, *self._trunk_inputs(kwargs))
        return self._forward_model(input_ids=ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def _rows_logits(self, ids, attention_mask, kwargs):
        if self.forward_impl == "trunk":
            return self._model_trunk.head()(self._rows_hidden(ids, attention_mask, kwargs))
        return self._forward_model(input_ids=ids, attention_mask=attention_mask, **kwargs).logits

    def _rows_model_loss(self, ids, labels, attention_mask, kwargs):
        """The model's own ``labels=`` loss on these rows."""
        if self.forward_impl == "trunk":
            loss_kwargs = {name: kwargs[name] for name in TRUNK_LOSS_KWARGS if name in kwargs}
            return self._model_trunk.labels_loss(self._rows_logits(ids, attention_mask, kwargs), labels,
                                                 **loss_kwargs)
        return self._forward_model(input_ids=ids, attention_mask=attention_mask, labels=labels, **kwargs).loss

    def _generator(self, device, rank: int = 0):
        """The random policies' generator, re-seeded from (seed, curriculum step, call within the step): a run
        resumed from a checkpoint (``cggr_step``) draws the same rows as an uninterrupted one, and the
        micro-batches of one step (gradient accumulation) draw independently. Seeding is host-only."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
        gen.manual_seed((self.seed * 0x9E3779B1 + self._step * 0x85EBCA77 + self._calls_in_step
                         + rank * 0xC2B2AE3D) % (1 << 63))
        self._calls_in_step += 1
        return gen

    @property
    def selected_rows(self) -> Optional[torch.Tensor]:
        """[k] int64 (device) batch positions the last forward with labels trained on, as the row policy
        returned them (the built-in ones: ascending; repeats possible with ``cggr.experimental.ImportanceRows``), or
        None when it kept every row. Under ``DataParallel(selection='global')``: this rank's share, as positions
        in the rank-major concatenation of every rank's batch."""
        return None if self._last is None else self._last["rows"]

    @property
    def router_row_nll(self) -> Optional[torch.Tensor]:
        """[B] float32 (device) mean NLL of each row's scored tokens under the router in the last forward
        with labels (NaN for a row with nothing scored), or None when that forward ran no router pass
        (ratio 1, or a policy without scores). For ``cggr.experimental.RunningBaseline.update``."""
        return self._router_row_nll

    # -- metrics ----------------------------------------------------------------------------------
    def get_metrics(self) -> dict:
        """Numbers of the last ``forward`` with labels (host values: reading them synchronises)."""
        return step_metrics(self._last, self._step, self.current_ratio, self._timer)
