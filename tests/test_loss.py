"""CGGRLoss against float64 references: signals, selection, loss value, gradients, curriculum, state."""
import math

import pytest
import torch
import torch.nn.functional as F

from cggr import CGGRLoss

IGNORE = -100


def _batch(n=96, v=53, dtype=torch.float32, seed=0, ignore_frac=0.2, shape=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    if shape is not None:
        logits, targets = logits.view(*shape, v), targets.view(*shape)
    return logits, targets


def _reference_signals(logits, targets):
    x = logits.double().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    valid = t != IGNORE
    nll = torch.where(valid, -logp.gather(1, t.clamp_min(0)[:, None])[:, 0], torch.zeros_like(x[:, 0]))
    top = p.topk(min(2, x.shape[1]), -1).values
    p2 = top[:, 1] if x.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return {"loss": nll, "entropy": -(p * logp).sum(-1), "margin": 1 - (top[:, 0] - p2), "valid": valid}


def _criterion(**kw):
    base = dict(dynamic_threshold=False, warmup_steps=0, min_tokens_ratio=0.25)
    base.update(kw)
    return CGGRLoss(**base)


@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss"])
def test_topk_selection_matches_reference_ranking(scoring):
    logits, targets = _batch(seed=11)
    crit = _criterion(scoring=scoring)
    crit(logits, targets)
    mask = crit._last["mask"]
    ref = _reference_signals(logits, targets)
    valid = ref["valid"]
    k = math.ceil(0.25 * int(valid.sum()))
    order = torch.where(valid, ref[scoring], torch.full_like(ref[scoring], -math.inf)).argsort(descending=True)
    expected = torch.zeros_like(mask)
    expected[order[:k]] = True
    assert torch.equal(mask, expected)
    assert not (mask & ~valid).any()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradient_match_float64_cross_entropy_on_selected_rows(dtype, tol, reduction):
    logits, targets = _batch(n=77, v=131, dtype=dtype, seed=5)
    logits.requires_grad_(True)
    crit = _criterion(scoring="combined", reduction=reduction)
    loss = crit(logits, targets)
    mask = crit._last["mask"]
    upstream = torch.randn(77, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()

    ref_logits = logits.detach().double().requires_grad_(True)
    per_token = F.cross_entropy(ref_logits, targets, reduction="none", ignore_index=IGNORE)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "mean":
        ref = per_token.sum() / mask.sum()
    elif reduction == "sum":
        ref = per_token.sum()
    else:
        ref = per_token
    (ref * upstream).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2  # gradient is rounded to the logits' dtype
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=grad_tol, atol=grad_tol * 0.1)
    assert logits.grad.dtype == dtype
    assert (logits.grad[~mask] == 0).all()


@pytest.mark.parametrize("scoring", ["loss", "combined"])  # combined: no valid token to standardise over
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(scoring):
    logits, targets = _batch(n=10, v=7)
    targets[:] = IGNORE
    logits.requires_grad_(True)
    crit = _criterion(scoring=scoring)
    loss = crit(logits, targets)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert (logits.grad == 0).all()
    m = crit.get_metrics()
    assert m["tokens_selected"] == 0 and m["tokens_total"] == 0


def test_three_dim_logits_and_shift_labels():
    logits, labels = _batch(n=4 * 9, v=17, seed=2, shape=(4, 9))
    crit = _criterion(scoring="loss", shift_labels=True, min_tokens_ratio=1.0)
    loss = crit(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 17).double(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_curriculum_keeps_all_tokens_first_then_min_ratio():
    logits, targets = _batch(n=200, v=11, seed=4, ignore_frac=0.0)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4, dynamic_threshold=False)
    selected = []
    for _ in range(6):
        crit(logits, targets)
        selected.append(crit.get_metrics()["tokens_selected"])
        crit.step()
    assert selected == [200, 163, 125, 88, 50, 50]


def test_dynamic_threshold_moves_with_confidence_within_bounds():
    v = 50
    confident = torch.full((400, v), -10.0)
    confident[:, 0] = 10.0
    unsure = torch.zeros(400, v)
    targets = torch.zeros(400, dtype=torch.long)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=0.5)
    crit(confident, targets)
    high = crit.get_metrics()
    crit(unsure, targets)
    low = crit.get_metrics()
    assert high["avg_confidence"] > 0.99 and low["avg_confidence"] == pytest.approx(1 / v)
    assert high["tokens_selected"] == 100  # floor: min_tokens_ratio
    assert low["tokens_selected"] == math.ceil(400 * (0.25 + 0.5 * (0.5 - 1 / v)))
    assert 0.25 <= low["token_ratio"] <= 1.0


