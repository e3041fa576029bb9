"""Row policies: which rows of a batch ``CGGRModel`` trains on.

A policy is a small object holding its own parameters. ``CGGRModel`` asks it for ``k`` rows of a batch of
``B`` and trains the full model on those rows only. What the policy looks at is declared by two class
attributes, so that ``CGGRModel`` runs only the work the policy needs:

- ``uses_router``: ``select`` gets ``[B]`` float32 router row scores (mean token score of each row under
  the truncated router, higher = harder, ``-inf`` for a row with nothing scored). ``CGGRModel`` runs the
  router pass (``router`` settings: depth, scored positions) only for these policies.
- ``uses_reference_rows``: ``select`` gets ``[B]`` float32 mean reference NLL of each row (lower = more
  like the reference's own data; NaN for a row with nothing scored); no router pass.
- neither: ``select`` gets the batch size ``B`` (an int).

``select(values, k, generator) -> RowSelection`` must not synchronise with the device; ``k`` is a host int
with ``1 <= k < B``; ``generator`` is a ``torch.Generator`` on the batch's device. Which policy to use, and
when selection helps at all, is measured in BENCHMARKS.md ("What decides the default").

The core policies live here; policies that lost in every measured regime live in ``cggr.experimental``.
A new policy subclasses ``RowPolicy``.
"""
import dataclasses
import math
from typing import NamedTuple, Optional, Union

import torch

from .scoring import check_combined_weights, check_strategy

LOSS_NORMS = ("selected", "batch")


class RowSelection(NamedTuple):
    indices: torch.Tensor                 # [k] int64 on the batch's device (the built-in policies: ascending)
    row_weight: Optional[torch.Tensor]    # [k] float32 loss weight per selected row, or None (= all 1)


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "None or an int >= 1" if allow_none else "an int >= 1"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def short_repr(settings) -> str:
    """``Name(field=value, ...)`` with only the fields that differ from their defaults."""
    changed = [f"{f.name}={getattr(settings, f.name)!r}" for f in dataclasses.fields(settings)
               if getattr(settings, f.name) != f.default]
    return f"{type(settings).__name__}({', '.join(changed)})"


@dataclasses.dataclass(frozen=True, repr=False)
class RouterSettings:
    """How a router-scoring policy scores rows.

    ``layers``: depth of the truncated router (the model's own first blocks + final norm + LM head);
    ignored when ``CGGRModel`` is given a ``router`` (its depth is used). ``token_stride``: score every
    s-th position only (positions ``s-1, 2s-1, ...``; the trunk still runs over the whole row).
    ``max_positions``: score the first P positions of each row only (the trunk runs on them alone; exact
    for causal models). ``chunk_size``: rows per chunk of the router's LM-head scoring (None: chunks of
    about 512 MiB of logits).
    """
    layers: int = 4
    token_stride: int = 1
    max_positions: Optional[int] = None
    chunk_size: Optional[int] = None

    def __post_init__(self):
        _positive_int("RouterSettings.layers", self.layers)
        _positive_int("RouterSettings.token_stride", self.token_stride)
        _positive_int("RouterSettings.max_positions", self.max_positions, allow_none=True)
        _positive_int("RouterSettings.chunk_size", self.chunk_size, allow_none=True)

    def __repr__(self):
        return short_repr(self)


def _ascending(indices):
    # Keep the selected rows in batch order: deterministic layout whatever order topk returns.
    return torch.sort(indices).values


class RowPolicy:
    """Base class of row policies (see the module docstring for the contract of ``select``).

    Class attributes a subclass may set: ``uses_router`` / ``uses_reference_rows`` (what ``select`` gets),
    ``scoring`` (token score of the router pass, ``cggr.scoring``), ``needs_reference_nll`` (the call must
    pass ``reference_nll``), ``loss_norm`` (``'selected'``: a weighted loss is divided by the valid
    targets of the selected rows; ``'batch'``: by those of the whole batch).
    """
    uses_router = False
    uses_reference_rows = False
    scoring = "loss"
    combined_weights = None
    loss_norm = "selected"
    router = None  # RouterSettings for router policies

    @property
    def needs_reference_nll(self) -> bool:
        return self.uses_reference_rows or self.scoring == "excess_loss"

    def select(self, values, k: int, generator: torch.Generator) -> RowSelection:
        raise NotImplementedError

    def _fields(self):
        """The parameters that define the policy (repr, equality, the Trainer's resume check): by default the
        instance's public attributes; a subclass with other state overrides this."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self):
        args = ", ".join(f"{name}={value!r}" for name, value in self._fields().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self._fields() == other._fields()

    def __hash__(self):
        return hash((type(self), tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                                       for k, v in self._fields().items())))


class RandomRows(RowPolicy):
    """Uniformly random rows without replacement; no router pass. The default without a reference."""

    def select(self, batch_size, k, generator):
        # The k largest of B uniform keys: static shapes, no sync.
        keys = torch.rand(batch_size, generator=generator, device=generator.device)
        return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


def _check_router(router, default):
    if router is None:
        return default
    if not isinstance(router, RouterSettings):
        raise TypeError(f"router must be a cggr.RouterSettings, got {type(router).__name__}")
    return router


class HardestRows(RowPolicy):
    """The k rows with the highest mean token score under the truncated router (the routing of the original
    design). ``scoring``: entropy|margin|loss|combined (``cggr.scoring``; ``combined_weights`` only with
    ``'combined'``); ``router``: ``RouterSettings`` (default: 4 blocks, every position)."""
    uses_router = True
    accepts_excess_loss = False  # HardestRows by excess loss is ExcessLossRows; subclasses may allow it

    def __init__(self, scoring: str = "loss", router: Optional[RouterSettings] = None,
                 combined_weights=None):
        scoring = check_strategy(scoring)
        if scoring == "excess_loss" and not self.accepts_excess_loss:
            raise ValueError(f"{type(self).__name__}(scoring='excess_loss'): use cggr.ExcessLossRows(), the policy "
                             "for rows ranked by excess loss (it has the router defaults measured for it)")
        if combined_weights is not None and scoring != "combined":
            raise ValueError(f"combined_weights apply to scoring='combined' only, got scoring={scoring!r}")
        self.scoring = scoring
        self.combined_weights = check_combined_weights(combined_weights) if scoring == "combined" else None
        # excess loss: ExcessLossRows' measured router (1 block, every 8th position)
        default = RouterSettings(layers=1, token_stride=8) if scoring == "excess_loss" else RouterSettings()
        self.router = _check_router(router, default)

    def _fields(self):
        fields = {"scoring": self.scoring, "router": self.router}
        if self.combined_weights is not None and self.combined_weights != check_combined_weights(None):
            fields["combined_weights"] = self.combined_weights
        return fields

    def select(self, row_scores, k, generator):
        return RowSelection(_ascending(torch.topk(row_scores, k, sorted=False).indices), None)


class ExcessLossRows(HardestRows):
    """The k rows with the highest excess loss: router NLL minus the reference NLL the call passes as
    ``reference_nll`` ([B, T-1], one value per shifted target; RHO-LOSS). ``router`` default: 1 block,
    every 8th position (the setting BENCHMARKS.md measured for this policy). The default with a reference."""

    def __init__(self, router: Optional[RouterSettings] = None):
        self.scoring = "excess_loss"
        self.combined_weights = None
        self.router = _check_router(router, RouterSettings(layers=1, token_stride=8))

    def _fields(self):
        return {"router": self.router}


def check_reference_threshold(threshold):
    """A finite number (a mean NLL in nats); a float back."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number (a mean reference NLL in nats), got {threshold!r}; "
                         "cggr.reference.domain_threshold computes one from the reference's NLL on held-out "
                         "in-domain rows")
    return float(threshold)


