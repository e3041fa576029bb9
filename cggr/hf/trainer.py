"""``CGGRTrainer``: ``transformers.Trainer`` training on the rows a ``cggr`` row policy picks.

How a step runs (one optimizer step = one gradient-accumulation window of ``n`` micro-batches):

1. ``get_batch_samples`` (the Trainer fetches the window's micro-batches there) chooses the rows of every
   micro-batch of the window first: the reference NLL when the policy needs it (on the fly, or the
   collated dataset column), the router pass when the policy scores rows with it (no grad, under the
   Trainer's autocast), ``k = ceil(ratio * B)`` rows by the policy. Each micro-batch is cut to its rows
   (a packed batch to its selected sequences), and ``num_items_in_batch`` is counted on the cut
   micro-batches: the shifted targets that are actually trained in the whole window. The weights do not
   change inside a window, so choosing all rows up front chooses what choosing each just before its
   forward would. The curriculum then advances one step (``CGGRModel.step``).
2. ``training_step`` / ``compute_loss`` are the Trainer's (or TRL's): the model's forward and loss on the
   selected rows only, normalised by that ``num_items_in_batch``. The loss of the window is therefore
   ``sum of the NLL of the trained targets / their count`` over all its micro-batches, what the Trainer
   computes without CGGR over all targets.

Evaluation and prediction run the plain model on every row. The selection state (``cggr_step``) is saved in
every checkpoint (``cggr_state.json``) and restored by ``train(resume_from_checkpoint=...)``.
"""
import json
import logging
import os
import time
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, unwrap_peft_model

from ..compile_blocks import begin_graph_call
from ..model import STEP_KEY, CGGRModel
from ..reference import ReferenceModel

from .batches import (NO_TARGETS_KEY, REFERENCE_KEY, SELECTED_KEY, ReferenceColumnCollator, check_reference_vocab,
                      packed_starts, repack, scored_target_counts, take_rows, unpack, without_targets)
from .config import CGGRConfig
from .gate import INDEX_KEY, WEIGHT_KEY, GateState, IndexCollator, IndexedDataset, gated_compute_loss

logger = logging.getLogger(__name__)
STATE_FILE = "cggr_state.json"


class _Window:
    """What the rows chosen since the last log came to (device sums: read when logged)."""

    def __init__(self):
        self.rows_total = self.rows_kept = 0
        self.tokens_total = self.tokens_kept = None
        self.score_sum = self.score_count = None
        self.router_spans, self.step_spans = [], []  # (start, end) marks: read when logged
        self.steps = 0

    def add_tokens(self, total, kept):
        self.tokens_total = total if self.tokens_total is None else self.tokens_total + total
        self.tokens_kept = kept if self.tokens_kept is None else self.tokens_kept + kept

    def add_scores(self, values):
        finite = torch.isfinite(values)
        s, n = torch.where(finite, values, 0.0).sum(), finite.sum()
        self.score_sum = s if self.score_sum is None else self.score_sum + s
        self.score_count = n if self.score_count is None else self.score_count + n

    def metrics(self) -> dict:
        out = {}
        if self.rows_total:
            out["cggr/kept_rows"] = self.rows_kept / self.rows_total
        if self.tokens_total is not None:
            total = int(self.tokens_total)
            out["cggr/kept_ratio"] = int(self.tokens_kept) / total if total else 0.0
        if self.score_count is not None and int(self.score_count) > 0:
            out["cggr/selected_score"] = float(self.score_sum) / int(self.score_count)
        step_s = sum(_seconds(a, b) for a, b in self.step_spans)
        if step_s > 0:
            out["cggr/router_time_share"] = sum(_seconds(a, b) for a, b in self.router_spans) / step_s
        return out


