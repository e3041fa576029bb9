"""The reference NLL computed ahead of training, into a dataset column (``CGGRConfig(reference='<column>')``).

One pass of the reference model over the data, then nothing per training step: worth it when the rows are
seen more than once, or when the reference should not occupy the training GPU. Per example the column holds
``len(input_ids) - 1`` floats, the NLL of each shifted target (0 where the label is -100), exactly what
``ReferenceModel(lm)(input_ids, labels)`` returns for that row alone.
"""
from typing import Optional, Union

import torch
from torch import nn

from ..reference import ReferenceModel


def add_reference_nll(dataset, reference: Union[ReferenceModel, nn.Module], column: str = "reference_nll",
                      batch_size: int = 16, device: Optional[Union[str, torch.device]] = None, **map_kwargs):
    """``dataset.map`` (a ``datasets.Dataset`` with an ``input_ids`` column, and ``labels`` if present) adding
    ``column``: per example the reference's per-target NLL, ``len(input_ids) - 1`` float32 values.

    Examples are scored ``batch_size`` at a time, right-padded to the longest of the batch with an attention
    mask (a causal model's NLL of a row does not depend on padding after it). ``device``: where the
    reference runs (default: where its parameters are). ``map_kwargs`` go to ``dataset.map`` (e.g.
    ``num_proc`` is not useful here; ``desc``, ``load_from_cache_file``). Errors: a missing ``input_ids``
    column, an example shorter than 2 tokens, an existing ``column``.
    """
    reference = reference if isinstance(reference, ReferenceModel) else ReferenceModel(reference)
    names = getattr(dataset, "column_names", None)
    if names is None or "input_ids" not in names:
        raise ValueError(f"dataset: expected a datasets.Dataset with an 'input_ids' column, got columns {names!r}")
    if column in names:
        raise ValueError(f"column {column!r} already exists in the dataset; pass another column= or remove it")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if device is None:
        device = next(reference.model.parameters()).device
    has_labels = "labels" in names

    def score(batch):
        rows = batch["input_ids"]
        short = [i for i, r in enumerate(rows) if len(r) < 2]
        if short:
            raise ValueError(f"input_ids: an example of {len(rows[short[0]])} token(s) has no shifted target "
                             "(need at least 2)")
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(r)
            labels[i, :len(r)] = torch.as_tensor(batch["labels"][i] if has_labels else r)
            mask[i, :len(r)] = 1
        nll = reference(ids.to(device), labels.to(device), mask.to(device)).cpu()
        return {column: [nll[i, :len(r) - 1].tolist() for i, r in enumerate(rows)]}

    return dataset.map(score, batched=True, batch_size=batch_size, **map_kwargs)
