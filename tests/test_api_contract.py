"""The public contract of the reworked selection API (issue 17).

- every 0.5 keyword of CGGRModel still works for one release: a FutureWarning that names the new spelling, and
  the same policy, schedule, step options, loss and selected rows as that spelling;
- the policies that moved to cggr.experimental raise an error naming their new home;
- the original documented call ``CGGRModel(model, router=create_truncated_router(model, num_layers=...), ...)``
  really routes (the router runs over the whole batch), and its loss trains;
- an argument the chosen policy does not use is an error naming the policy that uses it;
- CGGRModel takes at most 10 parameters; CGGRLoss keeps its signature; the shared defaults agree.
"""
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from cggr.experimental import HalfHardestRows, ImportanceRows
from cggr.loss import CGGRLoss
from cggr.model import CGGRModel
from cggr.options import StepOptions
from cggr.policies import (ExcessLossRows, HardestRows, RandomRows, ReferenceFilter, ReferenceRanked, RouterSettings,
                           RowPolicy, RowSelection)
from cggr.router import create_truncated_router
from cggr.schedule import RatioSchedule

from test_router import VOCAB, tiny_model  # tests/ is on sys.path (rootdir conftest, no package)

B, T = 8, 12
RATIO = dict(min_tokens_ratio=0.5, warmup_steps=0)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[3, 2:6] = -100
    return ids, labels


def reference_nll(seed=2):
    # mean reference NLL per row spread around the threshold of 4.0 used below: some rows pass, some not
    return torch.rand(B, T - 1, generator=torch.Generator().manual_seed(seed)) * 8


@pytest.fixture(scope="module")
def model():
    # 6 blocks: every policy's default router (4 blocks at most) fits
    return tiny_model("llama", layers=6)


def new(**kw):
    """The new spelling's extra arguments (RATIO unless a whole schedule is given)."""
    return kw if "schedule" in kw else {**RATIO, **kw}


# (old keywords, new keywords, needs reference_nll). Each case holds the keyword it is named after; the
# policy keywords are given with selection='hardest' where 'auto' would pick RandomRows and ignore them.
LEGACY = {
    "scoring": (dict(scoring="excess_loss"), new(policy=ExcessLossRows()), True),
    "scoring_hardest": (dict(selection="hardest", scoring="entropy"), new(policy=HardestRows("entropy")), False),
    "selection_hardest": (dict(selection="hardest"), new(policy=HardestRows()), False),
    "selection_random": (dict(selection="random"), new(policy=RandomRows()), False),
    "selection_reference_filter": (dict(selection="reference_filter", reference_threshold=4.0),
                                   new(policy=ReferenceFilter(4.0)), True),
    "selection_reference_ranked": (dict(selection="reference_ranked", reference_threshold=4.0),
                                   new(policy=ReferenceRanked(4.0)), True),
    "router_layers": (dict(selection="hardest", router_layers=2),
                      new(policy=HardestRows(router=RouterSettings(layers=2))), False),
    "router_layers_excess": (dict(scoring="excess_loss", router_layers=2),
                             new(policy=ExcessLossRows(RouterSettings(layers=2, token_stride=8))), True),
    "router_token_stride": (dict(selection="hardest", router_token_stride=3),
                            new(policy=HardestRows(router=RouterSettings(token_stride=3))), False),
    "router_max_positions": (dict(selection="hardest", router_max_positions=5),
                             new(policy=HardestRows(router=RouterSettings(max_positions=5))), False),
    "router_chunk_size": (dict(selection="hardest", router_chunk_size=7),
                          new(policy=HardestRows(router=RouterSettings(chunk_size=7))), False),
    "combined_weights": (dict(selection="hardest", scoring="combined", combined_weights={"entropy": 2.0, "loss": 1.0}),
                         new(policy=HardestRows("combined", combined_weights={"entropy": 2.0, "loss": 1.0})), False),
    "dynamic_threshold": (dict(selection="hardest", dynamic_threshold=True),
                          new(policy=HardestRows(), schedule=RatioSchedule(**RATIO, dynamic_threshold=True)), False),
    # random weights: confidence ~ 1/V, ratio ~ 0.5 + sensitivity / 2: 6 rows at 0.5, 5 at 0.25
    "threshold_sensitivity": (dict(selection="hardest", dynamic_threshold=True, threshold_sensitivity=0.25),
                              new(policy=HardestRows(), schedule=RatioSchedule(**RATIO, dynamic_threshold=True,
                                                                               threshold_sensitivity=0.25)), False),
    "compile": (dict(compile=False), new(step_options=StepOptions(compile=False)), False),
    "loss_impl": (dict(selection="hardest", loss_impl="fused"),
                  new(policy=HardestRows(), step_options=StepOptions(loss_impl="fused")), False),
    "token_ratio": (dict(selection="hardest", loss_impl="fused", token_ratio=0.5),
                    new(policy=HardestRows(), step_options=StepOptions(loss_impl="fused", token_ratio=0.5)), False),
    "loss_chunk_size": (dict(selection="hardest", loss_impl="fused", loss_chunk_size=5),
                        new(policy=HardestRows(), step_options=StepOptions(loss_impl="fused", loss_chunk_size=5)),
                        False),
    "forward_impl": (dict(forward_impl="trunk"), new(step_options=StepOptions(forward_impl="trunk")), False),
    "collect_timing": (dict(selection="hardest", collect_timing=True),
                       new(policy=HardestRows(), step_options=StepOptions(collect_timing=True)), False),
}


