"""Batch plumbing of the Trainer path: the precomputed reference column, row slicing, packed batches.

A *row* is what ``CGGRModel``'s policies select: a row of a padded ``[B, T]`` batch, or one sequence of a
padding-free packed batch (``DataCollatorWithFlattening``, TRL's ``padding_free``: one row ``[1, N]`` whose
``position_ids`` restart at every sequence). A packed batch is unpacked into a right-padded ``[S, L]``
batch of its sequences for scoring (``PackedBatch``), and the selected sequences are packed again, so the
trained forward stays padding-free.
"""
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from ..rows import IGNORE_INDEX, scored_targets

REFERENCE_KEY = "_cggr_reference_nll"   # collated precomputed reference NLL, [B, T-1] float32
SELECTED_KEY = "_cggr_selected"         # marks a batch whose rows CGGR already chose (get_batch_samples)
NO_TARGETS_KEY = "_cggr_no_targets"     # marks a selected packed batch in which no sequence has a target
# Packed-batch keys that describe the sequence layout: rebuilt for the selected sequences.
_LAYOUT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def take_rows(batch: dict, indices: torch.Tensor, batch_size: int) -> dict:
    """The batch restricted to ``indices``: every tensor whose first dimension is the batch's follows its
    rows (as in ``CGGRModel``); anything else (flags, [1, T] ``position_ids``) passes through."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size:
            value = value.index_select(0, indices.to(value.device))
        out[name] = value
    return out


def scored_target_counts(labels: torch.Tensor) -> torch.Tensor:
    """[B] int64: the shifted targets of each row that carry loss (HF's causal-LM count)."""
    return scored_targets(labels, None).sum(1)


def packed_starts(batch: dict) -> Optional[List[int]]:
    """Start offsets of the sequences of a padding-free packed batch (one row, ``position_ids`` restarting),
    or None when the batch is not one (one host read of the restarts)."""
    ids, pos = batch.get("input_ids"), batch.get("position_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return None
    if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != tuple(ids.shape):
        return None
    row = pos[0]
    restarts = (torch.nonzero(row[1:] <= row[:-1]).flatten() + 1).tolist()
    return [0] + restarts if restarts else None


class PackedBatch(NamedTuple):
    """A packed batch unpacked: its sequences as a right-padded batch, and the way back."""
    rows: dict                  # input_ids / labels / attention_mask / position_ids [S, L] (+ REFERENCE_KEY)
    starts: torch.Tensor        # [S] int64 (host) offset of each sequence in the packed row
    lengths: torch.Tensor       # [S] int64 (host)


def unpack(batch: dict, starts: List[int], drop_untargeted: bool = True) -> PackedBatch:
    """Sequences of the packed ``[1, N]`` batch as ``[S, L]`` rows (right padding, ``attention_mask``),
    dropping sequences without a scored target (padding tokens that a collator packs as 1-token sequences)
    unless ``drop_untargeted=False``. ``labels`` at each sequence's first position never count (they are no
    shifted target of the row)."""
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    n = ids.shape[0]
    device = ids.device
    starts_t = torch.tensor(starts, dtype=torch.int64)
    lengths_t = torch.diff(starts_t, append=torch.tensor([n]))
    L = int(lengths_t.max())
    ar = torch.arange(L, device=device)
    first = starts_t.to(device)[:, None]
    real = ar[None] < lengths_t.to(device)[:, None]
    gather = (first + ar[None]).clamp_max(n - 1)
    seq_labels = torch.where(real, labels[gather], IGNORE_INDEX)
    seq_labels[:, 0] = IGNORE_INDEX
    # keep the sequences that have a scored target (one host read; the packed check already synchronised)
    keep = (scored_target_counts(seq_labels) > 0).cpu()
    if not drop_untargeted:
        keep = torch.ones_like(keep)
    rows = {"input_ids": torch.where(real, ids[gather], ids[gather[:, :1]]),
            "labels": seq_labels,
            "attention_mask": real.to(torch.int64),
            # positions continue past a sequence's end on its padding (never attended by its real tokens)
            "position_ids": torch.where(real, pos[gather], pos[gather[:, :1]] + ar[None])}
    ref = batch.get(REFERENCE_KEY)
    if ref is not None:  # [1, N-1]: target t of the packed row is predicted at position t
        ref_gather = (first + ar[None, :-1]).clamp_max(max(n - 2, 0))
        ref_real = ar[None, :-1] < (lengths_t.to(device)[:, None] - 1)
        rows[REFERENCE_KEY] = torch.where(ref_real, ref[0][ref_gather], 0.0)
    idx = torch.nonzero(keep).flatten()
    rows = {name: value.index_select(0, idx.to(value.device)) for name, value in rows.items()}
    return PackedBatch(rows, starts_t[idx], lengths_t[idx])


def without_targets(batch: dict) -> dict:
    """The packed batch unchanged but for its labels (every one -100) and the reference column, marked with
    ``NO_TARGETS_KEY``: its forward still runs (every data-parallel rank runs the same collectives) and
    trains nothing (``CGGRTrainer.compute_loss`` gives it a zero-weighted loss)."""
    out = {name: value for name, value in batch.items() if name != REFERENCE_KEY}
    for name in ("labels", "shift_labels"):
        if isinstance(out.get(name), torch.Tensor):
            out[name] = torch.full_like(out[name], IGNORE_INDEX)
    out[NO_TARGETS_KEY] = True
    return out


def repack(batch: dict, packed: PackedBatch, selected: torch.Tensor) -> dict:
    """The packed batch restricted to the ``selected`` sequences (indices into ``packed.rows``, ascending),
    packed again in their order: every ``[1, N]`` tensor is cut to their tokens, the labels at each
    sequence's first token become -100 (no prediction across a boundary), and the layout keys that the
    batch had (``cu_seq_lens_*``, ``max_length_*``, ``seq_idx``) are rebuilt."""
    selected = selected.cpu()
    if selected.numel() == 0:  # torch.cat of no sequences: the caller keeps such a batch (without_targets)
        raise ValueError("repack: selected holds no sequence; a packed batch without a trained sequence goes "
                         "through without_targets")
    starts, lengths = packed.starts[selected], packed.lengths[selected]
    n = batch["input_ids"].shape[1]
    token_idx = torch.cat([torch.arange(int(s), int(s) + int(length)) for s, length in zip(starts, lengths)])
    out = {}
    for name, value in batch.items():
        if name in _LAYOUT_KEYS or name == REFERENCE_KEY:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == n:
            value = value.index_select(1, token_idx.to(value.device))
        out[name] = value
    first = torch.cumsum(lengths, 0) - lengths  # offsets of the sequences in the new row
    if "labels" in out:
        out["labels"] = out["labels"].clone()
        out["labels"][0, first.to(out["labels"].device)] = IGNORE_INDEX
    cu = torch.cat([first, lengths.sum().reshape(1)])
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if name in batch:
            old = batch[name]
            out[name] = cu.to(old.device if isinstance(old, torch.Tensor) else "cpu", torch.int32)
    for name in ("max_length_q", "max_length_k"):
        if name in batch:
            out[name] = int(lengths.max())
    if "seq_idx" in batch:
        old = batch["seq_idx"]
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)[None]
        out["seq_idx"] = seq_idx.to(old.device, old.dtype)
    return out


class ReferenceColumnCollator:
    """Wraps a data collator: takes the precomputed reference NLL column out of the features, collates the
    rest with the wrapped collator, and adds the reference as ``REFERENCE_KEY``, ``[B, T-1]`` float32 aligned
    with the collated ``input_ids`` (left or right padding, or a packed ``[1, N]`` row), 0 on padding.

    Per example the column holds ``len(input_ids) - 1`` floats (one per shifted target) or one float (the
    row's mean, broadcast to its targets)."""

    def __init__(self, collator, column: str):
        self.collator = collator
        self.column = column

    def __call__(self, features, *args, **kwargs):
        if not features or not isinstance(features[0], dict) or self.column not in features[0]:
            return self.collator(features, *args, **kwargs)
        values = [f[self.column] for f in features]
        lengths = [len(f["input_ids"]) for f in features]
        rest = [{k: v for k, v in f.items() if k != self.column} for f in features]
        batch = self.collator(rest, *args, **kwargs)
        ids = batch["input_ids"]
        per_row = [self._row_values(v, n, i) for i, (v, n) in enumerate(zip(values, lengths))]
        B, T = ids.shape
        out = torch.zeros(B, T - 1, dtype=torch.float32)
        if B == 1 and len(features) > 1:  # packed: the sequences one after the other, 0 at each boundary
            flat = torch.cat([torch.cat([v, torch.zeros(1)]) for v in per_row])[: T - 1]
            out[0, : flat.shape[0]] = flat
        else:
            if B != len(features):
                raise ValueError(f"reference column {self.column!r}: the collator made {B} rows of "
                                 f"{len(features)} examples; only padded batches and one packed row are supported")
            for i, (v, n) in enumerate(zip(per_row, lengths)):
                if n > T:
                    raise ValueError(f"reference column {self.column!r}: example {i} has {n} tokens, its collated "
                                     f"row {T} (a collator that truncates must truncate the column too)")
                first = self._offset(ids[i], features[i]["input_ids"], n, T)
                out[i, first: first + n - 1] = v
        batch[REFERENCE_KEY] = out
        return batch

    def _row_values(self, value, n_tokens, i):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.full((max(n_tokens - 1, 0),), float(value))
        v = torch.as_tensor(value, dtype=torch.float32).flatten()
        if v.numel() != n_tokens - 1:
            raise ValueError(f"reference column {self.column!r}: example {i} has {n_tokens} tokens, so "
                             f"{n_tokens - 1} reference values (one per shifted target) or one value (the "
                             f"row's mean), got {v.numel()}")
        return v

    @staticmethod
    def _offset(row, tokens, n, T):
        """0 for a right-padded row, T - n for a left-padded one."""
        tokens = torch.as_tensor(tokens, dtype=row.dtype)
        if n == T or torch.equal(row[:n], tokens):
            return 0
        if torch.equal(row[T - n:], tokens):
            return T - n
        raise ValueError("reference column: cannot find an example's tokens in its collated row (a collator that "
                         "changes input_ids is not supported with a precomputed reference)")


def check_reference_vocab(reference_model: nn.Module, model: nn.Module):
    """A reference must score the model's tokens: its LM head must have the model's vocabulary size."""
    def vocab(m):
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        return None if weight is None else weight.shape[0]

    v_ref, v_model = vocab(reference_model), vocab(model)
    if v_ref is not None and v_model is not None and v_ref != v_model:
        raise ValueError(f"CGGRConfig.reference: its vocabulary has {v_ref} entries, the model's {v_model}; a "
                         "reference must use the model's tokenizer (its per-token NLL is read at the model's "
                         "token ids)")
