"""CGGRModel: score every sequence with a cheap truncated router, train the full model on part of the rows.

Which part is the row policy's choice. The default (``selection='auto'``, ``default_selection``) follows
the ``cggr bench`` measurements: the rows with the highest excess loss when a reference NLL is given
(``scoring='excess_loss'``), otherwise uniformly random rows without a router pass.

One training step (``loss = cggr_model(input_ids, labels=labels, attention_mask=mask)``):

1. Router pass (``torch.no_grad``, the model's dtype / the active autocast): the model's own first
   ``router_layers`` blocks + final norm + LM head (``cggr.router``, shared tensors), scored chunk by
   chunk through ``cggr.linear.token_stats_from_hidden`` (no [B, T, V] logits) and
   ``cggr.scoring.score``. Labels are shifted the way Hugging Face causal LMs shift them: position t
   predicts ``labels[t + 1]``; the last position has no target.
2. Row selection: ``k = ceil(ratio * B)`` rows by a row policy (``hardest``, ``stratified``,
   ``random``, ``importance``, ``reference_filter``, ``reference_ranked``; ``register_row_policy`` adds
   more). ``random`` and the reference policies (rows a reference model finds in-domain first) need no
   router pass.
3. Full forward (+ the caller's backward) on those k rows only.

Documented policies
-------------------
- Row difficulty: mean token score over the row's scored tokens. A token is scored when its target is
  not ``ignore_index`` (-100) and, with an ``attention_mask``, both the predicting position and the
  target position are real tokens (pads never count, whatever their label). Rows with no scored token,
  and non-finite means, rank below every finite row.
- Row count: ``k = ceil(curriculum_ratio * B)`` (at least 1), from the host-side curriculum
  (``cggr.schedule.RatioSchedule``) only: a host float, so no synchronisation and a fixed row count per
  ratio (static shapes for ``torch.compile`` / CUDA graphs). ``dynamic_threshold=False`` is therefore
  the default. With ``dynamic_threshold=True`` the ratio is adjusted by the router's batch confidence
  (``cggr.schedule``) and read back to the host once per step to size the batch: one device->host
  synchronisation per step and a row count that varies between steps (documented cost, opt-in).
- Loss: Hugging Face's causal-LM loss on the selected rows, i.e. cross entropy over their shifted
  targets that are not -100, mean over those tokens (the model's own ``labels=`` path). A row policy
  that returns row weights gets ``sum_i w_row(i) * nll_i / n_valid`` computed here in float32 from the
  logits, which equals the model's loss when every weight is 1; a policy registered with
  ``loss_norm='batch'`` (``importance``) divides by ``n_total``, the valid shifted targets of the whole
  batch (``labels[:, 1:] != -100``, as the plain model's loss counts them), instead. With ratio 1.0 no
  router runs and the whole batch goes through unchanged: loss and gradients equal the plain model's.
  ``loss_impl='fused'`` computes the same mean (float rounding aside) through ``cggr.linear`` without
  [k, T, V] logits, and with ``token_ratio < 1`` over the hardest tokens of the selected rows only.
- state_dict: exactly the plain model's keys plus ``cggr_step`` (0-dim int64, the curriculum step), also
  when nested in a parent module (keys under the parent's prefix); ``load_state_dict`` resumes the step.
  The router registers nothing (it shares the model's tensors). A plain model's state_dict loads with
  ``strict=False`` (``cggr_step`` reported missing, the step kept).

Synchronisation: none in the router/selection path (scores, row indices and gathered rows stay on the
device) unless ``dynamic_threshold=True`` or ``collect_timing=True``; ``get_metrics()`` reads device
values and so synchronises when called. Hugging Face's own forward (transformers 5.x) synchronises once
per call: given a 2-D ``attention_mask`` its mask creation reads an all-ones check on the host (sdpa);
without one it checks ``position_ids`` for packed sequences on the host. ``forward_impl='trunk'`` runs the
trained rows through the model's modules in the order of its forward (``cggr.router.ModelTrunk``) with
the mask built without ``position_ids``: with ``attention_mask=None`` the whole step then issues no host
synchronisation.
"""
import functools
import math
import time
from collections import OrderedDict
from typing import Callable, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from . import ops
from .linear import fused_linear_selective_ce, token_stats_from_hidden
from .router import SUPPORTED_ARCHITECTURES, ModelTrunk, TruncatedRouter, create_truncated_router
from .schedule import SCHEDULES, RatioSchedule, batch_confidence, check_ratio
from .scoring import check_combined_weights, check_strategy, score