@pytest.mark.parametrize("case", list(LEGACY))
def test_old_keyword_warns_and_equals_the_new_spelling(model, case):
    old_kw, new_kw, needs_reference = LEGACY[case]
    with pytest.warns(FutureWarning) as record:
        old = CGGRModel(model, **RATIO, **old_kw)
    messages = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1, messages
    message = messages[0]
    for key in old_kw:
        assert f"{key}=..." in message
    assert "deprecated" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling does not warn
        current = CGGRModel(model, **new_kw)
    # the warning names the new spelling, exactly as it is built
    if "policy" in new_kw:
        assert f"policy={new_kw['policy']!r}" in message
    if "schedule" in new_kw:
        assert f"schedule={new_kw['schedule']!r}" in message
    if "step_options" in new_kw:
        assert f"step_options={new_kw['step_options']!r}" in message
    assert old.policy == current.policy and repr(old.policy) == repr(current.policy)
    assert repr(old.schedule) == repr(current.schedule)
    assert old.step_options == current.step_options
    assert (old.router is None) == (current.router is None)
    if old.router is not None:
        assert old.router.num_layers == current.router.num_layers

    ids, labels = batch()
    extra = {"reference_nll": reference_nll()} if needs_reference else {}
    losses, rows = [], []
    for m in (old, current):
        with torch.no_grad():
            losses.append(m(ids, labels=labels, **extra))
        rows.append(m.selected_rows)
        m.step()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert rows[0] is not None and torch.equal(rows[0], rows[1])
    assert old.get_metrics().keys() == current.get_metrics().keys()


def test_old_keywords_translate_the_defaults_they_leave_out(model):
    """The 0.5 API's router defaults by scoring: excess loss got 1 block and every 8th position, the others 4
    blocks and every position; and selection='auto' without excess loss or a router picked random rows."""
    with pytest.warns(FutureWarning):
        assert CGGRModel(model, scoring="excess_loss").policy.router == RouterSettings(layers=1, token_stride=8)
    with pytest.warns(FutureWarning):
        assert CGGRModel(model, selection="hardest").policy.router == RouterSettings(layers=4, token_stride=1)
    with pytest.warns(FutureWarning, match=r"policy=RandomRows\(\)"):
        assert CGGRModel(model, scoring="entropy").policy == RandomRows()


def test_old_and_new_spelling_together_is_an_error(model):
    with pytest.raises(ValueError, match="pass either policy= or the old selection, not both"):
        CGGRModel(model, policy=HardestRows(), selection="hardest")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"pass either step_options=StepOptions\(...\) "
                                                                     "or the old loss_impl"):
        CGGRModel(model, step_options=StepOptions(), loss_impl="fused")
    with pytest.raises(ValueError, match="pass either schedule=RatioSchedule"):
        CGGRModel(model, policy=HardestRows(), schedule=RatioSchedule(), dynamic_threshold=True)
    with pytest.raises(TypeError, match="unexpected keyword argument.*selectoin"):
        CGGRModel(model, selectoin="hardest")


# -- (2) the parked policies --------------------------------------------------------------------------

