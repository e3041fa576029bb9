"""``CGGRConfig``: the one settings object of ``cggr.hf``'s trainers.

Everything is checked when the config is built (and what needs the model, when the trainer is built), so
that bad input fails before any step.
"""
import dataclasses
from typing import Optional, Union

from torch import nn

from ..options import StepOptions
from ..policies import POLICY_AUTO, ExcessLossRows, RandomRows, RowPolicy, resolve_policy
from ..pruning import ConfidenceGate
from ..reference import ReferenceModel
from ..schedule import SCHEDULES, RatioSchedule, check_ratio

# What the Trainer path runs of StepOptions: the router (compile='router') and timing. The trained forward is
# the Trainer's own (TrainingArguments(torch_compile=True) compiles it), the loss the model's own.
_TRAINER_STEP_OPTIONS = "StepOptions(compile=False | 'router' | 'blocks' | 'blocks-cudagraphs', collect_timing=...)"


@dataclasses.dataclass(frozen=True)
class CGGRConfig:
    """Settings of ``CGGRTrainer`` / ``CGGRSFTTrainer``.

    Args:
        policy: ``'auto'``, a ``cggr.RowPolicy``, or a ``cggr.ConfidenceGate`` (prunes well-fit examples
            from each epoch before the forward, and trains every row of the batches it keeps: the ratio
            settings do not apply; cggr/hf/gate.py). ``'auto'``: ``ExcessLossRows()`` when a ``reference`` is
            given (the measured default with a reference), else ``RandomRows()``.
        min_tokens_ratio: the fraction of rows kept once the curriculum reaches its floor, in (0, 1].
        warmup_steps: optimizer steps from ratio 1.0 down to ``min_tokens_ratio``.
        schedule: ``'linear'`` | ``'cosine'`` | ``'constant'``, or a whole ``cggr.RatioSchedule`` (then leave
            ``min_tokens_ratio`` / ``warmup_steps`` at their defaults).
        step_options: ``cggr.StepOptions``; the Trainer path honours ``compile=False | 'router' | 'blocks' |
            'blocks-cudagraphs'`` and ``collect_timing`` (the trained rows go through the Trainer's own forward
            and loss, which runs the blocks compiled in place; ``'blocks-cudagraphs'`` needs a CUDA device and
            marks a CUDA-graph step before every training and evaluation forward).
        seed: seeds the random policies (``RandomRows``, the random part of ``ReferenceFilter``).
        reference: where the per-token reference NLL comes from, for the policies that need it
            (``ExcessLossRows``, ``ReferenceFilter``, ``ReferenceRanked``):

            - a ``cggr.ReferenceModel``, or a causal LM (wrapped in one): scored on the fly, once per
              micro-batch under ``no_grad``, before the micro-batch's forward (costs one forward of the
              reference per micro-batch);
            - a ``str``: the name of a dataset column holding it precomputed, per example either a list of
              ``len(input_ids) - 1`` floats (one per shifted target, as ``ReferenceModel`` returns them) or
              one float (the row's mean reference NLL, broadcast to every target).
        log_metrics: add a ``CGGRCallback`` that logs the kept ratio, the router's share of step time and
            the selected rows' mean score through the Trainer's log.
    """
    policy: Union[str, RowPolicy, ConfidenceGate] = POLICY_AUTO
    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    schedule: Union[str, RatioSchedule] = "linear"
    step_options: Optional[StepOptions] = None
    seed: int = 0
    reference: Union[None, str, ReferenceModel, nn.Module] = None
    log_metrics: bool = True

    def __post_init__(self):
        check_ratio("CGGRConfig.min_tokens_ratio", self.min_tokens_ratio)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"CGGRConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if isinstance(self.schedule, RatioSchedule):
            if (self.min_tokens_ratio, self.warmup_steps) != (0.25, 1000):
                raise ValueError("CGGRConfig: pass the ratio and warm-up either as min_tokens_ratio= / "
                                 "warmup_steps= or inside schedule=RatioSchedule(...), not both")
        elif self.schedule not in SCHEDULES:
            raise ValueError(f"CGGRConfig.schedule must be one of {SCHEDULES} or a cggr.RatioSchedule, "
                             f"got {self.schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"CGGRConfig.seed must be an int, got {self.seed!r}")
        if not isinstance(self.log_metrics, bool):
            raise ValueError(f"CGGRConfig.log_metrics must be a bool, got {self.log_metrics!r}")
        self._check_step_options()
        self._check_reference()
        if self.gate is not None and self.reference is not None:
            raise ValueError("CGGRConfig: ConfidenceGate scores examples by the model's own training loss and uses "
                             "no reference; drop reference=")
        policy = self.resolved_policy()
        if policy.loss_norm != "selected":
            raise ValueError(f"CGGRConfig: {policy!r} weights the selected rows' loss (loss_norm="
                             f"{policy.loss_norm!r}), which the Trainer path (the model's own loss on the selected "
                             "rows) does not do: train it with CGGRModel in a training loop")
        if policy.needs_reference_nll and self.reference is None:
            raise ValueError(f"CGGRConfig: {policy!r} ranks rows by a reference model's NLL, and no reference was "
                             "given: pass reference=cggr.ReferenceModel(small_lm) (scored on the fly) or "
                             "reference='<column>' (a dataset column of precomputed per-token NLL)")
        if self.reference is not None and not policy.needs_reference_nll:
            raise ValueError(f"CGGRConfig: a reference was given, but {policy!r} does not use it; pass "
                             "policy=cggr.ExcessLossRows() (the measured default with a reference; policy='auto' "
                             "picks it), cggr.ReferenceFilter(threshold) or cggr.ReferenceRanked(threshold), or "
                             "drop reference=")

    def _check_step_options(self):
        options = self.step_options
        if options is None:
            return
        if not isinstance(options, StepOptions):
            raise TypeError(f"CGGRConfig.step_options must be a cggr.StepOptions, got {type(options).__name__}")
        unsupported = []
        if options.compile_scope not in (False, "router", "blocks", "blocks-cudagraphs"):
            unsupported.append(f"compile={options.compile!r} (compile='blocks-cudagraphs' compiles every decoder "
                               "block in place, which the Trainer's forward then runs; compile='router' compiles "
                               "the router)")
        if options.loss_impl != "model":
            unsupported.append(f"loss_impl={options.loss_impl!r}")
        if options.forward_impl != "model":
            unsupported.append(f"forward_impl={options.forward_impl!r}")
        if options.token_ratio != 1.0:
            unsupported.append(f"token_ratio={options.token_ratio!r}")
        if unsupported:
            raise ValueError(f"CGGRConfig.step_options: the Trainer path runs the selected rows through the "
                             f"Trainer's own forward and loss, so only {_TRAINER_STEP_OPTIONS} apply; got "
                             f"{'; '.join(unsupported)}")

    def _check_reference(self):
        ref = self.reference
        if ref is None or isinstance(ref, ReferenceModel):
            return
        if isinstance(ref, str):
            if not ref or ref in ("input_ids", "labels", "attention_mask", "position_ids"):
                raise ValueError(f"CGGRConfig.reference: {ref!r} is not a usable column name for the reference NLL")
            return
        if not isinstance(ref, nn.Module):
            raise TypeError(f"CGGRConfig.reference must be None, a cggr.ReferenceModel, a causal LM (nn.Module) or "
                            f"a dataset column name (str), got {type(ref).__name__}")

    @property
    def gate(self):
        """The ``ConfidenceGate`` when the policy is one, else None."""
        return self.policy if isinstance(self.policy, ConfidenceGate) else None

    def resolved_policy(self) -> RowPolicy:
        """The policy object the trainer uses (``'auto'`` resolved as documented above; with a
        ``ConfidenceGate``, ``RandomRows()`` at ratio 1: every row of a kept batch trains)."""
        if self.gate is not None:
            return RandomRows()
        if isinstance(self.policy, str) and self.policy == POLICY_AUTO and self.reference is not None:
            return ExcessLossRows()
        return resolve_policy(self.policy, router_given=False)

    @property
    def reference_column(self) -> Optional[str]:
        return self.reference if isinstance(self.reference, str) else None

    def reference_model(self) -> Optional[ReferenceModel]:
        """The on-the-fly reference (a ``ReferenceModel``), or None."""
        ref = self.reference
        if ref is None or isinstance(ref, str):
            return None
        return ref if isinstance(ref, ReferenceModel) else ReferenceModel(ref)

    def cggr_model_kwargs(self) -> dict:
        """Keyword arguments of ``CGGRModel`` (besides the model)."""
        kwargs = dict(policy=self.resolved_policy(), schedule=self.schedule,
                      step_options=self.step_options, seed=self.seed)
        if self.gate is not None:
            return dict(kwargs, schedule="constant", min_tokens_ratio=1.0, warmup_steps=0)
        if not isinstance(self.schedule, RatioSchedule):
            kwargs.update(min_tokens_ratio=self.min_tokens_ratio, warmup_steps=self.warmup_steps)
        return kwargs
