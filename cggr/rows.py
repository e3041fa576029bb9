"""Per-row helpers shared by ``CGGRModel`` and ``cggr.reference``: which shifted targets count, row means,
and how many rows a ratio keeps. Device-side, no host synchronisation.

Labels are shifted the way Hugging Face causal LMs shift them: position t predicts ``labels[t + 1]``.
"""
import math

import torch
from torch import nn

IGNORE_INDEX = -100  # Hugging Face causal LMs hard-code it in their loss


def scored_targets(labels, attention_mask):
    """[B, T-1] bool: which shifted targets are scored: not ignore_index and, with a mask, both the
    predicting and the target position real tokens."""
    valid = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = valid & real[:, :-1] & real[:, 1:]
    return valid


def shifted_targets(labels, attention_mask):
    """[B, T] targets and ``scored_targets``, padded at the last position (ignore_index / not scored)."""
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, nn.functional.pad(scored_targets(labels, attention_mask), (0, 1), value=False)


def reference_row_means(reference_nll, labels, attention_mask):
    """[B] float32 mean of ``reference_nll`` ([B, T-1]) over each row's scored targets; NaN for a row with
    none (so it never passes a threshold)."""
    valid = scored_targets(labels, attention_mask)
    ref = torch.where(valid, reference_nll.to(labels.device, torch.float32), 0.0)
    n = valid.sum(1)
    return torch.where(n > 0, ref.sum(1) / n.clamp_min(1).to(torch.float32), math.nan)


def weighted_row_loss(logits, labels, row_weight, n_norm=None):
    """``sum_i w_row(i) * nll_i / n`` over the valid shifted targets of [k, T, V] logits, in float32 like
    Hugging Face's ForCausalLMLoss (all-ones weights reproduce the model's loss). ``n``: ``n_norm`` (a
    device count), else the valid targets of these rows."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    n_valid = (targets != IGNORE_INDEX).sum() if n_norm is None else n_norm
    return (nll * row_weight.to(nll.dtype)[:, None]).sum() / n_valid.clamp_min(1).to(nll.dtype)


def rows_for_ratio(ratio: float, batch_size: int) -> int:
    """ceil(ratio * B), at least 1, at most B. The 1e-9 slack absorbs float error (0.3 * 10 = 3.0000000000000004)."""
    return min(batch_size, max(1, math.ceil(ratio * batch_size - 1e-9)))


def check_optional_positive_int(name: str, value):
    """``value`` must be None or an int >= 1 (not a bool); returned unchanged."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return value