@pytest.mark.parametrize("old,new_name,new_policy", [
    (dict(selection="stratified"), "cggr.experimental.HalfHardestRows", HalfHardestRows),
    (dict(selection="importance"), "cggr.experimental.ImportanceRows", ImportanceRows),
    (dict(selection="importance", importance_mix=0.5, importance_temperature=2.0), "cggr.experimental.ImportanceRows",
     ImportanceRows),
])
def test_moved_selections_raise_naming_cggr_experimental(model, old, new_name, new_policy):
    with pytest.raises(ValueError, match=rf"moved: pass policy={new_name}\("):
        CGGRModel(model, **old)
    # and the spelling the error names works
    assert isinstance(CGGRModel(model, policy=new_policy()).policy, new_policy)


# -- (3) the original documented call routes ----------------------------------------------------------

class BlockCalls:
    """Forward pre-hook on the model's first decoder block: the batch size of every call."""

    def __init__(self, block):
        self.rows = []
        self.handle = block.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.rows.append(hidden.shape[0])


def test_documented_router_call_routes_the_batch():
    model = tiny_model("llama", layers=4).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the original API is not deprecated
        cggr_model = CGGRModel(model, router=create_truncated_router(model, num_layers=2), min_tokens_ratio=0.25,
                               warmup_steps=0)
    calls = BlockCalls(model.model.layers[0])
    ids, labels = batch(seed=3)
    loss = cggr_model(ids, labels=labels)
    # the router's pass over the whole batch, then the full model on the k = 2 selected rows
    assert calls.rows == [B, 2]
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert model.model.layers[-1].mlp.down_proj.weight.grad is not None
    # the rows are the hardest under the 2-block logit lens (brute force: full logits + cross entropy)
    with torch.no_grad():
        logits = create_truncated_router(model, num_layers=2).logits(ids)[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    rows = torch.where(valid, nll, 0).sum(1) / valid.sum(1)
    assert cggr_model.selected_rows.tolist() == sorted(torch.topk(rows, 2).indices.tolist())


def test_documented_router_call_with_the_default_warmup():
    """warmup_steps=1000: the first steps keep almost every row; once the curriculum drops a row, the router
    runs over the whole batch (before issue 17 the router was ignored and rows were random)."""
    model = tiny_model("llama", layers=4)
    cggr_model = CGGRModel(model, router=create_truncated_router(model, num_layers=2), min_tokens_ratio=0.25,
                           warmup_steps=1000)
    assert isinstance(cggr_model.policy, HardestRows) and cggr_model.router.num_layers == 2
    calls = BlockCalls(model.model.layers[0])
    ids, labels = batch()
    cggr_model(ids, labels=labels)
    assert calls.rows == [B]  # ratio 1.0: every row trains, no router pass needed
    for _ in range(200):  # ratio 1 - 0.75 * 200 / 1000 = 0.85: ceil(0.85 * 8) = 7 rows
        cggr_model.step()
    calls.rows.clear()
    cggr_model(ids, labels=labels).backward()
    assert calls.rows == [B, 7]


# -- (4), (5) arguments a policy does not use ----------------------------------------------------------

@pytest.mark.parametrize("policy", [RandomRows(), ReferenceFilter(4.0), ReferenceRanked(4.0)])
def test_router_with_a_policy_that_runs_none_is_an_error(model, policy):
    with pytest.raises(ValueError, match=r"runs no router pass.*policy=cggr.HardestRows\(\)"):
        CGGRModel(model, policy=policy, router=create_truncated_router(model, num_layers=2))


def test_dynamic_threshold_with_a_policy_that_runs_no_router_is_an_error(model):
    dynamic = RatioSchedule(dynamic_threshold=True)
    with pytest.raises(ValueError, match=r"RandomRows\(\) runs no router: use a router policy \(HardestRows"):
        CGGRModel(model, policy=RandomRows(), schedule=dynamic)
    # the 0.5 call (random rows plus a router for the confidence) is refused before any warning, with the
    # new spelling in the error
    with pytest.raises(ValueError, match=r"runs no router \(0.5 built one for it alone\). New spelling: "
                                         r"policy=cggr.HardestRows"):
        CGGRModel(model, dynamic_threshold=True)
    assert CGGRModel(model, policy=HardestRows(), schedule=dynamic).schedule.dynamic_threshold


def test_reference_nll_only_with_a_policy_that_uses_it(model):
    ids, labels = batch()
    for policy in (RandomRows(), HardestRows()):
        m = CGGRModel(model, policy=policy, **RATIO)
        with pytest.raises(ValueError, match=r"reference_nll was given, but .* does not use it; pass "
                                             r"policy=cggr.ExcessLossRows\(\)"):
            m(ids, labels=labels, reference_nll=reference_nll())
    excess = CGGRModel(model, policy=ExcessLossRows(), **RATIO)
    with pytest.raises(ValueError, match=r"reference_nll: ExcessLossRows\(.*\) ranks rows by a reference model's NLL"):
        excess(ids, labels=labels)
    assert torch.isfinite(excess(ids, labels=labels, reference_nll=reference_nll()))


# -- (6), (7), (8) signatures and defaults --------------------------------------------------------------

def test_cggr_model_takes_at_most_ten_parameters():
    params = inspect.signature(CGGRModel.__init__).parameters
    assert list(params)[:2] == ["self", "model"]
    counted = [name for name in params if name != "self"]  # **deprecated counts as one
    assert len(counted) <= 10, counted
    for name in ("policy", "router", "min_tokens_ratio", "warmup_steps", "schedule", "step_options", "seed"):
        assert name in params and params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_shared_defaults_agree():
    loss = CGGRLoss()
    assert loss.scoring == "loss" and loss.schedule.dynamic_threshold is False
    model_params = inspect.signature(CGGRModel.__init__).parameters
    loss_params = inspect.signature(CGGRLoss.__init__).parameters
    for name in ("min_tokens_ratio", "warmup_steps", "schedule"):
        assert model_params[name].default == loss_params[name].default, name
    assert (loss_params["min_tokens_ratio"].default, loss_params["warmup_steps"].default,
            loss_params["schedule"].default) == (0.25, 1000, "linear")
    assert HardestRows().scoring == loss.scoring
    m = CGGRModel(tiny_model("llama", layers=2))
    assert m.policy == RandomRows() and m.router is None
    assert repr(m.schedule) == repr(loss.schedule)
    assert repr(RatioSchedule()) == repr(loss.schedule)
    assert m.step_options == StepOptions()


def test_cggr_loss_keeps_its_public_signature():
    names = ["scoring", "selection", "num_strata", "min_tokens_per_sequence", "dynamic_threshold",
             "threshold_sensitivity", "min_tokens_ratio", "warmup_steps"]
    params = inspect.signature(CGGRLoss.__init__).parameters
    assert list(params)[1:1 + len(names)] == names  # same order: positional calls keep working
    for name in names:
        assert params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    # the original call, by keyword, still builds and runs
    criterion = CGGRLoss(scoring="combined", selection="stratified", num_strata=2, min_tokens_per_sequence=1,
                         dynamic_threshold=True, threshold_sensitivity=0.5, min_tokens_ratio=0.5, warmup_steps=0)
    logits = torch.randn(4, 10, 16, requires_grad=True)
    targets = torch.randint(0, 16, (4, 10))
    value = criterion(logits, targets)
    value.backward()
    assert torch.isfinite(value) and logits.grad is not None


# -- (9) a router deeper than the model -----------------------------------------------------------------

def test_shallow_model_error_names_router_settings():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match=r"RouterSettings\(layers=") as error:
        CGGRModel(model, policy=HardestRows())
    message = str(error.value)
    # the user never passed num_layers (create_truncated_router's argument): the error speaks of their call
    assert "num_layers" not in message, message
    assert CGGRModel(model, policy=HardestRows(router=RouterSettings(layers=1))).router.num_layers == 1


def test_custom_policy_is_a_row_policy(model):
    class Plain:
        def select(self, batch_size, k, generator):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="policy must be 'auto' or a cggr.RowPolicy, got Plain"):
        CGGRModel(model, policy=Plain())

    class FirstRows(RowPolicy):
        def select(self, batch_size, k, generator):
            return RowSelection(torch.arange(k, device=generator.device), None)

    m = CGGRModel(model, policy=FirstRows(), **RATIO)
    ids, labels = batch()
    m(ids, labels=labels)
    assert m.selected_rows.tolist() == [0, 1, 2, 3]
