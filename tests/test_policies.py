"""Row policies of CGGRModel: experimental importance sampling (unbiased full-batch estimator), excess-loss rows,
the reference filters, and custom RowPolicy subclasses."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from cggr.experimental import ImportanceRows, importance_probabilities
from cggr.model import CGGRModel
from cggr.options import StepOptions
from cggr.policies import (ExcessLossRows, HardestRows, RandomRows, ReferenceFilter, ReferenceRanked, RouterSettings,
                           RowPolicy, RowSelection)
from cggr.rows import reference_row_means

VOCAB = 64
B, T = 6, 9


def llama(seed=0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).eval()


def padded_batch(seed=3):
    """B=6, T=9: right padding (labels -100 there), some -100 targets, and one row with nothing scored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[4, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[2, 2:5] = -100
    labels[0, 7] = -100
    labels[5, :] = -100          # no scored token: q = 0, c = 0
    ids[mask == 0] = 0
    return ids, labels, mask


ROUTER = RouterSettings(layers=1)


def importance(mix=0.9, temperature=1.0, scoring="loss"):
    return ImportanceRows(mix=mix, temperature=temperature, scoring=scoring, router=ROUTER)


def cggr_for(model, k, policy=None, **kw):
    """CGGRModel keeping k of the B rows from the first step (default policy: ImportanceRows, 1-block router)."""
    return CGGRModel(model, policy=importance() if policy is None else policy, min_tokens_ratio=k / B,
                     warmup_steps=0, **kw)


def expected_p(row_scores, mix, temperature):
    """The documented distribution, written out independently of the implementation."""
    finite = torch.isfinite(row_scores)
    q = torch.zeros(len(row_scores), dtype=torch.float64)
    if finite.any():
        e = torch.exp((row_scores[finite].double() - row_scores[finite].double().max()) / temperature)
        q[finite] = e / e.sum()
    else:
        q[:] = 1.0 / len(row_scores)
    return (1 - mix) / len(row_scores) + mix * q


def row_losses(model, ids, labels, mask):
    """c_i (sum of row i's valid shifted token losses, float32 like HF) and n_total, from the plain model."""
    logits = model(ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    return nll.sum(1), int((targets != -100).sum())


# -- (a) unbiasedness, exactly ---------------------------------------------------------------------

@pytest.mark.parametrize("mix,temperature", [(0.9, 1.0), (0.5, 0.25)])
def test_importance_k1_expectation_equals_full_batch_loss_and_gradient(mix, temperature):
    model = llama()
    ids, labels, mask = padded_batch()
    param = model.model.layers[1].mlp.down_proj.weight

    model.zero_grad()
    full = model(ids, attention_mask=mask, labels=labels).loss
    full.backward()
    full_grad = param.grad.clone()

    cggr = cggr_for(model, 1, importance(mix, temperature))
    row_scores, _ = cggr._score_rows(ids, labels, mask, {}, None)
    assert row_scores[5] == -math.inf and torch.isfinite(row_scores[:5]).all()
    p = expected_p(row_scores, mix, temperature)
    torch.testing.assert_close(importance_probabilities(row_scores, mix, temperature).double(), p,
                               rtol=1e-5, atol=1e-7)

    # Enumerate the outcomes of k=1 through the real forward (every call draws afresh) until every row was drawn.
    losses, grads = {}, {}
    for _ in range(5000):
        model.zero_grad()
        loss = cggr(ids, labels=labels, attention_mask=mask)
        row = int(cggr.selected_rows.item())
        if row in losses:
            continue
        loss.backward()
        losses[row] = loss.detach().double()
        grads[row] = param.grad.double().clone() if param.grad is not None else torch.zeros_like(param).double()
        if len(losses) == B:
            break
    assert sorted(losses) == list(range(B))

    c, n_total = row_losses(model, ids, labels, mask)
    for i in range(B):  # each outcome is c_i / (p_i n_total)
        torch.testing.assert_close(losses[i], c[i].double().detach() / (p[i] * n_total), rtol=1e-4, atol=1e-6)
    assert losses[5] == 0.0
    expectation = sum(p[i] * losses[i] for i in range(B))
    expected_grad = sum(p[i] * grads[i] for i in range(B))
    torch.testing.assert_close(expectation, full.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected_grad, full_grad.double(), rtol=1e-4, atol=1e-6)


def test_importance_k2_estimator_with_duplicates():
    """Every draw's loss is (1/k) sum_j c_{i_j} / (p_{i_j} n_total), repeated rows included."""
    model = llama()
    ids, labels, mask = padded_batch()
    cggr = cggr_for(model, 2, importance(temperature=0.3))
    row_scores, _ = cggr._score_rows(ids, labels, mask, {}, None)
    p = expected_p(row_scores, 0.9, 0.3)
    with torch.no_grad():
        c, n_total = row_losses(model, ids, labels, mask)
    seen_duplicate = seen_distinct = False
    for _ in range(200):
        with torch.no_grad():
            loss = cggr(ids, labels=labels, attention_mask=mask)
        rows = cggr.selected_rows.tolist()
        assert rows == sorted(rows) and len(rows) == 2
        est = sum(c[i].double() / (p[i] * n_total) for i in rows) / 2
        torch.testing.assert_close(loss.double(), est, rtol=1e-4, atol=1e-6)
        seen_duplicate |= rows[0] == rows[1]
        seen_distinct |= rows[0] != rows[1]
        if seen_duplicate and seen_distinct:
            break
    assert seen_duplicate and seen_distinct


def test_importance_reproducible_and_fused_matches():
    model = llama()
    ids, labels, mask = padded_batch()
    a, b = cggr_for(model, 2, seed=7), cggr_for(model, 2, seed=7)
    fused = cggr_for(model, 2, seed=7, step_options=StepOptions(loss_impl="fused"))
    for _ in range(3):
        with torch.no_grad():
            la = a(ids, labels=labels, attention_mask=mask)
            lb = b(ids, labels=labels, attention_mask=mask)
            lf = fused(ids, labels=labels, attention_mask=mask)
        assert torch.equal(a.selected_rows, b.selected_rows) and torch.equal(a.selected_rows, fused.selected_rows)
        assert la.item() == lb.item()
        torch.testing.assert_close(lf, la, rtol=1e-4, atol=1e-5)


# -- (b) the sampling distribution -----------------------------------------------------------------

def test_importance_draw_frequencies_follow_p():
    scores = torch.tensor([0.5, 2.0, -math.inf, 1.0, 0.0, 3.0])
    gen = torch.Generator().manual_seed(0)
    mix, temperature, k, calls = 0.7, 1.5, 5, 2000
    select = ImportanceRows(mix=mix, temperature=temperature).select
    p = expected_p(scores, mix, temperature)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(calls):
        sel = select(scores, k, gen)
        assert sel.indices.dtype == torch.int64 and torch.equal(sel.indices, torch.sort(sel.indices).values)
        torch.testing.assert_close(sel.row_weight.double(), 1.0 / (k * p[sel.indices]), rtol=1e-5, atol=0)
        counts += torch.bincount(sel.indices, minlength=6).double()
    n = calls * k
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (chi2, counts, expected)   # df = 5: P(chi2 > 25) ~ 1e-4
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - expected).abs() < 4.5 * sd).all()


