"""``CGGRConfig(policy=cggr.ConfidenceGate(...))`` in the Trainer: confidence-gated pruning of the data.

The trainer's training sampler becomes a ``cggr.pruning.ConfidenceGatedStream`` over the training dataset
(passes drawn one after the other, cut into the Trainer's fixed-length epochs: the same number of steps
trains more, shorter passes; accelerate shards its batches across processes as it does any sampler's,
and every process all-gathers the rows' losses, so every process holds the same table and draws the same
plan).
Each example carries its dataset index and its pass's weight through the collator (``INDEX_KEY``,
``WEIGHT_KEY``); ``compute_loss`` runs the
model without labels and weights each row's NLL by the pass's weights
(``cggr.pruning.gated_causal_lm_loss``), normalised by ``num_items_in_batch`` = the window's weighted
target count, summed over processes; the rows' mean NLL goes back to the sampler. The table, the pass
and its plan are saved with every checkpoint (``GATE_FILE``) and restored on resume.
"""
import math
import os

import torch
from torch.utils.data import Dataset

from ..pruning import ConfidenceGatedStream, gated_causal_lm_loss
from .batches import packed_starts

INDEX_KEY = "_cggr_index"   # collated dataset indices, [B] int64
WEIGHT_KEY = "_cggr_weight"  # collated loss weights of the pass each row was drawn in, [B] float32
GATE_FILE = "cggr_gate.pt"


class IndexedDataset(Dataset):
    """Each example of a map-style dataset of dicts, fetched by the stream's ``(index, weight)`` pairs,
    with its index under ``INDEX_KEY`` and its weight under ``WEIGHT_KEY``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, weight = key
        example = self.dataset[index]
        if not isinstance(example, dict):
            raise TypeError(f"ConfidenceGate in the Trainer needs a dataset of dicts (examples with input_ids), got "
                            f"{type(example).__name__} at index {index}")
        return {**example, INDEX_KEY: index, WEIGHT_KEY: weight}


class IndexCollator:
    """Wraps a data collator: takes ``INDEX_KEY`` / ``WEIGHT_KEY`` out of the features, collates the rest,
    and adds them as [B] tensors."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        ours = (INDEX_KEY, WEIGHT_KEY)
        batch = self.collator([{k: v for k, v in f.items() if k not in ours} for f in features])
        batch[INDEX_KEY] = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.int64)
        batch[WEIGHT_KEY] = torch.tensor([f[WEIGHT_KEY] for f in features], dtype=torch.float32)
        return batch


def planned_epochs(args, num_samples: int) -> int:
    """The passes the Trainer will make: ``num_train_epochs``, or what ``max_steps`` comes to."""
    if args.max_steps is not None and args.max_steps > 0:
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return max(1, math.ceil(args.max_steps * rows_per_step / num_samples))
    return max(1, math.ceil(args.num_train_epochs))


class GateState:
    """The trainer's sampler, built with its training dataloader, and a checkpoint's state waiting for it."""

    def __init__(self, gate, seed):
        self.gate, self.seed = gate, seed
        self.sampler = None
        self.pending = None

    def build(self, num_samples, args):
        # one sampler over the whole dataset: accelerate shards the batches across processes
        self.sampler = ConfidenceGatedStream(num_samples, planned_epochs(args, num_samples), self.gate,
                                             seed=self.seed, sync_updates=args.world_size > 1)
        if self.pending is not None:
            self.sampler.load_state_dict(self.pending)
            self.pending = None
        return self.sampler

    def save(self, folder):
        if self.sampler is not None:
            path = os.path.join(folder, GATE_FILE)
            torch.save(self.sampler.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)

    def load(self, folder) -> bool:
        path = os.path.join(folder, GATE_FILE)
        if not os.path.isfile(path):
            return False
        state = torch.load(path, weights_only=True)
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
        else:
            self.pending = state
        return True

    def weighted_targets(self, batches) -> torch.Tensor:
        """sum over the micro-batches of sum_i w_i * (row i's shifted targets), on the batches' device."""
        total = None
        for batch in batches:
            counts = (batch["labels"][:, 1:] != -100).sum(1).to(torch.float32)
            part = (batch[WEIGHT_KEY].to(counts.device) * counts).sum()
            total = part if total is None else total + part
        return total


def gated_compute_loss(trainer, model, inputs, num_items_in_batch):
    """The Trainer's loss of one micro-batch under the gate (module docstring)."""
    inputs = dict(inputs)
    index = inputs.pop(INDEX_KEY)
    weight = inputs.pop(WEIGHT_KEY)
    labels = inputs.pop("labels")
    if packed_starts({**inputs, "labels": labels}) is not None:
        raise ValueError("ConfidenceGate weights and scores whole examples; a packed batch (several examples in one "
                         "row, DataCollatorWithFlattening) mixes them: use a padding collator")
    outputs = model(**inputs)
    sampler = trainer.cggr_gate.sampler
    loss, row_nll = gated_causal_lm_loss(outputs.logits, labels, weight, num_items_in_batch)
    sampler.update(index.to(row_nll.device), row_nll)
    if num_items_in_batch is not None and trainer.args.average_tokens_across_devices:
        loss = loss * trainer.accelerator.num_processes  # the Trainer's convention: DDP averages the gradients
    return loss, outputs