class ReferenceFilter(RowPolicy):
    """The reference as a domain filter, no router pass: rows whose mean reference NLL is at most
    ``threshold`` (the reference's own domain) first, in random order, then random rows of the rest.
    NaN means (nothing scored) never pass. ``cggr.reference.domain_threshold`` picks the threshold."""
    uses_reference_rows = True

    def __init__(self, threshold: float):
        self.threshold = check_reference_threshold(threshold)

    def _fields(self):
        return {"threshold": self.threshold}

    def select(self, row_reference, k, generator):
        # uniform keys in [0, 1), plus 1 for passing rows: the k largest take every passing row first
        keys = torch.rand(row_reference.shape, generator=generator, device=row_reference.device)
        keys = keys + (row_reference <= self.threshold).to(keys.dtype)
        return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


class ReferenceRanked(ReferenceFilter):
    """``ReferenceFilter`` with the passing rows taken lowest mean reference NLL first: when more rows pass
    than are kept, the ones left out are the likeliest false positives, not a random subset."""

    def select(self, row_reference, k, generator):
        # passing rows: 1 + (threshold - nll) >= 1; the others: uniform in [0, 1)
        keys = torch.rand(row_reference.shape, generator=generator, device=row_reference.device)
        passing = row_reference <= self.threshold
        keys = torch.where(passing, 1.0 + (self.threshold - row_reference.to(keys.dtype)), keys)
        return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


POLICY_AUTO = "auto"


def resolve_policy(policy: Union[str, RowPolicy], router_given: bool) -> RowPolicy:
    """``'auto'``: ``HardestRows()`` over the given router when ``CGGRModel`` gets a ``router`` (a router is
    passed to route by difficulty), else ``RandomRows()`` (no router pass; BENCHMARKS.md: without a
    reference, no router policy beat random rows). With a reference, pass ``ExcessLossRows()``.
    A ``router`` given with a policy that runs no router is an error."""
    if isinstance(policy, str):
        if policy != POLICY_AUTO:
            raise ValueError(f"policy must be 'auto' or a cggr.RowPolicy (RandomRows(), HardestRows(), "
                             f"ExcessLossRows(), ReferenceFilter(threshold), ReferenceRanked(threshold)), "
                             f"got {policy!r}")
        return HardestRows() if router_given else RandomRows()
    if type(policy).__name__ == "TruncatedRouter":
        raise TypeError("CGGRModel's second positional argument is now policy (cggr 0.6): pass the router by "
                        "keyword, CGGRModel(model, router=create_truncated_router(model, num_layers=...))")
    if not isinstance(policy, RowPolicy):
        raise TypeError(f"policy must be 'auto' or a cggr.RowPolicy, got {type(policy).__name__}")
    if router_given and not policy.uses_router:
        raise ValueError(f"router= is used only by policies that score rows with it (HardestRows, "
                         f"ExcessLossRows); {policy!r} runs no router pass, so the router would be ignored. "
                         f"Pass policy=cggr.HardestRows() to route by difficulty, or drop router=")
    if policy.loss_norm not in LOSS_NORMS:
        raise ValueError(f"{type(policy).__name__}.loss_norm must be one of {LOSS_NORMS}, got {policy.loss_norm!r}")
    if policy.uses_router and policy.uses_reference_rows:
        raise ValueError(f"{type(policy).__name__}: a policy selects either on router scores (uses_router) or "
                         "on reference NLL (uses_reference_rows), not both")
    return policy
