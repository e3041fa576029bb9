"""Data parallelism in ``CGGRModel`` (the contracts are in ``cggr.distributed``): resolving the setting,
the checks across ranks, global selection and the exchange of rows, the group's trained-target count, and
FSDP2's root parameters for the router. A mixin of ``CGGRModel``: it reads ``model``, ``policy``,
``schedule``, ``seed``, ``step_options``, ``_step``, ``_in_forward``, ``_generator`` and
``_data_parallel_arg`` / ``_dp_state``."""
import contextlib
from typing import Optional

import torch

from . import distributed as dp_ops
from .distributed import DataParallel
from .model_checks import check_selection
from .policies import RowSelection
from .rows import IGNORE_INDEX


class DataParallelRows:
    # -- data parallelism (cggr.distributed) ---------------------------------------------------------
    def _data_parallel(self, batch_rows: int, device) -> Optional[DataParallel]:
        """The resolved ``data_parallel`` setting; at the first training step every rank's configuration
        is compared; every step reads back the previous step's row counts (per-rank selection)."""
        if self._dp_state is None:
            setting = dp_ops.resolve_data_parallel(self._data_parallel_arg, "CGGRModel")
            if setting is not None and setting.check_config:
                dp_ops.check_same_config(self._data_parallel_config(setting), setting, "CGGRModel")
            self._dp_state = (setting, dp_ops.DeferredRowCheck("CGGRModel"))
        setting, rows_check = self._dp_state
        rows_check.flush()
        return setting

    @property
    def data_parallel(self) -> Optional[DataParallel]:
        """The data-parallel setting in effect (``data_parallel='auto'`` resolved; None: no collectives)."""
        if self._dp_state is not None:
            return self._dp_state[0]
        return dp_ops.resolve_data_parallel(self._data_parallel_arg, "CGGRModel")

    def _data_parallel_config(self, setting):
        # batch rows are compared every step (a packed batch's row count may differ between ranks in cggr.hf)
        return {"policy": self.policy, "schedule": self.schedule, "cggr_step": self._step, "seed": self.seed,
                "data_parallel.selection": setting.selection, "world size": setting.world_size,
                "step_options": self.step_options}

    def _router_params_gathered(self):
        """FSDP2: the router uses the root's parameters (embedding, final norm, LM head) outside the model's
        forward: gathered for the pass unless this wrapper's own forward (the FSDP root) already did."""
        self._check_single_fsdp_root()
        if dp_ops.is_fsdp_module(self):  # this wrapper is the root: its forward has gathered them
            return contextlib.nullcontext() if self._in_forward else dp_ops.unsharded(self)
        if dp_ops.is_fsdp_module(self.model):
            return dp_ops.unsharded(self.model)
        return contextlib.nullcontext()

    def _select_global(self, values, k, B, dp, device) -> RowSelection:
        """DataParallel(selection='global'): the policy over the concatenated batch (rank-major), ``W * k``
        rows; this rank's share of them (``cggr.distributed.assign_rows``) as positions in that batch."""
        W = dp.world_size  # the batch shapes were compared by select_rows
        if isinstance(values, torch.Tensor):
            values = dp_ops.all_gather_rows(values, dp)
            self.last_row_values = values
        else:
            values = W * B
        # the same generator stream on every rank: every rank draws the same global choice
        selection = self.policy.select(values, W * k, self._generator(device))
        check_selection(selection, W * B, device)
        chosen = selection.indices.tolist()
        share = dp_ops.assign_rows(chosen, W, B, dp.rank)
        weight = None
        if selection.row_weight is not None:
            by_position = dict(zip(chosen, selection.row_weight.tolist()))
            weight = torch.tensor([by_position[p] for p in share], dtype=torch.float32, device=device)
        return RowSelection(torch.tensor(share, dtype=torch.int64, device=device), weight)

    @staticmethod
    def _take_global(selection, dp, batch_rows, tensors):
        """The rows of ``selection`` (positions in the rank-major concatenation of every rank's batch) from
        each per-row tensor of ``tensors`` (None and non-row values pass through): one all-gather each."""
        idx = selection.indices

        def take(t):
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != batch_rows:
                return t
            return dp_ops.all_gather_rows(t, dp).index_select(0, idx.to(t.device))

        return {name: take(t) for name, t in tensors.items()}

    def _check_single_fsdp_root(self):
        if dp_ops.is_fsdp_module(self) and dp_ops.is_fsdp_module(self.model):
            # the wrapped model's own group (embedding, final norm, LM head) would stay sharded outside its
            # forward, where the router and the fused loss use it
            raise ValueError("FSDP2: fully_shard was applied to both the CGGRModel and the model it wraps; apply "
                             "it to the decoder blocks and then to one of them (the CGGRModel for "
                             "loss_impl='fused' / forward_impl='trunk')")

    def _check_fsdp_root(self):
        self._check_single_fsdp_root()
        if dp_ops.is_fsdp_module(self.model) and not dp_ops.is_fsdp_module(self):
            raise ValueError("StepOptions(loss_impl='fused' / forward_impl='trunk') run the model's modules and LM "
                             "head outside its forward, where FSDP2 gathers the root's parameters: apply "
                             "fully_shard to the CGGRModel (after its blocks), not to the wrapped model, or use "
                             "loss_impl='model', forward_impl='model'")

    def _data_parallel_total(self, count, batch_rows, dp):
        """``count`` summed over the group (device tensor, no synchronisation). Every rank's batch rows travel
        with it and are compared at the next step or evaluation (``DeferredRowCheck``)."""
        gathered = dp_ops.gather_counts(count, batch_rows, dp)
        self._dp_state[1].push(gathered[:, 1])
        return gathered[:, 0].sum()

    def _flush_row_check(self):
        if self._dp_state is not None:
            self._dp_state[1].flush()

    def trained_targets(self, labels: torch.Tensor, rows: Optional[RowSelection]) -> torch.Tensor:
        """0-dim int64 (device): the count that normalises ``forward(..., labels=labels, rows=rows)``'s loss on
        this rank: the shifted targets it trains (those that are not -100; with
        ``DataParallel(selection='global')`` the rows of this rank's share, gathered: a collective), or the
        whole batch's for a weighted selection of a ``loss_norm='batch'`` policy. For gradient accumulation
        over ``n`` micro-batches: choose every micro-batch's rows first (``select_rows``), sum this over them
        and over the ranks (``cggr.distributed.sum_over_ranks``), and pass the total as
        ``num_items_in_batch`` to each forward."""
        if rows is None or (rows.row_weight is not None and self.policy.loss_norm == "batch"):
            return (labels[:, 1:] != IGNORE_INDEX).sum()
        dp = self._dp_state[0] if self._dp_state is not None else None
        if dp is not None and dp.selection == "global":
            labels = self._take_global(rows, dp, labels.shape[0], {"labels": labels})["labels"]
        else:
            labels = labels.index_select(0, rows.indices.to(labels.device))
        return (labels[:, 1:] != IGNORE_INDEX).sum()
