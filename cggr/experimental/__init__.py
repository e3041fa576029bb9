"""Parked experiments: row policies and reference signals that lost in every measured regime and are part of
no winning combination (BENCHMARKS.md keeps their numbers). They stay runnable, from ``cggr bench`` and from
user code, so that every published negative result can be reproduced; nothing in the core imports them.

- ``HalfHardestRows``: half the rows by the highest router (or excess) score, the rest at random.
- ``ImportanceRows``: rows drawn with replacement in proportion to a softmax of the router score, weighted
  to an unbiased estimate of the full batch's loss.
- ``ReferenceLowest``, ``ReferenceHalfLowest``: the rows with the lowest mean reference NLL (no threshold),
  all of them or half plus random rows.
- ``RunningBaseline``: a running mean of the router's row NLL per key, used as a reference.
- ``otsu_threshold``: a reference-NLL threshold without held-out data.
"""
from .baselines import RunningBaseline, otsu_threshold
from .policies import (HalfHardestRows, ImportanceRows, ReferenceHalfLowest, ReferenceLowest,
                       importance_probabilities)

__all__ = ["HalfHardestRows", "ImportanceRows", "ReferenceHalfLowest", "ReferenceLowest", "RunningBaseline",
           "importance_probabilities", "otsu_threshold"]