IGNORE_INDEX = -100  # Hugging Face causal LMs hard-code it in their loss
# Router scoring chunks: 512 MiB of logits (5461 rows at V = 49152 in bf16). cggr.linear's training-path
# default (~384 rows there, sized to keep peak memory with gradients low) meant ~86 launches of each
# scoring kernel per step at 32 x 1024 tokens; the router keeps no activations, so it can afford more.
ROUTER_CHUNK_BYTES = 512 << 20
STEP_KEY = "cggr_step"
COMPILE_SCOPES = ("router", "model", "all")
LOSS_IMPLS = ("model", "fused")
FORWARD_IMPLS = ("model", "trunk")
# What forward_impl='trunk' can honour besides input_ids / attention_mask / labels: the trunk's own inputs,
# and the loss's (HF's loss_function takes num_items_in_batch).
TRUNK_INPUTS = ("position_ids", "token_type_ids")
TRUNK_LOSS_KWARGS = ("num_items_in_batch",)


def _router_chunk_rows(n_tokens: int, vocab_size: int, itemsize: int) -> int:
    return max(1, min(n_tokens, ROUTER_CHUNK_BYTES // max(1, vocab_size * itemsize)))


def check_optional_positive_int(name: str, value):
    """``value`` must be None or an int >= 1 (not a bool); returned unchanged."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return value


class RowSelection(NamedTuple):
    indices: torch.Tensor                 # [k] int64 on the batch's device, ascending
    row_weight: Optional[torch.Tensor]    # [k] float32 loss weight per selected row, or None (= all 1)


LOSS_NORMS = ("selected", "batch")


class RowPolicy(NamedTuple):
    """``select(row_scores, k, generator) -> RowSelection``.

    ``row_scores``: [B] float32 row difficulty (higher = harder; ``-inf`` for rows that cannot be scored)
    or None when ``needs_scores`` is False (no router pass at all). ``k``: host int, 1 <= k < B.
    ``generator``: a ``torch.Generator`` on the batch's device. Must not synchronise.
    ``loss_norm``: how a weighted loss (``row_weight`` not None) is normalised: ``'selected'`` divides
    ``sum w * nll`` by the valid shifted targets of the selected rows, ``'batch'`` by those of the whole
    batch (``n_total``; what an importance-sampling estimator of the full batch's mean needs).
    """
    select: Callable[[Optional[torch.Tensor], int, torch.Generator], RowSelection]
    needs_scores: bool
    loss_norm: str = "selected"
    # True: ``select`` gets each row's mean reference NLL (``reference_row_means``; lower = closer to the
    # reference's own data) instead of router scores, and no router pass runs for it.
    reference_rows: bool = False
    # True: ``select`` also takes ``threshold=`` (CGGRModel's ``reference_threshold``, required with it).
    needs_threshold: bool = False


def _ascending(indices):
    # Keep the selected rows in batch order: deterministic layout whatever order topk returns.
    return torch.sort(indices).values


def _select_hardest(row_scores, k, generator):
    return RowSelection(_ascending(torch.topk(row_scores, k, sorted=False).indices), None)


def _select_stratified(row_scores, k, generator):
    # Half hardest (rounded up), the rest uniformly from the rows not already taken: keeps some easier
    # sequences in every batch so the model does not drift on the easy part of the distribution.
    k_hard = (k + 1) // 2
    hard = torch.topk(row_scores, k_hard, sorted=False).indices
    if k_hard == k:
        return RowSelection(_ascending(hard), None)
    keys = torch.rand(row_scores.shape, generator=generator, device=row_scores.device)
    keys = keys.index_fill(0, hard, -1.0)  # rand is in [0, 1): taken rows lose every draw
    rest = torch.topk(keys, k - k_hard, sorted=False).indices
    return RowSelection(_ascending(torch.cat([hard, rest])), None)


def _select_random(batch_size, k, generator):
    # Uniform without replacement via the k largest of B uniform keys (static shapes, no sync).
    keys = torch.rand(batch_size, generator=generator, device=generator.device)
    return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


def check_importance_options(mix, temperature):
    """Validate ``importance_mix`` (alpha in [0, 1]) and ``importance_temperature`` (> 0); floats back."""
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"importance_mix must be a number in [0, 1], got {mix!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(float(temperature)) or float(temperature) <= 0.0):
        raise ValueError(f"importance_temperature must be a finite number > 0, got {temperature!r}")
    return float(mix), float(temperature)


def importance_probabilities(row_scores: torch.Tensor, mix: float = 0.9, temperature: float = 1.0) -> torch.Tensor:
    """Sampling distribution of the ``importance`` policy: [B] float32, sums to 1, no host sync.

    ``p_i = (1 - mix) / B + mix * q_i`` with ``q = softmax(row_scores / temperature)`` over the rows with a
    finite score (scored rows); rows without a scored token (``-inf``) get ``q = 0``, and if no row is
    scored ``q`` is uniform (so ``p`` is too).
    """
    B = row_scores.shape[0]
    scores = row_scores.to(torch.float32)
    scored = torch.isfinite(scores)
    logits = torch.where(scored, scores / temperature, torch.full_like(scores, -math.inf))
    q = torch.softmax(logits, 0)  # NaN everywhere when no row is scored: replaced by uniform below
    q = torch.where(scored.any(), q, torch.full_like(q, 1.0 / B))
    return (1.0 - mix) / B + mix * q


def _select_importance(row_scores, k, generator, mix=0.9, temperature=1.0):
    """Importance sampling: k i.i.d. draws WITH replacement from ``importance_probabilities``.

    Draw j picks row ``i_j`` with probability ``p_{i_j}`` and gets weight ``1 / (k p_{i_j})``; the loss is
    normalised by ``n_total`` (``loss_norm='batch'``), so with ``c_i`` the sum of row i's valid token
    losses the step's loss is ``L_hat = (1/k) sum_j c_{i_j} / (p_{i_j} n_total)``. Its expectation (and,
    p being a constant, its gradient's) is ``sum_i p_i c_i / (p_i n_total) = sum_i c_i / n_total``: the
    plain model's token-mean loss on all B rows. A row drawn twice appears twice (repeated gather).
    Rows with ``p_i = 0`` (``mix = 1``, unscored) are never drawn; their loss is then not estimated.
    """
    p = importance_probabilities(row_scores, mix, temperature)
    draws = torch.multinomial(p, k, replacement=True, generator=generator)
    indices = torch.sort(draws).values
    weight = 1.0 / (k * p.index_select(0, indices))
    return RowSelection(indices, weight.to(torch.float32))


def _select_reference_filter(row_reference, k, generator, threshold):
    """The rows the reference model finds in-domain (mean reference NLL <= ``threshold``) first, in random
    order, then random rows of the rest: the reference used as a domain filter, no router pass.

    Keys: uniform in [0, 1) plus 1 for in-domain rows, so the k largest take every in-domain row before any
    other (a random subset of them when there are more than k). NaN means (nothing scored) are not in-domain.
    """
    keys = torch.rand(row_reference.shape, generator=generator, device=row_reference.device)
    keys = keys + (row_reference <= threshold).to(keys.dtype)
    return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


def _select_reference_ranked(row_reference, k, generator, threshold):
    """``reference_filter`` with its in-domain rows ranked: rows with mean reference NLL <= ``threshold``
    first, the lowest first, then random rows of the rest. When more rows pass than are kept, the ones
    left out are those the reference finds least in-domain (the likeliest false positives), not a random
    subset of them.

    Keys: ``1 + (threshold - nll)`` (>= 1) for in-domain rows, uniform in [0, 1) for the others. NaN means
    (nothing scored) are not in-domain.
    """
    keys = torch.rand(row_reference.shape, generator=generator, device=row_reference.device)
    in_domain = row_reference <= threshold
    keys = torch.where(in_domain, 1.0 + (threshold - row_reference.to(keys.dtype)), keys)
    return RowSelection(_ascending(torch.topk(keys, k, sorted=False).indices), None)


def check_reference_threshold(threshold):
    """``reference_threshold``: None or a finite number; a float back."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(float(threshold)):
        raise ValueError(f"reference_threshold must be None or a finite number (a mean NLL in nats), got {threshold!r}")
    return float(threshold)


ROW_POLICIES = {
    "hardest": RowPolicy(_select_hardest, True),
    "stratified": RowPolicy(_select_stratified, True),
    "random": RowPolicy(_select_random, False),
    "importance": RowPolicy(_select_importance, True, "batch"),
    "reference_filter": RowPolicy(_select_reference_filter, False, reference_rows=True, needs_threshold=True),
    "reference_ranked": RowPolicy(_select_reference_ranked, False, reference_rows=True, needs_threshold=True),
}


def register_row_policy(name: str, select, needs_scores: bool = True, overwrite: bool = False,
                        loss_norm: str = "selected", reference_rows: bool = False, needs_threshold: bool = False):
    """Extension point (importance sampling, excess-loss rows, ...): ``select`` as in ``RowPolicy``.

    A policy with ``needs_scores=False`` is called with the batch size ``B`` (an int) instead of scores;
    one with ``reference_rows=True`` (and ``needs_scores=False``) with the rows' mean reference NLL; one
    with ``needs_threshold=True`` also with ``threshold=`` (``CGGRModel``'s ``reference_threshold``, then
    required).
    Returning ``row_weight`` switches the loss to the weighted form (module docstring, "Loss"), normalised
    as ``loss_norm`` says (``RowPolicy``).
    """
    if needs_scores and reference_rows:
        raise ValueError(f"row policy {name!r}: a policy selects either on router scores (needs_scores=True) "
                         "or on reference NLL (reference_rows=True), not both")
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"row policy name must be a non-empty str, got {name!r}")
    if name in ROW_POLICIES and not overwrite:
        raise ValueError(f"row policy {name!r} already exists (pass overwrite=True to replace it)")
    if not callable(select):
        raise TypeError(f"row policy {name!r}: select must be callable, got {type(select).__name__}")
    ROW_POLICIES[name] = RowPolicy(select, bool(needs_scores), loss_norm, bool(reference_rows), bool(needs_threshold))


def default_selection(scoring: str) -> str:
    """The row policy ``selection='auto'`` picks, from the ``cggr bench`` measurements in BENCHMARKS.md.

    With a reference (``scoring='excess_loss'``): the rows with the highest excess loss, which in
    target-domain training closed 89% of the gap between random rows and a domain-label oracle. Without
    one, the router's raw difficulty (hardest, stratified or importance-sampled rows) never beat random
    rows on the data's own mix, from scratch or in fine-tuning: random rows, which also skip the router.
    """
    return "hardest" if scoring == "excess_loss" else "random"


def default_router(scoring: str):
    """``(router_layers, router_token_stride)`` when they are left at None, from ``cggr bench``.

    With a reference (``scoring='excess_loss'``): 1 block scoring every 8th position. In target-domain
    training (BENCHMARKS.md, regime 3, CUDA-graphed loop) it closed 83-84 % of the random-to-oracle gap in
    two runs on two machines; the 4-block router over every position closed 69-71 % in an earlier run of
    the same loop: the excess ranking needs little depth, and every step pays for the router's time.
    Otherwise 4 blocks over every position (the depth the router's raw difficulty was measured at).
    """
    return (1, 8) if scoring == "excess_loss" else (4, 1)


def scored_targets(labels, attention_mask):
    """[B, T-1] bool: which shifted targets (position t predicts ``labels[t + 1]``, as HF shifts them) are
    scored: not ignore_index and, with a mask, both the predicting and the target position real tokens."""
    valid = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = valid & real[:, :-1] & real[:, 1:]
    return valid


def _shifted_targets(labels, attention_mask):
    """[B, T] targets and ``scored_targets``, padded at the last position (ignore_index / not scored)."""
    targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets, nn.functional.pad(scored_targets(labels, attention_mask), (0, 1), value=False)


def reference_row_means(reference_nll, labels, attention_mask):
    """[B] float32 mean of ``reference_nll`` ([B, T-1]) over each row's scored targets; NaN for a row with
    none (so it never passes a threshold). Device-side, no sync."""
    valid = scored_targets(labels, attention_mask)
    ref = torch.where(valid, reference_nll.to(labels.device, torch.float32), 0.0)
    n = valid.sum(1)
    return torch.where(n > 0, ref.sum(1) / n.clamp_min(1).to(torch.float32), math.nan)


def rows_for_ratio(ratio: float, batch_size: int) -> int:
    """ceil(ratio * B), at least 1, at most B. The 1e-9 slack absorbs float error (0.3 * 10 = 3.0000000000000004)."""
    return min(batch_size, max(1, math.ceil(ratio * batch_size - 1e-9)))


class CGGRModel(nn.Module):
    """Batch-split selective training of a Hugging Face causal LM (see the module docstring).

    Args:
        model: a causal LM (``create_truncated_router`` families unless ``router`` is given or
            ``selection='random'``, which needs no router).
        router: a ``TruncatedRouter`` over ``model``; default ``create_truncated_router(model, router_layers)``.
        min_tokens_ratio: the final fraction of rows kept (the curriculum's floor), in (0, 1].
        warmup_steps, schedule: curriculum from 1.0 down to ``min_tokens_ratio`` (``cggr.schedule``).
        scoring: token difficulty strategy (``cggr.scoring``): entropy|margin|loss|combined|excess_loss
            (``excess_loss`` needs ``reference_nll=[B, T-1]`` in the call, one value per shifted target).
        selection: ``'auto'`` (default, ``default_selection``: ``'hardest'`` with ``scoring='excess_loss'``,
            else ``'random'``) or a row policy name (``ROW_POLICIES``): hardest|stratified|random|importance|
            reference_filter|reference_ranked, or a registered one. ``importance``: k rows drawn with
            replacement from
            ``p = (1 - importance_mix) / B + importance_mix * softmax(row_score / importance_temperature)``
            and weighted ``1 / (k p)`` over the whole batch's token count: an unbiased estimate of the
            full batch's loss and gradient (``_select_importance``).
        importance_mix, importance_temperature: alpha in [0, 1] (0 = uniform rows) and the softmax
            temperature (> 0) of ``importance``; validated whatever the policy.
        dynamic_threshold, threshold_sensitivity: see "Row count" in the module docstring.
        router_layers: router depth when ``router`` is None (None: ``default_router(scoring)``, 1 with
            ``scoring='excess_loss'``, else 4).
        router_token_stride: score every ``router_token_stride``-th position only (positions ``s-1, 2s-1,
            ...``): the trunk still runs over the whole sequence (the attention context), but the LM head
            and the token statistics, the larger part of the router's cost, run on ``1/s`` of the tokens.
            A row's difficulty is then the mean over its scored positions among those (1 = every token;
            None: ``default_router(scoring)``, 8 with ``scoring='excess_loss'``, else 1).
        router_max_positions: score only the first P positions of each row (None: all). The router's
            trunk then runs on those P positions alone, which for these causal models gives exactly the
            states of a full-length run there, at about P/T of the cost; a row's difficulty is the mean
            over its scored positions among them (combined with ``router_token_stride``: every s-th of them).
        reference_threshold: with ``selection='reference_filter'`` or ``'reference_ranked'`` (and only
            then; required): rows whose mean ``reference_nll`` over their scored targets is at most this
            many nats are the reference's domain and are taken first, in random order
            (``reference_filter``) or lowest mean first (``reference_ranked``); random rows of the rest
            fill up to k. No router pass:
            the reference is the whole signal (``cggr.reference.domain_threshold`` picks the value from
            the reference's NLL on clean in-domain rows it did not train on).
        router_chunk_size: rows per chunk of the router's LM-head scoring (None: chunks of about
            ``ROUTER_CHUNK_BYTES`` of logits; the router holds no activations for backward, so larger
            chunks than the training path's cost little memory and save per-chunk launch overhead).
        seed: seeds the generator of the random row policies (``random``, ``stratified``, ``importance``).
        compile: False, True (= 'all'), 'router' (the router trunk), 'model' (the full model forward) or
            'all'; ``compile_options`` go to ``torch.compile``. The row count is fixed per ratio, so the
            shapes are static once the curriculum reaches its floor.
        loss_impl: 'model' (default: the model's own ``labels=`` loss, exactly HF's) or 'fused' (base model +
            ``cggr.linear.fused_linear_selective_ce``: the LM head and CE without [k, T, V] logits; the
            router families only).
        token_ratio: with loss_impl='fused', train only the hardest ``ceil(token_ratio * n)`` valid tokens of
            the selected rows (``scoring`` on the full model's statistics, ``cggr.ops.select_topk``).
        loss_chunk_size: ``chunk_size`` of the fused path (None: cggr.linear's default).
        forward_impl: how the selected rows' forward runs. 'model' (default): the model's own forward.
            'trunk': the same modules in the same order through ``cggr.router.ModelTrunk`` (LM head and
            ``model.loss_function`` applied here), whose mask is built without ``position_ids``, so that a
            step with ``attention_mask=None`` issues no host synchronisation (the model's forward issues
            one, see the module docstring). Router families only; extra inputs limited to
            ``position_ids``, ``token_type_ids`` and ``num_items_in_batch``.
        collect_timing: measure ``router_time_share`` (router + selection time over the time from the
            start of ``forward`` to ``step()``); costs one synchronisation in ``step()``.
    """

    def __init__(self, model: nn.Module, router: Optional[TruncatedRouter] = None, min_tokens_ratio: float = 0.25,
                 warmup_steps: int = 1000, scoring: str = "loss", selection: str = "auto",
                 dynamic_threshold: bool = False, threshold_sensitivity: float = 0.5,
                 router_layers: Optional[int] = None,
                 schedule: str = "linear", combined_weights: Optional[Mapping[str, float]] = None,
                 router_chunk_size: Optional[int] = None, seed: int = 0,
                 compile: Union[bool, str] = False, compile_options: Optional[dict] = None,
                 collect_timing: bool = False, loss_impl: str = "model", token_ratio: float = 1.0,
                 loss_chunk_size: Optional[int] = None, importance_mix: float = 0.9,
                 importance_temperature: float = 1.0, router_token_stride: Optional[int] = None,
                 reference_threshold: Optional[float] = None, router_max_positions: Optional[int] = None,
                 forward_impl: str = "model"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_ratio("min_tokens_ratio", min_tokens_ratio)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.scoring = check_strategy(scoring)
        self.combined_weights = check_combined_weights(combined_weights)
        if selection == "auto":
            selection = default_selection(self.scoring)
        if selection not in ROW_POLICIES:
            raise ValueError(f"selection must be 'auto' or one of {tuple(ROW_POLICIES)}, got {selection!r}")
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        if loss_impl == "fused" and type(model).__name__ not in SUPPORTED_ARCHITECTURES:
            # The fused path applies get_output_embeddings() to base_model's output itself: only for the
            # families whose forward does exactly that (no logit scaling or soft-capping in between).
            raise TypeError(f"loss_impl='fused': unsupported architecture {type(model).__name__}; looked for "
                            f"one of {', '.join(SUPPORTED_ARCHITECTURES)}")
        if forward_impl not in FORWARD_IMPLS:
            raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {forward_impl!r}")
        if forward_impl == "trunk" and type(model).__name__ not in SUPPORTED_ARCHITECTURES:
            raise TypeError(f"forward_impl='trunk': unsupported architecture {type(model).__name__}; looked for "
                            f"one of {', '.join(SUPPORTED_ARCHITECTURES)}")
        check_ratio("token_ratio", token_ratio)
        if token_ratio < 1.0 and loss_impl != "fused":
            raise ValueError("token_ratio < 1 trains only the hardest tokens of the selected rows through "
                             "cggr.linear: it needs loss_impl='fused'")
        self.importance_mix, self.importance_temperature = check_importance_options(importance_mix,
                                                                                    importance_temperature)
        if selection == "importance" and token_ratio < 1.0:
            raise ValueError("selection='importance' estimates the full batch's loss; token_ratio < 1 would "
                             "drop tokens and bias it: use token_ratio=1.0")
        if compile is True:
            compile = "all"
        if compile is not False and compile not in COMPILE_SCOPES:
            raise ValueError(f"compile must be False, True or one of {COMPILE_SCOPES}, got {compile!r}")
        self.model = model
        self.schedule = RatioSchedule(min_tokens_ratio, warmup_steps, schedule, dynamic_threshold,
                                      threshold_sensitivity)
        self.selection = selection
        self.policy = ROW_POLICIES[selection]
        select = self.policy.select
        if select is _select_importance:
            select = functools.partial(select, mix=self.importance_mix, temperature=self.importance_temperature)
        self.reference_threshold = check_reference_threshold(reference_threshold)
        if self.policy.needs_threshold != (self.reference_threshold is not None):
            raise ValueError("reference_threshold is needed by selection='reference_filter' or "
                             "'reference_ranked' and only by them "
                             f"(selection={selection!r}, reference_threshold={reference_threshold!r}); "
                             "cggr.reference.domain_threshold computes one from the reference's NLL on held-out "
                             "in-domain rows")
        if self.policy.needs_threshold:
            select = functools.partial(select, threshold=self.reference_threshold)
        self._select = select
        self.router_chunk_size = router_chunk_size
        auto_layers, auto_stride = default_router(self.scoring)
        router_layers = auto_layers if router_layers is None else router_layers
        router_token_stride = auto_stride if router_token_stride is None else router_token_stride
        self.router_token_stride = check_optional_positive_int("router_token_stride", router_token_stride)
        self.router_max_positions = check_optional_positive_int("router_max_positions", router_max_positions)
        self.seed = int(seed)
        self.collect_timing = bool(collect_timing)
        self.compile_scope = compile
        self.loss_impl = loss_impl
        self.forward_impl = forward_impl
        self.token_ratio = float(token_ratio)
        self.loss_chunk_size = loss_chunk_size

        if router is None and (self.policy.needs_scores or dynamic_threshold):  # the threshold needs its confidence
            router = create_truncated_router(model, num_layers=router_layers)
        if router is not None:
            if not isinstance(router, TruncatedRouter):
                raise TypeError(f"router must be a cggr TruncatedRouter (create_truncated_router), "
                                f"got {type(router).__name__}")
            if router.model is not model:
                raise ValueError("router must be built on the same model instance it routes for "
                                 "(create_truncated_router(model, ...)): it shares that model's tensors")
        # Held outside nn.Module's registry: the router owns no tensors, and a registered submodule would
        # only add a second path to the model's modules in repr/apply.
        self.__dict__["router"] = router

        options = dict(compile_options or {})
        trunk = router.trunk if router is not None else None
        # 'fused' runs the base model (hidden states) and cggr.linear's LM head + CE; 'model' the whole model.
        # forward_impl='trunk': the model's hidden states come from ModelTrunk instead (head and loss here).
        # Plain attribute: ModelTrunk holds the model through its adapter, like the router.
        self.__dict__["_model_trunk"] = ModelTrunk(model) if forward_impl == "trunk" else None
        if forward_impl == "trunk":
            forward_model = self._model_trunk.__call__  # a bound method: what torch.compile takes
        else:
            forward_model = model.base_model if loss_impl == "fused" else model
        if compile in ("router", "all") and trunk is not None:
            trunk = torch.compile(trunk, **options)
        if compile in ("model", "all"):
            forward_model = torch.compile(forward_model, **options)
        # Plain attributes again: the compiled wrapper (an nn.Module) must not register the model twice.
        self.__dict__["_trunk_fn"] = trunk
        self.__dict__["_forward_model"] = forward_model

        self._step = 0
        self._loading_prefix = ""
        self._loading_found_step = False
        self.register_load_state_dict_pre_hook(self._load_pre_hook)
        self.register_load_state_dict_post_hook(self._load_post_hook)
        self._generators = {}
        self._last = None
        self._router_row_nll = None
        self._timing = None
        self._pending_timing = None

    # -- curriculum state ----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self._step

    @property
    def current_ratio(self) -> float:
        return self.schedule.curriculum_ratio(self._step)

    def step(self):
        """Advance the curriculum; call once per optimizer step (after ``optimizer.step()``)."""
        if self._pending_timing is not None:
            self._finish_timing()
        self._step += 1

    def _set_step(self, step):
        if isinstance(step, torch.Tensor):
            step = int(step.item()) if step.numel() == 1 and not step.is_floating_point() else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict: {STEP_KEY} must be an int >= 0, got {step!r}")
        self._step = step

    # state_dict layout: the plain model's keys (no "model." prefix) plus ``cggr_step``, at any nesting
    # depth. Saving overrides ``state_dict`` (which nn.Module also calls for children). Loading goes through
    # hooks, because a parent's ``load_state_dict`` never calls ours: the pre-hook takes ``cggr_step`` out and
    # maps the model's keys onto the ``model.`` submodule; the post-hook reports keys in the saved layout.
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The plain model's state_dict (same keys) plus ``cggr_step`` (0-dim int64)."""
        state = self.model.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            # Module versions are looked up by module path on load: also file them under "model.".
            root = prefix[:-1]
            for key in [k for k in metadata if k == root or k.startswith(prefix)]:
                rest = key[len(prefix):] if key != root else ""
                metadata[prefix + "model" + ("." + rest if rest else "")] = metadata[key]
        state[prefix + STEP_KEY] = torch.tensor(self._step, dtype=torch.int64)
        return state

    def _load_pre_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
        step = state_dict.pop(prefix + STEP_KEY, None)
        self._loading_found_step = step is not None
        if step is not None:
            self._set_step(step)
        # Every other key under the prefix is the model's (a Llama's own keys start with "model." too:
        # the rename is unconditional, and the post-hook strips exactly one "model.").
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
        self._loading_prefix = prefix

    def _load_post_hook(self, module, incompatible_keys):
        prefix = self._loading_prefix
        model_prefix = prefix + "model."
        for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
            keys[:] = [prefix + k[len(model_prefix):] if k.startswith(model_prefix) else k for k in keys]
        if not self._loading_found_step:
            # A plain model's state_dict has no step: strict loading reports it, strict=False keeps the step.
            incompatible_keys.missing_keys.append(prefix + STEP_KEY)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """Loss on the selected rows; without ``labels``, the plain model's output on the whole batch."""
        if labels is None:
            return self.model(input_ids, attention_mask=attention_mask, **kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, T] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} to match input_ids, "
                             f"got {tuple(labels.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected a 2-D mask of shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        reference_nll = kwargs.pop("reference_nll", None)
        wants_reference = self.scoring == "excess_loss" or self.policy.reference_rows
        if (reference_nll is None) == wants_reference:
            raise ValueError("reference_nll is needed by scoring='excess_loss' or a reference row policy "
                             "(selection='reference_filter', 'reference_ranked') and only by them "
                             f"(scoring={self.scoring!r}, selection={self.selection!r}, reference_nll given: "
                             f"{reference_nll is not None})")
        B, T = input_ids.shape
        if reference_nll is not None and (not isinstance(reference_nll, torch.Tensor)
                                          or tuple(reference_nll.shape) != (B, T - 1)):
            raise ValueError(f"reference_nll: expected a tensor of shape {(B, T - 1)} (one value per shifted "
                             f"target), got {tuple(reference_nll.shape) if isinstance(reference_nll, torch.Tensor) else type(reference_nll).__name__}")

        self._router_row_nll = None
        timing = self._start_timing(input_ids.device) if self.collect_timing else None
        ratio = self.current_ratio
        k = rows_for_ratio(ratio, B)
        confidence = None
        selection = None
        if k < B or self.schedule.dynamic_threshold:
            row_scores = None
            if self.policy.needs_scores or self.schedule.dynamic_threshold:
                row_scores, confidence = self._score_rows(input_ids, labels, attention_mask, kwargs, reference_nll)
            if self.schedule.dynamic_threshold:
                # Opt-in host decision (module docstring): one synchronisation per step.
                ratio = float(self.schedule.ratio(self._step, confidence).item())
                k = rows_for_ratio(ratio, B)
            if k < B:
                generator = self._generator(input_ids.device)
                if self.policy.reference_rows:
                    policy_input = reference_row_means(reference_nll, labels, attention_mask)
                else:
                    policy_input = row_scores if self.policy.needs_scores else B
                selection = self._select(policy_input, k, generator)
        if timing is not None:
            self._mark_router_end(timing)

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
        if self.loss_impl == "fused":
            rows_ref = None
            if reference_nll is not None:
                rows_ref = reference_nll if selection is None else reference_nll.index_select(
                    0, selection.indices.to(reference_nll.device))
            loss, rows_selected_tokens = self._fused_loss(rows_ids, rows_labels, rows_mask, rows_kwargs,
                                                          row_weight, rows_ref)
            if n_norm is not None:
                # fused 'mean' divides by the selected valid tokens: rescale to the batch's count
                loss = loss * (rows_selected_tokens.clamp_min(1).to(loss.dtype)
                               / n_norm.clamp_min(1).to(loss.dtype))
        elif row_weight is not None:
            logits = self._rows_logits(rows_ids, rows_mask, rows_kwargs)
            loss = self._weighted_loss(logits, rows_labels, row_weight, n_norm)
        else:
            loss = self._rows_model_loss(rows_ids, rows_labels, rows_mask, rows_kwargs)

        self._last = {
            "ratio": ratio,
            "sequences_selected": k,
            "sequences_total": B,
            "tokens_total": per_row.sum(),
            "tokens_selected": (rows_selected_tokens if rows_selected_tokens is not None
                                else per_row.sum() if selection is None
                                else per_row.index_select(0, selection.indices).sum()),
            "confidence": confidence,
            "rows": selection.indices if selection is not None else None,  # for tests / inspection
        }
        if timing is not None:
            self._pending_timing = timing
        return loss

    def _score_rows(self, input_ids, labels, attention_mask, kwargs, reference_nll):
        """[B] row difficulty (float32, -inf for rows without a scored token) and the batch confidence."""
        router = self.router
        if router is None:
            raise ValueError(f"selection={self.selection!r} with dynamic_threshold=True needs a router "
                             "(the batch confidence comes from it)")
        B, T = input_ids.shape
        # Causal attention: the hidden state at position t depends on tokens <= t only, so running the trunk on
        # the first P positions gives exactly the full run's states there (a cost in proportion to P).
        P = T if self.router_max_positions is None else min(T, self.router_max_positions)

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
            targets, valid = (t[:, :P] for t in _shifted_targets(labels, attention_mask))  # position P-1 keeps its target
            targets = torch.where(valid, targets, torch.full_like(targets, IGNORE_INDEX))
            ref = None
            if reference_nll is not None:  # shape checked in forward
                ref = nn.functional.pad(reference_nll.to(torch.float32), (0, 1))[:, :P]
            stride = self.router_token_stride
            if stride > 1:  # the scored positions only: s-1, 2s-1, ... (hidden is copied, 1/s of it)
                hidden, targets, valid = (t[:, stride - 1::stride] for t in (hidden, targets, valid))
                ref = ref[:, stride - 1::stride] if ref is not None else None
            n_pos = hidden.shape[1]
            stats = token_stats_from_hidden(hidden.reshape(B * n_pos, hidden.shape[-1]), weight,
                                            targets.reshape(B * n_pos), bias=bias, ignore_index=IGNORE_INDEX,
                                            chunk_size=self.router_chunk_size or _router_chunk_rows(
                                                B * n_pos, weight.shape[0], hidden.element_size()),
                                            # targets are sanitised above; validation would sync
                                            validate_targets=False)
            stats = type(stats)(*(s.view(B, n_pos) for s in stats))
            scores = score(stats, self.scoring, valid, self.combined_weights, ref)
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
                scores = score(stats, self.scoring, valid, self.combined_weights, ref)
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

    @staticmethod
    def _weighted_loss(logits, labels, row_weight, n_norm=None):
        # Float32 like HF's ForCausalLMLoss, so that all-ones weights reproduce the model's loss.
        # n_norm: the normaliser (loss_norm='batch'); None = the valid targets of these rows.
        logits = logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        n_valid = (targets != IGNORE_INDEX).sum() if n_norm is None else n_norm
        return (nll * row_weight.to(nll.dtype)[:, None]).sum() / n_valid.clamp_min(1).to(nll.dtype)

    def _generator(self, device):
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    @property
    def selected_rows(self) -> Optional[torch.Tensor]:
        """[k] int64 (device) batch positions the last forward with labels trained on, as the row policy
        returned them (the built-in ones: ascending; repeats possible with ``selection='importance'``), or
        None when it kept every row."""
        return None if self._last is None else self._last["rows"]

    @property
    def router_row_nll(self) -> Optional[torch.Tensor]:
        """[B] float32 (device) mean NLL of each row's scored tokens under the router in the last forward
        with labels (NaN for a row with nothing scored), or None when that forward ran no router pass
        (ratio 1, or a policy without scores). For ``cggr.reference.RunningBaseline.update``."""
        return self._router_row_nll

    # -- timing and metrics --------------------------------------------------------------------------
    def _start_timing(self, device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return {"cuda": True, "start": start}
        return {"cuda": False, "start": time.perf_counter()}

    def _mark_router_end(self, timing):
        if timing["cuda"]:
            timing["router_end"] = torch.cuda.Event(enable_timing=True)
            timing["router_end"].record()
        else:
            timing["router_end"] = time.perf_counter()

    def _finish_timing(self):
        timing, self._pending_timing = self._pending_timing, None
        if timing["cuda"]:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            router_ms = timing["start"].elapsed_time(timing["router_end"])
            step_ms = timing["start"].elapsed_time(end)
        else:
            end = time.perf_counter()
            router_ms = (timing["router_end"] - timing["start"]) * 1e3
            step_ms = (end - timing["start"]) * 1e3
        self._timing = {"router_ms": router_ms, "step_ms": step_ms,
                        "router_time_share": router_ms / step_ms if step_ms > 0 else 0.0}

    def get_metrics(self) -> dict:
        """Numbers of the last ``forward`` with labels (host values: reading them synchronises)."""
        metrics = {"step": self._step, "curriculum_ratio": self.current_ratio}
        last = self._last
        if last is None:
            return metrics
        tokens_total = int(last["tokens_total"].item())
        tokens_selected = int(last["tokens_selected"].item())
        metrics.update(
            row_ratio=last["ratio"],
            sequences_selected=last["sequences_selected"],
            sequences_total=last["sequences_total"],
            tokens_selected=tokens_selected,
            tokens_total=tokens_total,
            token_ratio=tokens_selected / tokens_total if tokens_total > 0 else 0.0,
        )
        if last["confidence"] is not None:
            metrics["avg_confidence"] = float(last["confidence"].item())
        if self._timing is not None:
            metrics.update(self._timing)
        return metrics