@pytest.mark.parametrize("selection", ["stratified", "sequence_aware"])
def test_other_selections_choose_valid_tokens(selection):
    logits, targets = _batch(n=8 * 25, v=19, seed=9, shape=(8, 25))
    crit = _criterion(scoring="combined", selection=selection, min_tokens_per_sequence=2)
    logits.requires_grad_(True)
    crit(logits, targets).backward()
    mask = crit._last["mask"]
    valid = targets != IGNORE
    assert not (mask & ~valid).any()
    k = math.ceil(0.25 * int(valid.sum()))
    if selection == "stratified":
        assert int(mask.sum()) == k
    else:
        assert int(mask.sum()) >= k
        assert (mask.sum(1) >= torch.minimum(valid.sum(1), torch.tensor(2))).all()
    assert (logits.grad[~mask] == 0).all()


def test_defaults_agree_with_cggr_model():
    """CGGRLoss and CGGRModel share the token score ('loss', as the router policies), a fixed ratio (no dynamic
    threshold) and the curriculum (issue 17: defaults that agree)."""
    import inspect

    from cggr import CGGRModel, HardestRows

    crit = CGGRLoss()
    model_defaults = inspect.signature(CGGRModel).parameters
    assert crit.scoring == HardestRows().scoring == "loss"
    assert crit.schedule.dynamic_threshold is False
    assert crit.schedule.min_tokens_ratio == model_defaults["min_tokens_ratio"].default == 0.25
    assert crit.schedule.warmup_steps == model_defaults["warmup_steps"].default == 1000
    assert crit.schedule.schedule == model_defaults["schedule"].default == "linear"
    # the defaults in action: the tokens with the highest loss, at exactly the ratio however unsure the model
    logits, targets = _batch(n=200, v=50, seed=8, ignore_frac=0.0)
    unsure = logits / 100  # batch confidence about 1/50: a dynamic threshold would keep far more than 25 %
    default = CGGRLoss(warmup_steps=0)
    default(unsure, targets)
    explicit = CGGRLoss(scoring="loss", dynamic_threshold=False, warmup_steps=0)
    explicit(unsure, targets)
    assert torch.equal(default._last["mask"], explicit._last["mask"])
    assert default.get_metrics()["tokens_selected"] == 50


def test_state_dict_carries_the_curriculum_step():
    crit = CGGRLoss(warmup_steps=10)
    for _ in range(7):
        crit.step()
    fresh = CGGRLoss(warmup_steps=10)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.step_count == 7
    assert fresh.current_ratio == crit.current_ratio


@pytest.mark.parametrize("kwargs, match", [
    ({"min_tokens_ratio": 0.0}, "min_tokens_ratio"),
    ({"min_tokens_ratio": 1.01}, "min_tokens_ratio"),
    ({"scoring": "confidence"}, "scoring"),
    ({"selection": "random"}, "selection"),
    ({"reduction": "avg"}, "reduction"),
    ({"warmup_steps": -3}, "warmup_steps"),
    ({"num_strata": 0}, "num_strata"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CGGRLoss(**kwargs)


def test_bad_call_arguments():
    crit = _criterion()
    logits, targets = _batch(n=12, v=5)
    with pytest.raises(ValueError, match="targets: expected shape"):
        crit(logits, targets[:5])
    with pytest.raises(ValueError, match="targets must be int64 or int32"):
        crit(logits, targets.float())
    with pytest.raises(ValueError, match=r"logits must be \[N, V\] or \[B, T, V\]"):
        crit(logits[0], targets)
    bad = targets.clone()
    bad[3] = 5
    with pytest.raises(ValueError, match="target"):
        crit(logits, bad)
    with pytest.raises(ValueError, match="sequence_aware"):
        _criterion(selection="sequence_aware")(logits, targets)


@pytest.mark.parametrize("selection, dynamic", [("topk", False), ("topk", True), ("sequence_aware", False)])
def test_forward_linear_matches_logits_path(selection, dynamic):
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(3, 20, 16, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weight = (torch.randn(41, 16, generator=g) / 4).requires_grad_(True)
    targets = torch.randint(0, 41, (3, 20), generator=g)
    targets[0, :5] = IGNORE
    kw = dict(scoring="combined", selection=selection, dynamic_threshold=dynamic, warmup_steps=0)
    linear_crit, logits_crit = CGGRLoss(**kw), CGGRLoss(**kw)
    loss_lin = linear_crit.forward_linear(hidden, weight, targets)
    loss_lin.backward()
    grads_lin = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss_log = logits_crit(hidden @ weight.T, targets)
    loss_log.backward()
    assert torch.equal(linear_crit._last["mask"], logits_crit._last["mask"])
    torch.testing.assert_close(loss_lin, loss_log, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_lin[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads_lin[1], weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("v", [1, 2, 3])
@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss", "combined"])
def test_tiny_vocabularies(v, scoring):
    logits, targets = _batch(n=29, v=v, seed=v)
    logits.requires_grad_(True)
    crit = _criterion(scoring=scoring, min_tokens_ratio=0.5)
    loss = crit(logits, targets)
    loss.backward()
    mask = crit._last["mask"]
    valid = targets != IGNORE
    assert int(mask.sum()) == math.ceil(0.5 * int(valid.sum()))
    ref = F.cross_entropy(logits.detach().double()[mask], targets[mask])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