def test_importance_edge_distributions():
    gen = torch.Generator().manual_seed(0)
    select = ImportanceRows(mix=1.0).select
    # nothing scored: uniform whatever mix
    p = importance_probabilities(torch.full((4,), -math.inf), mix=1.0)
    torch.testing.assert_close(p, torch.full((4,), 0.25))
    # mix = 0: uniform; mix = 1 never draws an unscored row
    torch.testing.assert_close(importance_probabilities(torch.tensor([5.0, -1.0, -math.inf]), mix=0.0),
                               torch.full((3,), 1 / 3))
    scores = torch.tensor([1.0, -math.inf, 0.0, -math.inf])
    for _ in range(200):
        assert not set(select(scores, 3, gen).indices.tolist()) & {1, 3}
    # temperature -> small: all mass on the best scored row
    p = importance_probabilities(torch.tensor([1.0, 3.0, 2.0]), mix=1.0, temperature=1e-3)
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, 0.0]))
    assert ImportanceRows().loss_norm == "batch" and HardestRows().loss_norm == "selected"


# -- (c) options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"mix": -0.1}, "mix must be"), ({"mix": 1.5}, "mix must be"),
    ({"mix": float("nan")}, "mix must be"), ({"mix": "0.5"}, "mix must be"),
    ({"mix": True}, "mix must be"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"temperature": float("inf")}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"temperature": None}, "temperature must be"),
])
def test_bad_importance_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ImportanceRows(**kw)


