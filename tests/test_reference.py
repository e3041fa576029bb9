"""cggr.reference: ReferenceModel (per-token NLL of a frozen LM), domain_threshold, CGGRModel.router_row_nll;
the parked cggr.experimental.RunningBaseline and otsu_threshold."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from cggr.experimental import RunningBaseline, otsu_threshold
from cggr.model import CGGRModel
from cggr.policies import ExcessLossRows, HardestRows, ReferenceFilter, RouterSettings
from cggr.reference import ReferenceModel, domain_threshold

from test_router import VOCAB, tiny_model  # tests/ is on sys.path (rootdir conftest, no package)


def _batch(B=5, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100
    labels[2, 1:4] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[B - 1, 8:] = 0  # right padding (the last row)
    return ids, labels, mask


def _nll_float64(model, ids, labels, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    targets = labels[:, 1:]
    valid = (targets != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return torch.where(valid, nll, torch.zeros_like(nll))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rows_per_chunk", [None, 1, 2])
def test_reference_model_nll_matches_float64(family, rows_per_chunk):
    model = tiny_model(family)
    ids, labels, mask = _batch()
    expected = _nll_float64(model, ids, labels, mask)
    got = ReferenceModel(model, rows_per_chunk=rows_per_chunk)(ids, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (5, 10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert (got[2, :3] == 0).all() and (got[4, 7:] == 0).all()  # ignored targets and padding (row 4 of 5)
    # no labels: the inputs are the labels, every target counts
    torch.testing.assert_close(ReferenceModel(model)(ids).double(),
                               _nll_float64(model, ids, ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-5)


def test_frozen_copy_is_frozen_and_independent():
    model = tiny_model("llama")
    ids, labels, mask = _batch()
    reference = ReferenceModel.frozen_copy(model)
    before = reference(ids, labels, mask)
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    assert not any(p.requires_grad for p in reference.model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.testing.assert_close(reference(ids, labels, mask), before)
    assert not torch.allclose(ReferenceModel(model)(ids, labels, mask), before)


def test_reference_model_bad_input():
    model = tiny_model("llama")
    ids, labels, _ = _batch()
    with pytest.raises(ValueError, match=r"input_ids: expected an integer \[B, T\] tensor, got \(11,\)"):
        ReferenceModel(model)(ids[0])
    with pytest.raises(ValueError, match=r"labels: expected shape \(5, 11\) to match input_ids, got \(5, 10\)"):
        ReferenceModel(model)(ids, labels[:, 1:])
    with pytest.raises(ValueError, match="at least 2 positions"):
        ReferenceModel(model)(ids[:, :1])
    with pytest.raises(ValueError, match="rows_per_chunk must be None or an int >= 1, got 0"):
        ReferenceModel(model, rows_per_chunk=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ReferenceModel("gpt2")


def _ema_reference(updates, num_keys, momentum):
    values, seen = [0.0] * num_keys, [False] * num_keys
    for keys, nll in updates:
        groups = {}
        for k, v in zip(keys, nll):
            if v == v and abs(v) != float("inf"):
                groups.setdefault(k, []).append(v)
        for k, vs in groups.items():
            mean = sum(vs) / len(vs)
            values[k] = momentum * values[k] + (1 - momentum) * mean if seen[k] else mean
            seen[k] = True
    return values, seen


def test_running_baseline_matches_a_python_reference():
    torch.manual_seed(0)
    baseline = RunningBaseline(6, momentum=0.8)
    assert (baseline.reference_nll(torch.tensor([0, 5]), 4) == 0).all()  # nothing seen: 0 for everyone
    updates = []
    for step in range(12):
        keys = torch.randint(0, 5, (7,))  # key 5 is never updated; duplicates within a batch
        nll = torch.rand(7) * 4
        if step == 3:
            nll[0] = float("nan")
            nll[1] = -float("inf")
        baseline.update(keys, nll)
        updates.append((keys.tolist(), nll.tolist()))
    values, seen = _ema_reference(updates, 6, 0.8)
    assert baseline.seen.tolist() == seen
    torch.testing.assert_close(baseline.values, torch.tensor(values, dtype=torch.float32))
    ref = baseline.reference_nll(torch.tensor([2, 5, 0]), 9)
    assert ref.shape == (3, 8)
    fill = sum(v for v, s in zip(values, seen) if s) / sum(seen)  # an unseen key gets the mean of the seen
    torch.testing.assert_close(ref[:, 0], torch.tensor([values[2], fill, values[0]], dtype=torch.float32))
    assert (ref == ref[:, :1]).all()
    state = baseline.state_dict()
    restored = RunningBaseline(6, momentum=0.8)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.reference_nll(torch.tensor([2, 5, 0]), 9), ref)


def test_running_baseline_bad_input():
    with pytest.raises(ValueError, match="num_keys must be an int >= 1, got 0"):
        RunningBaseline(0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1.0"):
        RunningBaseline(3, momentum=1.0)
    baseline = RunningBaseline(3)
    with pytest.raises(ValueError, match="keys: expected a 1-D integer tensor of keys"):
        baseline.reference_nll(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match=r"row_nll: expected shape \(2,\)"):
        baseline.update(torch.tensor([0, 1]), torch.zeros(3))
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        baseline.reference_nll(torch.tensor([0]), 1)
    with pytest.raises(RuntimeError, match="outside"):
        baseline.update(torch.tensor([0, 3]), torch.zeros(2))
    with pytest.raises(RuntimeError, match="outside"):
        baseline.reference_nll(torch.tensor([-1]), 4)


def test_router_row_nll_is_the_routers_mean_loss_per_row():
    model = tiny_model("llama")
    ids, labels, mask = _batch(B=6)
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=HardestRows("loss", RouterSettings(layers=1)))
    cggr(ids, labels=labels, attention_mask=mask)
    rows, _ = cggr._score_rows(ids, labels, mask, {}, None)  # scoring 'loss': the row score is the mean NLL
    torch.testing.assert_close(cggr.router_row_nll, rows)
    labels_none = labels.clone()
    labels_none[3] = -100
    cggr(ids, labels=labels_none, attention_mask=mask)
    assert torch.isnan(cggr.router_row_nll[3]) and torch.isfinite(cggr.router_row_nll[[0, 1, 2, 4, 5]]).all()
    full = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0, policy=HardestRows(router=RouterSettings(layers=1)))
    full(ids, labels=labels)
    assert full.router_row_nll is None  # ratio 1: no router pass


def test_running_baseline_with_cggr_model_end_to_end():
    """Source keys: a source whose rows are all easy-for-it ranks by excess over its own running mean."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=ExcessLossRows())  # 1 block, every 8th
    baseline = RunningBaseline(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(3):
        ids, labels, _ = _batch(B=4, seed=step)
        sources = torch.tensor([0, 0, 1, 1])
        loss = cggr(ids, labels=labels, reference_nll=baseline.reference_nll(sources, ids.shape[1]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cggr.step()
        baseline.update(sources, cggr.router_row_nll)
    assert baseline.seen.all() and torch.isfinite(baseline.values).all()
    # with the baseline as reference, the row scores are router NLL minus the row's source value
    ids, labels, _ = _batch(B=4, seed=9)
    ref = baseline.reference_nll(sources, ids.shape[1])
    rows, _ = cggr._score_rows(ids, labels, None, {}, ref)
    torch.testing.assert_close(rows, cggr.router_row_nll - baseline.values[sources], rtol=1e-5, atol=1e-5)


# -- otsu_threshold: Otsu's split of row NLLs ------------------------------------------------------

def otsu_brute_force(values):
    """Every cut between distinct sorted values, between-class variance in float64; the best cut's midpoint."""
    x = sorted(float(v) for v in values)
    n, best, arg = len(x), -1.0, None
    for i in range(1, n):
        if x[i] == x[i - 1]:
            continue
        a, b = x[:i], x[i:]
        m0, m1 = sum(a) / len(a), sum(b) / len(b)
        var = (len(a) / n) * (len(b) / n) * (m0 - m1) ** 2
        if var > best:
            best, arg = var, (x[i - 1] + x[i]) / 2
    return arg


@pytest.mark.parametrize("seed", range(4))
def test_otsu_threshold_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (1,), generator=g))
    values = torch.randn(n, generator=g, dtype=torch.float64).round(decimals=1)  # ties included
    if values.min() == values.max():
        values[0] += 1
    assert otsu_threshold(values) == pytest.approx(otsu_brute_force(values.tolist()), abs=1e-12)


def test_otsu_threshold_separates_a_small_low_group():
    g = torch.Generator().manual_seed(0)
    in_domain = 3.5 + 0.3 * torch.randn(80, generator=g)      # 8 %: the reference's own domain
    others = 6.5 + 0.4 * torch.randn(920, generator=g)
    t = otsu_threshold(torch.cat([others, in_domain]).numpy().astype("float32"))
    assert in_domain.max() < t < others.min() and isinstance(t, float)


def test_otsu_threshold_bad_input():
    with pytest.raises(ValueError, match="row_nll: expected a non-empty 1-D"):
        otsu_threshold(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not finite"):
        otsu_threshold([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="at least 2 distinct values.*got 1 value"):
        otsu_threshold([1.0])
    with pytest.raises(ValueError, match="all 2.0"):
        otsu_threshold([2.0, 2.0, 2.0])


# -- domain_threshold: a quantile of the reference's NLL on held-out in-domain rows -------------------

@pytest.mark.parametrize("recall", [0.5, 0.9, 0.95, 1.0])
def test_domain_threshold_is_the_recall_quantile(recall):
    g = torch.Generator().manual_seed(int(recall * 100))
    values = 3 + torch.rand(37, generator=g, dtype=torch.float64)
    t = domain_threshold(values.float().numpy(), recall)
    assert isinstance(t, float)
    # float64 reference: linear interpolation between order statistics
    x = sorted(values.float().double().tolist())
    pos = recall * (len(x) - 1)
    lo = int(pos)
    want = x[lo] + (pos - lo) * (x[min(lo + 1, len(x) - 1)] - x[lo])
    assert t == pytest.approx(want, abs=1e-12)
    assert sum(v <= t + 1e-12 for v in x) >= math.ceil(recall * len(x) - 1e-9) - 1
    assert domain_threshold([4.25]) == 4.25


def test_domain_threshold_bad_input():
    for bad in (0, 0.0, 1.5, -0.1, True, "0.9", None):
        with pytest.raises(ValueError, match="recall must be a number in"):
            domain_threshold([1.0, 2.0], bad)
    with pytest.raises(ValueError, match="heldout_row_nll: expected a non-empty 1-D"):
        domain_threshold([])
    with pytest.raises(ValueError, match="heldout_row_nll: expected a non-empty 1-D"):
        domain_threshold(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="heldout_row_nll: 1 of 2 values are not finite"):
        domain_threshold([1.0, float("inf")])


def test_reference_model_row_nll_is_the_mean_over_scored_targets():
    model = tiny_model("llama")
    ids, labels, mask = _batch()
    labels[1, 1:] = -100  # row 1: nothing scored
    expected = _nll_float64(model, ids, labels, mask)
    valid = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    got = ReferenceModel(model).row_nll(ids, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (5,) and torch.isnan(got[1])
    for i in (0, 2, 3, 4):
        assert got[i].item() == pytest.approx(expected[i][valid[i]].mean().item(), rel=1e-5)
    # the value CGGRModel(policy=ReferenceFilter(threshold)) compares with its threshold, for the same rows
    finite = torch.where(torch.isnan(got), math.inf, got)
    lowest = int(torch.argmin(finite))
    m = CGGRModel(model, min_tokens_ratio=0.2, warmup_steps=0,
                  policy=ReferenceFilter(float(finite[lowest])))  # only the lowest row passes; k = 1
    with torch.no_grad():
        m(ids, labels=labels, attention_mask=mask, reference_nll=ReferenceModel(model)(ids, labels, mask))
    assert m.selected_rows.tolist() == [lowest]


@pytest.mark.parametrize("name", ["RunningBaseline", "otsu_threshold"])
def test_parked_signals_moved_to_experimental(name):
    """The old names fail with an error naming the new one: an ImportError (``MovedError``), so that a
    ``from ... import`` shows it too instead of "cannot import name"."""
    import cggr.experimental
    import cggr.reference

    assert callable(getattr(cggr.experimental, name))
    for module in (cggr.reference, cggr):
        with pytest.raises(ImportError, match=rf"{name} moved to cggr\.experimental\.{name}"):
            getattr(module, name)


@pytest.mark.parametrize("module", ["cggr.reference", "cggr"])
@pytest.mark.parametrize("name", ["RunningBaseline", "otsu_threshold"])
def test_parked_signals_old_from_import_names_the_new_path(module, name):
    """``from cggr.reference import RunningBaseline`` (the 0.5 spelling) must say where it went: Python turns
    an AttributeError of a module ``__getattr__`` into a bare "cannot import name" ImportError."""
    with pytest.raises(ImportError, match=rf"cggr\.experimental\.{name}"):
        exec(f"from {module} import {name}", {})


@pytest.mark.parametrize("variant", sorted(__import__("test_router_families").VARIANTS))
def test_reference_model_head_per_chunk_equals_the_models_own_forward(variant):
    """Every family the router verifies runs its layers once and its head per chunk: the same per-token NLL
    as the model's own forward (logit scale and soft cap included), padded rows and ignored targets too."""
    from test_router_families import V, make_model

    model = make_model(variant)  # float32: the MoE families' grouped matmul takes no float64
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[3, :2] = 0  # left padding
    labels = ids.clone()
    labels[2, 4] = -100
    reference = ReferenceModel(model, rows_per_chunk=3)
    assert reference._trunk is not None
    expected = _nll_float64(model, ids, labels, mask)
    got = reference(ids, labels, mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


class Wrapped(torch.nn.Module):
    """A causal LM the router's adapters do not know (no config): ``forward(input_ids=...).logits``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_reference_model_other_causal_lm_runs_its_forward_per_chunk_and_says_so():
    model = tiny_model("llama")
    ids, labels, mask = _batch()
    with pytest.warns(UserWarning, match="unsupported architecture Wrapped: not a Hugging Face causal LM .*"
                                         "whole forward runs once per chunk of rows"):
        reference = ReferenceModel(Wrapped(model), rows_per_chunk=2)
    torch.testing.assert_close(reference(ids, labels, mask).double(), _nll_float64(model, ids, labels, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_reference_model_of_a_peft_model(targets):
    """LoRA in the layers: the head-per-chunk path, adapters applied; LoRA on the LM head (not an nn.Linear):
    the forward per chunk, with the warning. The same NLL as the PEFT model's own forward either way."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=targets,
                                                                       init_lora_weights=False))
    ids, labels, mask = _batch()
    if "lm_head" in targets:
        with pytest.warns(UserWarning, match="expected an nn.Linear LM head .* whole forward runs once per chunk"):
            reference = ReferenceModel(model, rows_per_chunk=2)
        assert reference._trunk is None
    else:
        reference = ReferenceModel(model, rows_per_chunk=2)
        assert reference._trunk is not None
    torch.testing.assert_close(reference(ids, labels, mask).double(), _nll_float64(model, ids, labels, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("stride", [1, 2, 3, 10, 11])
def test_reference_model_token_stride_scores_the_routers_positions_only(stride, wrapped):
    """token_stride=s: targets s-1, 2s-1, ... equal the full call's values (ignored / padded ones 0), the rest
    NaN; both paths (layers once + head, and a model's own forward per chunk)."""
    model = tiny_model("llama")
    if wrapped:
        model = Wrapped(model)
    ids, labels, mask = _batch()  # T = 11: 10 targets; stride 11 scores none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Wrapped's per-chunk warning: tested above
        reference = ReferenceModel(model, rows_per_chunk=2)
    full = reference(ids, labels, mask)
    got = reference(ids, labels, mask, token_stride=stride)
    scored = torch.zeros(10, dtype=torch.bool)
    scored[stride - 1::stride] = True
    torch.testing.assert_close(got[:, scored], full[:, scored], rtol=0, atol=1e-6)
    if stride > 1:
        assert torch.isnan(got[:, ~scored]).all()
    else:
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_reference_model_token_stride_bad_input(bad):
    ids, labels, mask = _batch()
    with pytest.raises(ValueError, match=rf"token_stride must be an int >= 1, got {re.escape(repr(bad))}"):
        ReferenceModel(tiny_model("llama"))(ids, labels, mask, token_stride=bad)


def test_cggr_model_reference_token_stride():
    from cggr.options import StepOptions

    model = tiny_model("llama")
    assert CGGRModel(model, policy=ExcessLossRows()).reference_token_stride == 8
    assert CGGRModel(model, policy=ExcessLossRows(RouterSettings(layers=1, token_stride=3))).reference_token_stride == 3
    assert CGGRModel(model, policy=ExcessLossRows(RouterSettings(layers=2))).reference_token_stride == 1
    assert CGGRModel(model, policy=ReferenceFilter(threshold=1.0)).reference_token_stride == 1  # row means: all
    hardest = HardestRows(router=RouterSettings(layers=1, token_stride=4))  # reads no reference
    assert CGGRModel(model, policy=hardest).reference_token_stride == 1
    # token selection in the fused loss reads every selected row's reference values
    token_level = CGGRModel(model, policy=ExcessLossRows(),
                            step_options=StepOptions(loss_impl="fused", token_ratio=0.5))
    assert token_level.reference_token_stride == 1
