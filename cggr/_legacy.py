"""The keyword arguments ``CGGRModel`` took before the policy objects (0.5 API), mapped onto the new ones.

Each old spelling keeps working for one release with a ``FutureWarning`` that names the equivalent new
call, or raises an error that names it (policies moved to ``cggr.experimental``).
"""
import warnings

from .options import StepOptions
from .policies import (POLICY_AUTO, ExcessLossRows, HardestRows, RandomRows, ReferenceFilter, ReferenceRanked,
                       RouterSettings, resolve_policy)
from .schedule import RatioSchedule

POLICY_KEYS = ("scoring", "selection", "router_layers", "router_token_stride", "router_max_positions",
               "router_chunk_size", "combined_weights", "reference_threshold", "importance_mix",
               "importance_temperature")
SCHEDULE_KEYS = ("dynamic_threshold", "threshold_sensitivity")
STEP_KEYS = ("compile", "compile_options", "collect_timing", "loss_impl", "token_ratio", "loss_chunk_size",
             "forward_impl")
LEGACY_KEYS = POLICY_KEYS + SCHEDULE_KEYS + STEP_KEYS

class MovedError(ImportError):
    """A 0.5 name that moved (to ``cggr.experimental``). An ImportError, not an AttributeError, so that
    ``from cggr.reference import RunningBaseline`` shows where it went instead of "cannot import name"."""


_MOVED_POLICIES = {"stratified": "cggr.experimental.HalfHardestRows(scoring=...)",
                   "importance": "cggr.experimental.ImportanceRows(mix=..., temperature=...)"}


def _router_settings(old, default):
    def given(key, fallback):
        return fallback if old.get(key) is None else old[key]

    return RouterSettings(layers=given("router_layers", default.layers),
                          token_stride=given("router_token_stride", default.token_stride),
                          max_positions=old.get("router_max_positions"), chunk_size=old.get("router_chunk_size"))


def _policy(old, router_given):
    selection = old.get("selection", POLICY_AUTO)
    scoring = old.get("scoring", "loss")
    if selection in _MOVED_POLICIES:
        raise ValueError(f"CGGRModel(selection={selection!r}) lost in every measured regime and moved: pass "
                         f"policy={_MOVED_POLICIES[selection]} (BENCHMARKS.md has its numbers)")
    if selection in ("reference_filter", "reference_ranked"):
        if old.get("reference_threshold") is None:
            raise ValueError(f"selection={selection!r} needs reference_threshold; the new spelling is "
                             f"policy=cggr.{'ReferenceFilter' if selection == 'reference_filter' else 'ReferenceRanked'}"
                             "(threshold=...)")
        cls = ReferenceFilter if selection == "reference_filter" else ReferenceRanked
        return cls(old["reference_threshold"])
    if old.get("reference_threshold") is not None:
        raise ValueError(f"reference_threshold is used only by the reference filter policies; the new spelling "
                         f"is policy=cggr.ReferenceFilter(threshold=...) or cggr.ReferenceRanked(threshold=...) "
                         f"(got selection={selection!r})")
    if selection == "random" or (selection == POLICY_AUTO and scoring != "excess_loss" and not router_given):
        return RandomRows()
    if selection not in (POLICY_AUTO, "hardest"):
        raise ValueError(f"selection must be 'auto', 'hardest', 'random', 'reference_filter' or "
                         f"'reference_ranked' (now: policy=cggr.<Policy>(...)), got {selection!r}")
    if scoring == "excess_loss":
        return ExcessLossRows(_router_settings(old, ExcessLossRows().router))
    return HardestRows(scoring, _router_settings(old, RouterSettings()), old.get("combined_weights"))


def translate(old: dict, policy, router_given: bool, min_tokens_ratio, warmup_steps, schedule):
    """(policy, schedule, step_options) from the old keyword arguments ``old`` (names in ``LEGACY_KEYS``);
    warns once per call with the new spelling."""
    unknown = sorted(set(old) - set(LEGACY_KEYS))
    if unknown:
        raise TypeError(f"CGGRModel got unexpected keyword argument(s) {', '.join(unknown)}")
    new = []
    if any(key in old for key in POLICY_KEYS):
        if policy != POLICY_AUTO:
            raise ValueError(f"pass either policy= or the old {', '.join(k for k in POLICY_KEYS if k in old)}, "
                             "not both")
        policy = _policy(old, router_given)
        new.append(f"policy={policy!r}")
    if any(key in old for key in SCHEDULE_KEYS):
        if not isinstance(schedule, str):
            raise ValueError("pass either schedule=RatioSchedule(...) or the old dynamic_threshold / "
                             "threshold_sensitivity, not both")
        schedule = RatioSchedule(min_tokens_ratio, warmup_steps, schedule,
                                 dynamic_threshold=old.get("dynamic_threshold", False),
                                 threshold_sensitivity=old.get("threshold_sensitivity", 0.5))
        new.append(f"schedule=RatioSchedule(min_tokens_ratio={min_tokens_ratio!r}, warmup_steps={warmup_steps!r}, "
                   f"schedule={schedule.schedule!r}, dynamic_threshold={schedule.dynamic_threshold!r}, "
                   f"threshold_sensitivity={schedule.threshold_sensitivity!r})")
    resolved = resolve_policy(policy, router_given)
    if isinstance(schedule, RatioSchedule) and schedule.dynamic_threshold and not resolved.uses_router:
        raise ValueError(f"dynamic_threshold=True adjusts the ratio by the router's batch confidence, and "
                         f"{resolved!r} runs no router (0.5 built one for it alone). New spelling: "
                         "policy=cggr.HardestRows(...), schedule=RatioSchedule(..., dynamic_threshold=True), or "
                         "leave the dynamic threshold off")
    scoring = old.get("scoring", "loss")
    if not resolved.uses_router and scoring != "loss" and (old.get("token_ratio", 1.0) < 1.0
                                                            or scoring == "excess_loss"):
        # 0.5 used scoring= (and reference_nll) for the token choice of token_ratio < 1 even for random or
        # reference-filtered rows; 0.6's policies without a router score those tokens by 'loss' alone
        raise ValueError(f"CGGRModel(selection={old.get('selection', POLICY_AUTO)!r}, scoring={scoring!r}"
                         f"{', token_ratio=...' if old.get('token_ratio', 1.0) < 1.0 else ''}): in cggr 0.6 "
                         f"{resolved!r} takes no token scoring and no reference for the token choice; "
                         "not supported any more: use policy=cggr.HardestRows(scoring=...) or "
                         "cggr.ExcessLossRows() (router-ranked rows), or leave scoring at 'loss'")
    unused = [key for key in ("scoring", "router_layers", "router_token_stride", "router_max_positions",
                              "router_chunk_size", "combined_weights") if key in old and not resolved.uses_router]
    note = ""
    if unused:
        note = (f". Not used: {', '.join(unused)}: {resolved!r} picks rows without a router, as 0.5 did; pass "
                "policy=cggr.HardestRows(...) to rank rows by the router")
    step_options = None
    if any(key in old for key in STEP_KEYS):
        step_options = StepOptions(**{key: old[key] for key in STEP_KEYS if key in old})
        new.append(f"step_options={step_options!r}")
    warnings.warn(f"CGGRModel({', '.join(k + '=...' for k in sorted(old))}) is deprecated and will be removed in cggr 0.7; "
                  f"the same model is CGGRModel(model, {', '.join(new)}){note}", FutureWarning, stacklevel=3)
    return policy, schedule, step_options