def _mark(device):
    """A point in time of the step: a recorded CUDA event on a GPU (no synchronisation on the training
    path; read when the metrics are logged), the host clock elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _seconds(start, end) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class CGGRTrainerMixin:
    """The CGGR part of ``CGGRTrainer`` / ``CGGRSFTTrainer``: put it before the Trainer class in the bases.

    Adds the keyword ``cggr_config`` (a ``CGGRConfig``; default ``CGGRConfig()``) to the Trainer's
    constructor. ``self.cggr_model`` is the ``CGGRModel`` that holds the policy, router, schedule and
    step; it wraps the Trainer's model (a PEFT model's base model, whose layers carry the adapters).
    """

    def __init__(self, *args, cggr_config: Optional[CGGRConfig] = None, **kwargs):
        config = CGGRConfig() if cggr_config is None else cggr_config
        if not isinstance(config, CGGRConfig):
            raise TypeError(f"cggr_config must be a cggr.hf.CGGRConfig, got {type(config).__name__}")
        self.cggr_config = config
        super().__init__(*args, **kwargs)
        self.cggr_model = self._build_cggr_model()
        self.cggr_reference = None
        if config.reference is not None and config.reference_column is None:
            ref = config.reference.model if isinstance(config.reference, ReferenceModel) else config.reference
            trained = {id(p) for p in self.cggr_model.model.parameters()}
            if any(id(p) in trained for p in ref.parameters()):
                raise ValueError("CGGRConfig.reference shares weights with the model being trained; for a frozen "
                                 "copy of the starting checkpoint pass cggr.ReferenceModel.frozen_copy(model)")
            check_reference_vocab(ref, self.cggr_model.model)
            self.cggr_reference = config.reference_model()
            if self.place_model_on_device:
                ref.to(self.args.device)
        column = config.reference_column
        if column is not None:
            self.data_collator = ReferenceColumnCollator(self.data_collator, column)
        self.cggr_graphs = config.step_options is not None and config.step_options.compile == "blocks-cudagraphs"
        if self.cggr_graphs and self.args.device.type != "cuda":
            raise ValueError(f"CGGRConfig.step_options=StepOptions(compile='blocks-cudagraphs') replays CUDA graphs, "
                             f"and this Trainer runs on {self.args.device}; use compile='blocks' there")
        self.cggr_gate = GateState(config.gate, config.seed) if config.gate is not None else None
        self.cggr_window = _Window()
        self._cggr_step_start = None
        if config.log_metrics:
            # first, so that the reporters (wandb, tensorboard, ...) see the keys it adds to the logs
            self.callback_handler.callbacks.insert(0, CGGRCallback(self))

    # -- the wrapped model ---------------------------------------------------------------------------------
    def _build_cggr_model(self, step: int = 0) -> CGGRModel:
        model = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        cggr_model = CGGRModel(model, **self.cggr_config.cggr_model_kwargs())
        if step:
            cggr_model.load_state_dict({STEP_KEY: torch.tensor(step)}, strict=False)
        return cggr_model

    def _cggr_sync_model(self):
        """Rebuild the wrapper when the Trainer replaced its model (``model_init``), keeping the step."""
        current = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        if self.cggr_model.model is not current:
            self.cggr_model = self._build_cggr_model(self.cggr_model.step_count)

    # -- columns and checkpoints ---------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        column = self.cggr_config.reference_column
        if column is not None and self._signature_columns is not None and column not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [column]
        if self.cggr_gate is not None and self._signature_columns is not None:
            self._signature_columns = list(self._signature_columns) + [INDEX_KEY, WEIGHT_KEY]

    # -- ConfidenceGate: the sampler and the examples' indices (cggr/hf/gate.py) ---------------------------
    def get_train_dataloader(self):
        if self.cggr_gate is None:
            return super().get_train_dataloader()
        original, collator = self.train_dataset, self.data_collator
        dataset = original
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):
            # a datasets.Dataset: what the Trainer does to it (unused columns removed), before the index is added
            dataset = self._remove_unused_columns(dataset, description="training")
        self.train_dataset, self.data_collator = IndexedDataset(dataset), IndexCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = original, collator

    def _get_train_sampler(self, train_dataset=None):
        if self.cggr_gate is None:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return self.cggr_gate.build(len(dataset), self.args)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._cggr_load_state(resume_from_checkpoint)
        else:  # a fresh run (the Trainer restarts its global_step): the selection state restarts from step 0
            self.cggr_model = self._build_cggr_model()
            self.cggr_window, self._cggr_step_start = _Window(), None
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _cggr_load_state(self, checkpoint: str):
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no {STATE_FILE} (not saved by a cggr trainer): the CGGR curriculum "
                           f"continues from step {self.cggr_model.step_count}")
            return
        if self.cggr_gate is not None and not self.cggr_gate.load(checkpoint):
            logger.warning(f"{checkpoint} has no ConfidenceGate state: the scores start empty")
        with open(path) as f:
            state = json.load(f)
        saved = state.get("policy")
        if saved is not None and saved != repr(self.cggr_model.policy):
            logger.warning(f"{path}: saved with policy {saved}, resuming with {self.cggr_model.policy!r}")
        self.cggr_model.load_state_dict({STEP_KEY: torch.tensor(int(state[STEP_KEY]))}, strict=False)

    def _save_checkpoint(self, model, trial):
        # before super(): it pushes the checkpoint folder to the Hub (push_to_hub) before it returns
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")  # the folder super() saves
            os.makedirs(folder, exist_ok=True)
            state = {STEP_KEY: self.cggr_model.step_count, "seed": self.cggr_config.seed,
                     "policy": repr(self.cggr_model.policy), "curriculum_ratio": self.cggr_model.current_ratio}
            path = os.path.join(folder, STATE_FILE)
            with open(path + ".tmp", "w") as f:  # atomic: a kill leaves the old file or none, never half
                json.dump(state, f, indent=2)
            os.replace(path + ".tmp", path)
            if self.cggr_gate is not None:
                self.cggr_gate.save(folder)
        super()._save_checkpoint(model, trial)

    # -- row selection -------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The window's micro-batches cut to their selected rows, and the count of trained targets."""
        step_start = _mark(self.args.device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self._cggr_sync_model()
        if not batches:  # the data ran out (an iterable dataset under max_steps): no step, no curriculum step
            return batches, None
        t0 = _mark(self.args.device)
        with torch.no_grad(), self.accelerator.autocast():
            batches = [self._cggr_select(self._prepare_inputs(b)) for b in batches]
        self.cggr_window.router_spans.append((t0, _mark(self.args.device)))
        self._cggr_step_start = step_start
        self.cggr_model.step()  # the whole window was chosen at this curriculum step
        return batches, self._cggr_num_items(batches, device)

    def _cggr_num_items(self, batches, device):
        if self.cggr_gate is not None and batches and "labels" in batches[0]:
            # the window's weighted target count (the gate's normaliser), summed over processes
            total = self.cggr_gate.weighted_targets(batches).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total.reshape(1)).sum()
            return total
        counter = getattr(super(), "_get_num_items_in_batch", None)
        if counter is not None:
            return counter(batches, device)
        if not batches or "labels" not in batches[0]:  # transformers without the helper: count it here
            return None
        return sum(int(scored_target_counts(b["labels"]).sum()) for b in batches)

    def _cggr_select(self, batch: dict) -> dict:
        """One micro-batch (on the device) cut to the rows the policy keeps, marked as selected."""
        batch = dict(batch)
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError("CGGR selects rows by the targets in 'labels', and the training batch has none: use a "
                             "collator that sets labels (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        starts = packed_starts(batch)
        if starts is not None:
            packed = unpack(batch, starts)
            if packed.rows["input_ids"].shape[0] == 0:
                # no sequence has a target: the selection (its collectives under data parallelism: the first
                # step's configuration check, the router's FSDP2 gathers) runs on every sequence as on the
                # other ranks, its choice unused, and the batch trains nothing
                self._cggr_choose(unpack(batch, starts, drop_untargeted=False).rows, record=False)
                out = without_targets(batch)
                out[SELECTED_KEY] = True
                return out
            indices = self._cggr_choose(packed.rows)
            if indices is None:
                indices = torch.arange(packed.rows["input_ids"].shape[0])
            out = repack(batch, packed, indices)
        else:
            indices = self._cggr_choose(batch)
            out = {k: v for k, v in batch.items() if k != REFERENCE_KEY}
            if indices is not None:
                out = take_rows(out, indices, batch["input_ids"].shape[0])
        out[SELECTED_KEY] = True
        return out

    def _cggr_choose(self, rows: dict, record: bool = True) -> Optional[torch.Tensor]:
        """Indices of the rows to train (ascending), or None for every row: ``CGGRModel.select_rows`` (the
        same checks, router pass, generator stream and policy call as a plain-loop forward). ``record``:
        count the rows in the logged metrics."""
        cggr = self.cggr_model
        policy = cggr.policy
        input_ids, labels = rows["input_ids"], rows["labels"]
        attention_mask = rows.get("attention_mask")
        B = input_ids.shape[0]
        reference_nll = None
        if policy.needs_reference_nll:
            reference_nll = rows.get(REFERENCE_KEY)
            if reference_nll is None:
                if self.cggr_reference is None:
                    raise ValueError(f"CGGRConfig.reference={self.cggr_config.reference!r}: the batch has no "
                                     "reference values (is the column in the training dataset?)")
                # only the targets the policy's router reads (every 8th for ExcessLossRows()): 1/8 of the head
                reference_nll = self.cggr_reference(input_ids, labels, attention_mask,
                                                    token_stride=cggr.reference_token_stride)
        router_kwargs = {n: rows[n] for n in ("position_ids", "token_type_ids") if rows.get(n) is not None}
        selection = cggr.select_rows(input_ids, labels, attention_mask, reference_nll, **router_kwargs)
        if selection is not None and selection.row_weight is not None:
            raise ValueError(f"{policy!r} weights the selected rows' loss, which the Trainer path (the model's own "
                             "loss on the selected rows) does not do: use CGGRModel in a training loop")
        if not record:
            return None
        counts = scored_target_counts(labels)
        window = self.cggr_window
        window.rows_total += B
        if selection is None:
            window.rows_kept += B
            window.add_tokens(counts.sum(), counts.sum())
            return None
        indices = selection.indices
        window.rows_kept += int(indices.numel())
        window.add_tokens(counts.sum(), counts.index_select(0, indices).sum())
        if cggr.last_row_values is not None:
            window.add_scores(cggr.last_row_values.index_select(0, indices))
        return indices

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss on the selected rows (training) or on every row (evaluation)."""
        inputs = dict(inputs)
        if self.cggr_graphs:  # the rows were chosen ahead (get_batch_samples): their router outputs are spent
            begin_graph_call(inputs["input_ids"].device, "CGGRTrainer")
        selected = inputs.pop(SELECTED_KEY, False)
        no_targets = inputs.pop(NO_TARGETS_KEY, False)
        inputs.pop(REFERENCE_KEY, None)
        if self.cggr_gate is not None and INDEX_KEY in inputs and self.model.training:
            loss, outputs = gated_compute_loss(self, model, inputs, num_items_in_batch)
            # normalised over the window already: the Trainer must not divide by the accumulation steps again
            # (it would for a model with accepts_loss_kwargs=False); without num_items_in_batch it must
            self.loss_is_scaled_for_ga = True if num_items_in_batch is not None else None
            return (loss, outputs) if return_outputs else loss
        inputs.pop(INDEX_KEY, None)
        inputs.pop(WEIGHT_KEY, None)
        if self.model.training and not selected and "labels" in inputs:
            # training_step called outside the Trainer's loop (no get_batch_samples): choose the rows here;
            # the loss is then normalised over this micro-batch's trained targets
            if num_items_in_batch is not None:
                raise RuntimeError("CGGRTrainer.compute_loss got a training batch whose rows were not chosen by "
                                   "get_batch_samples, with a num_items_in_batch counted over every row: the loss "
                                   "would be normalised by tokens that are not trained. Call training_step "
                                   "with num_items_in_batch=None, or go through Trainer.train()")
            with torch.no_grad():
                inputs = self._cggr_select(self._prepare_inputs(inputs))
            inputs.pop(SELECTED_KEY)
            no_targets = inputs.pop(NO_TARGETS_KEY, False)
        if no_targets:
            # nothing to train (a packed batch without targets): the forward runs as on the other ranks (DDP's
            # gradient all-reduce, FSDP2's gathers); 0 * one logit column keeps a graph with zero gradients
            # (one fp32 column: its sum cannot overflow as a half-precision sum over the vocabulary could)
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
            outputs = model(**inputs)
            loss = outputs.logits[..., :1].float().sum() * 0.0
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k not in (REFERENCE_KEY, SELECTED_KEY, INDEX_KEY, WEIGHT_KEY)}
        if self.cggr_graphs:
            begin_graph_call(inputs["input_ids"].device, "CGGRTrainer")
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # -- metrics -------------------------------------------------------------------------------------------
    def _cggr_step_end(self):
        """End of an optimizer step (``CGGRCallback.on_step_end``): the step's wall time, for the router share."""
        start = getattr(self, "_cggr_step_start", None)
        if start is None:
            return
        self.cggr_window.step_spans.append((start, _mark(self.args.device)))
        self.cggr_window.steps += 1
        self._cggr_step_start = None

    def pop_cggr_metrics(self) -> dict:
        """The CGGR numbers since the last call (host values: reading them synchronises), and a new window."""
        window, self.cggr_window = self.cggr_window, _Window()
        if window.rows_total == 0:
            return {}
        metrics = window.metrics()
        metrics["cggr/curriculum_ratio"] = self.cggr_model.current_ratio
        metrics["cggr/step"] = self.cggr_model.step_count
        if self.cggr_gate is not None and self.cggr_gate.sampler is not None:
            stats = self.cggr_gate.sampler.pass_stats()
            metrics["cggr/pruned_rows"] = stats["rows_pruned"] / stats["rows_total"]
        return metrics


class CGGRCallback(TrainerCallback):
    """Adds the CGGR numbers to every training log of a CGGR trainer, so that whatever the Trainer reports to
    gets them (``log_history`` too). Keys, averaged over the steps since the previous log:

    - ``cggr/kept_ratio``: trained targets / targets (the tokens that carried loss);
    - ``cggr/kept_rows``: trained rows / rows (sequences, for packed batches);
    - ``cggr/router_time_share``: time choosing rows (reference, router, policy) / step time (CUDA events
      read at logging, the host clock on a CPU; no synchronisation per step);
    - ``cggr/selected_score``: the selected rows' mean policy value (router score, excess loss, or mean
      reference NLL; absent for ``RandomRows``, which scores nothing);
    - ``cggr/curriculum_ratio`` and ``cggr/step``: the curriculum's ratio and step now.

    ``CGGRConfig(log_metrics=True)`` (the default) adds it first among the trainer's callbacks.
    """

    def __init__(self, trainer=None):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None:
            self.trainer._cggr_step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        metrics = self.trainer.pop_cggr_metrics()
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


class CGGRTrainer(CGGRTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains each step on the rows a ``cggr`` row policy picks.

    ``CGGRTrainer(model=..., args=TrainingArguments(...), train_dataset=..., cggr_config=CGGRConfig(...))``;
    every other argument is the Trainer's. See the module docstring for how a step runs, and
    docs/hf.md for usage and caveats.
    """