def test_importance_rejects_token_ratio_and_bad_loss_norm():
    with pytest.raises(ValueError, match=r"ImportanceRows\(.*\) estimates the full batch's loss; "
                                         r"StepOptions\(token_ratio < 1\)"):
        cggr_for(llama(), 2, step_options=StepOptions(loss_impl="fused", token_ratio=0.5))

    class TokenNorm(HardestRows):
        loss_norm = "tokens"

    with pytest.raises(ValueError, match="TokenNorm.loss_norm must be one of"):
        cggr_for(llama(), 2, TokenNorm(router=ROUTER))
    ImportanceRows(mix=0, temperature=3)   # ints are fine; bounds inclusive
    assert importance(mix=1.0).mix == 1.0 and cggr_for(llama(), 2, importance(mix=1.0)).policy.mix == 1.0


# -- (d) excess_loss end to end --------------------------------------------------------------------

def test_excess_loss_hardest_flips_the_loss_ranking():
    model = llama()
    ids, labels, mask = padded_batch()
    labels[5, 3:7] = ids[5, 3:7]   # score every row here
    k = 2
    by_loss = cggr_for(model, k, HardestRows("loss", ROUTER))
    loss_rows, _ = by_loss._score_rows(ids, labels, mask, {}, None)
    assert torch.isfinite(loss_rows).all()
    with torch.no_grad():
        by_loss(ids, labels=labels, attention_mask=mask)
    top_loss = set(by_loss.selected_rows.tolist())
    order = torch.argsort(loss_rows, descending=True)
    assert top_loss == set(order[:k].tolist())

    # Constant reference NLL per row, chosen so that the excess (router NLL - reference) of a row is
    # its loss rank (0 = highest loss): the hardest rows by excess are the easiest rows by loss.
    rank = torch.empty(B)
    rank[order] = torch.arange(B, dtype=torch.float32)
    reference = (loss_rows - rank)[:, None].expand(B, T - 1).contiguous()
    by_excess = cggr_for(model, k, ExcessLossRows(RouterSettings(layers=1, token_stride=1)))
    excess_rows, _ = by_excess._score_rows(ids, labels, mask, {}, reference)
    torch.testing.assert_close(excess_rows, rank, rtol=0, atol=1e-4)
    with torch.no_grad():
        loss = by_excess(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    top_excess = set(by_excess.selected_rows.tolist())
    assert top_excess == set(order[-k:].tolist()) and not top_excess & top_loss
    # and the loss is the plain model's on exactly those rows
    rows = sorted(top_excess)
    with torch.no_grad():
        plain = model(ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
    torch.testing.assert_close(loss, plain)


def test_importance_with_excess_loss_scoring():
    """Importance sampling driven by the router's excess loss, as selection='importance',
    scoring='excess_loss' ran before the policies moved to cggr.experimental (HalfHardestRows kept it too)."""
    model = llama()
    ids, labels, mask = padded_batch()
    labels[5, 3:7] = ids[5, 3:7]   # score every row here
    reference = torch.rand(B, T - 1, generator=torch.Generator().manual_seed(2)) * 4
    imp = cggr_for(model, 2, importance(scoring="excess_loss"))
    assert imp.policy.needs_reference_nll and imp.policy.scoring == "excess_loss"
    excess = cggr_for(model, 2, ExcessLossRows(ROUTER))
    torch.testing.assert_close(imp._score_rows(ids, labels, mask, {}, reference)[0],
                               excess._score_rows(ids, labels, mask, {}, reference)[0])
    with torch.no_grad():
        assert torch.isfinite(imp(ids, labels=labels, attention_mask=mask, reference_nll=reference))
    with pytest.raises(ValueError, match="reference_nll"):
        imp(ids, labels=labels, attention_mask=mask)


# -- (e) reference_filter: the reference as a domain filter, no router ---------------------------------

def reference_row_means_float64(reference, labels, mask):
    """Mean reference NLL over each row's scored shifted targets (float64), NaN for a row with none."""
    valid = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    out = torch.full((len(labels),), math.nan, dtype=torch.float64)
    for i in range(len(labels)):
        if valid[i].any():
            out[i] = reference[i].double()[valid[i]].mean()
    return out


def test_reference_row_means_match_float64():
    ids, labels, mask = padded_batch()
    for seed in range(3):
        reference = torch.rand(B, T - 1, generator=torch.Generator().manual_seed(seed)) * 8
        got = reference_row_means(reference, labels, mask)
        want = reference_row_means_float64(reference, labels, mask)
        assert got.dtype == torch.float32 and torch.isnan(got[5]) and torch.isnan(want[5])
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)


def _in_domain_reference(in_domain):
    """Reference NLL 1.0 on the rows of ``in_domain`` and 5.0 elsewhere, with noise that no masked
    token can move across the threshold of 3.0 (padding and -100 targets get 100: never read)."""
    ids, labels, mask = padded_batch()
    reference = torch.full((B, T - 1), 5.0)
    reference[list(in_domain)] = 1.0
    reference += 0.1 * torch.rand(B, T - 1, generator=torch.Generator().manual_seed(1))
    valid = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    return ids, labels, mask, torch.where(valid, reference, torch.full_like(reference, 100.0))


def _selections(m, k, ids, labels, mask, reference, draws=60):
    """The rows a reference policy picks in ``draws`` calls, as sets (each k distinct rows, ascending)."""
    for _ in range(draws):
        with torch.no_grad():
            m(ids, labels=labels, attention_mask=mask, reference_nll=reference)
        rows = m.selected_rows.tolist()
        assert len(rows) == k == len(set(rows)) and rows == sorted(rows)
        yield set(rows)


@pytest.mark.parametrize("in_domain,k", [({0, 3}, 4), ({1, 2, 3, 4}, 2), ({2}, 1), (set(), 3)])
def test_reference_filter_takes_in_domain_rows_first_then_random(in_domain, k):
    model = llama()
    ids, labels, mask, reference = _in_domain_reference(in_domain)
    m = cggr_for(model, k, ReferenceFilter(3.0), seed=7)
    assert m.router is None  # no router pass: the reference is the whole signal
    seen = set()
    for rows in _selections(m, k, ids, labels, mask, reference):
        if len(in_domain) >= k:
            assert rows <= in_domain
        else:
            assert in_domain <= rows
        seen |= rows
    # the rest is random: over many draws every candidate row is picked (row 5 has nothing scored: NaN
    # mean, never in-domain, still a filler candidate)
    assert seen == (in_domain if len(in_domain) >= k else set(range(B)))


def _ranked_reference(row_levels):
    """Reference NLL whose mean over each row's scored targets is exactly ``row_levels[row]`` (constant per
    row; padding and -100 targets get 100: never read). Row 5 has nothing scored (NaN mean)."""
    ids, labels, mask = padded_batch()
    reference = torch.tensor(row_levels, dtype=torch.float32)[:, None].expand(B, T - 1).clone()
    valid = (labels[:, 1:] != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    return ids, labels, mask, torch.where(valid, reference, torch.full_like(reference, 100.0))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_reference_ranked_takes_in_domain_rows_lowest_first_then_random(k):
    # row means 2.5, 0.5, 9, 1.5, 2.9, (row 5: nothing scored); threshold 3: rows 1, 3, 0, 4 pass, in that order
    ids, labels, mask, reference = _ranked_reference([2.5, 0.5, 9.0, 1.5, 2.9, 0.1])
    means = reference_row_means(reference, labels, mask)
    torch.testing.assert_close(means[:5], torch.tensor([2.5, 0.5, 9.0, 1.5, 2.9]))
    assert torch.isnan(means[5])
    model = llama()
    m = cggr_for(model, k, ReferenceRanked(threshold=3.0), seed=11)
    assert m.router is None
    ranked = [1, 3, 0, 4]
    seen = set()
    for rows in _selections(m, k, ids, labels, mask, reference):
        assert set(ranked[:k]) <= rows  # the lowest in-domain rows, whatever the draw
        seen |= rows - set(ranked)
    # the filler (k = 5: one row) is random among the rows that did not pass: row 2 (mean 9) and row 5 (NaN)
    assert seen == ({2, 5} if k > 4 else set())


def test_reference_policies_need_their_threshold():
    for cls in (ReferenceFilter, ReferenceRanked):
        with pytest.raises(TypeError, match="threshold"):
            cls()
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            cls(None)
        assert cls(3).threshold == 3.0 and cls(3) == cls(3.0) and cls(3) != cls(2.5)
    assert ReferenceFilter(3.0) != ReferenceRanked(3.0)


def test_reference_filter_loss_is_the_models_loss_on_its_rows():
    model = llama()
    ids, labels, mask, reference = _in_domain_reference({1, 4})
    m = cggr_for(model, 2, ReferenceFilter(3.0))
    loss = m(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    assert m.selected_rows.tolist() == [1, 4]
    plain = model(ids[[1, 4]], attention_mask=mask[[1, 4]], labels=labels[[1, 4]]).loss
    torch.testing.assert_close(loss, plain)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_reference_filter_bad_input():
    model = llama()
    ids, labels, mask, reference = _in_domain_reference({0})
    with pytest.raises(TypeError):
        RandomRows(3.0)  # a threshold belongs to the reference policies only
    for bad in (float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            ReferenceFilter(bad)
    m = cggr_for(model, 2, ReferenceFilter(3))
    assert m.router is None
    with pytest.raises(ValueError, match=r"reference_nll: ReferenceFilter\(threshold=3.0\) ranks rows by a reference"):
        m(ids, labels=labels, attention_mask=mask)
    with pytest.raises(ValueError, match=r"reference_nll: expected a tensor of shape \(6, 8\).*\(6, 9\)"):
        m(ids, labels=labels, attention_mask=mask, reference_nll=torch.zeros(B, T))
    with pytest.raises(ValueError, match=r"reference_nll was given, but RandomRows\(\) does not use it"):
        cggr_for(model, 2, RandomRows())(ids, labels=labels, reference_nll=reference)

    class BothInputs(HardestRows):
        uses_reference_rows = True

    with pytest.raises(ValueError, match="either on router scores"):
        cggr_for(model, 2, BothInputs(router=ROUTER))


class LowestReference(RowPolicy):
    """A custom policy on the reference's row means: the k lowest (NaN last); records what it got."""
    uses_reference_rows = True

    def __init__(self):
        self.got = []

    def select(self, row_reference, k, generator):
        self.got.append(row_reference.clone())
        scores = torch.where(torch.isnan(row_reference), math.inf, row_reference)
        return RowSelection(torch.sort(torch.topk(-scores, k).indices).values, None)


def test_custom_reference_policy_gets_row_means():
    model = llama()
    ids, labels, mask, reference = _in_domain_reference({2, 3})
    policy = LowestReference()
    m = cggr_for(model, 2, policy)
    assert m.router is None and m.policy.needs_reference_nll
    with torch.no_grad():
        m(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    assert m.selected_rows.tolist() == [2, 3]
    assert len(policy.got) == 1
    torch.testing.assert_close(policy.got[0].double(), reference_row_means_float64(reference, labels, mask),
                               equal_nan=True)
    with pytest.raises(ValueError, match=r"reference_nll: LowestReference\(.*\) ranks rows"):
        m(ids, labels=labels, attention_mask=mask)


class UnderThresholdFirst(RowPolicy):
    """A custom policy holding its own parameter (a threshold), as the built-in reference policies do."""
    uses_reference_rows = True

    def __init__(self, threshold):
        self.threshold = threshold
        self.seen = []

    def select(self, row_reference, k, generator):
        self.seen.append(self.threshold)
        keys = torch.where(row_reference <= self.threshold, 1.0, 0.0) + torch.arange(row_reference.numel()) * 1e-3
        return RowSelection(torch.sort(torch.topk(keys, k).indices).values, None)


def test_custom_policy_holds_its_own_parameters():
    model = llama()
    ids, labels, mask, reference = _in_domain_reference({0, 4})
    m = cggr_for(model, 2, UnderThresholdFirst(3.0))
    with torch.no_grad():
        m(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    assert m.policy.seen == [3.0] and m.selected_rows.tolist() == [0, 4]
    # the same policy with a threshold under every row's mean: no row passes, the highest indices win
    low = cggr_for(model, 2, UnderThresholdFirst(0.5))
    with torch.no_grad():
        low(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    assert low.selected_rows.tolist() == [4, 5]


def test_selected_rows_are_the_rows_that_carry_the_loss():
    """selected_rows names exactly the rows the loss is computed on; None once every row trains."""
    model = llama()
    ids, labels, mask = padded_batch()
    m = CGGRModel(model, min_tokens_ratio=2 / B, warmup_steps=0, policy=RandomRows(), seed=5)
    assert m.selected_rows is None  # no forward yet
    loss = m(ids, labels=labels, attention_mask=mask)
    rows = m.selected_rows
    assert rows.shape == (2,) and rows.dtype == torch.int64
    expected = model(ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
    torch.testing.assert_close(loss, expected)
    full = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0, policy=RandomRows())
    full(ids, labels=labels, attention_mask=mask)
    assert full.selected_rows is None
