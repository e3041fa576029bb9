"""Row policies of CGGRModel: importance sampling (unbiased full-batch estimator) and excess-loss rows."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from cggr.model import ROW_POLICIES, CGGRModel, importance_probabilities, register_row_policy

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


def cggr_for(model, k, **kw):
    kw.setdefault("selection", "importance")
    return CGGRModel(model, min_tokens_ratio=k / B, warmup_steps=0, router_layers=1, **kw)


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

    cggr = cggr_for(model, 1, importance_mix=mix, importance_temperature=temperature)
    row_scores, _ = cggr._score_rows(ids, labels, mask, {}, None)
    assert row_scores[5] == -math.inf and torch.isfinite(row_scores[:5]).all()
    p = expected_p(row_scores, mix, temperature)
    torch.testing.assert_close(importance_probabilities(row_scores, mix, temperature).double(), p,
                               rtol=1e-5, atol=1e-7)

    # Enumerate the outcomes of k=1 through the real forward: reseed until every row was drawn once.
    losses, grads = {}, {}
    gen = cggr._generator(ids.device)
    for seed in range(5000):
        gen.manual_seed(seed)
        model.zero_grad()
        loss = cggr(ids, labels=labels, attention_mask=mask)
        row = int(cggr._last["rows"].item())
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
    cggr = cggr_for(model, 2, importance_temperature=0.3)
    row_scores, _ = cggr._score_rows(ids, labels, mask, {}, None)
    p = expected_p(row_scores, 0.9, 0.3)
    with torch.no_grad():
        c, n_total = row_losses(model, ids, labels, mask)
    gen = cggr._generator(ids.device)
    seen_duplicate = seen_distinct = False
    for seed in range(200):
        gen.manual_seed(seed)
        with torch.no_grad():
            loss = cggr(ids, labels=labels, attention_mask=mask)
        rows = cggr._last["rows"].tolist()
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
    fused = cggr_for(model, 2, seed=7, loss_impl="fused")
    for _ in range(3):
        with torch.no_grad():
            la = a(ids, labels=labels, attention_mask=mask)
            lb = b(ids, labels=labels, attention_mask=mask)
            lf = fused(ids, labels=labels, attention_mask=mask)
        assert torch.equal(a._last["rows"], b._last["rows"]) and torch.equal(a._last["rows"], fused._last["rows"])
        assert la.item() == lb.item()
        torch.testing.assert_close(lf, la, rtol=1e-4, atol=1e-5)


# -- (b) the sampling distribution -----------------------------------------------------------------

def test_importance_draw_frequencies_follow_p():
    select = ROW_POLICIES["importance"].select
    scores = torch.tensor([0.5, 2.0, -math.inf, 1.0, 0.0, 3.0])
    gen = torch.Generator().manual_seed(0)
    mix, temperature, k, calls = 0.7, 1.5, 5, 2000
    p = expected_p(scores, mix, temperature)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(calls):
        sel = select(scores, k, gen, mix=mix, temperature=temperature)
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
    select = ROW_POLICIES["importance"].select
    # nothing scored: uniform whatever mix
    p = importance_probabilities(torch.full((4,), -math.inf), mix=1.0)
    torch.testing.assert_close(p, torch.full((4,), 0.25))
    # mix = 0: uniform; mix = 1 never draws an unscored row
    torch.testing.assert_close(importance_probabilities(torch.tensor([5.0, -1.0, -math.inf]), mix=0.0),
                               torch.full((3,), 1 / 3))
    scores = torch.tensor([1.0, -math.inf, 0.0, -math.inf])
    for _ in range(200):
        assert not set(select(scores, 3, gen, mix=1.0).indices.tolist()) & {1, 3}
    # temperature -> small: all mass on the best scored row
    p = importance_probabilities(torch.tensor([1.0, 3.0, 2.0]), mix=1.0, temperature=1e-3)
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, 0.0]))
    assert ROW_POLICIES["importance"].loss_norm == "batch" and ROW_POLICIES["hardest"].loss_norm == "selected"


# -- (c) options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"importance_mix": -0.1}, "importance_mix"), ({"importance_mix": 1.5}, "importance_mix"),
    ({"importance_mix": float("nan")}, "importance_mix"), ({"importance_mix": "0.5"}, "importance_mix"),
    ({"importance_mix": True}, "importance_mix"),
    ({"importance_temperature": 0.0}, "importance_temperature"),
    ({"importance_temperature": -1.0}, "importance_temperature"),
    ({"importance_temperature": float("inf")}, "importance_temperature"),
    ({"importance_temperature": float("nan")}, "importance_temperature"),
    ({"importance_temperature": None}, "importance_temperature"),
])
def test_bad_importance_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        cggr_for(llama(), 2, **kw)


def test_importance_rejects_token_ratio_and_bad_loss_norm():
    with pytest.raises(ValueError, match="token_ratio < 1"):
        cggr_for(llama(), 2, loss_impl="fused", token_ratio=0.5)
    with pytest.raises(ValueError, match="loss_norm"):
        register_row_policy("test_bad_norm", ROW_POLICIES["hardest"].select, loss_norm="tokens")
    cggr_for(llama(), 2, importance_mix=0, importance_temperature=3)   # ints are fine; bounds inclusive
    cggr_for(llama(), 2, importance_mix=1.0)


# -- (d) excess_loss end to end --------------------------------------------------------------------

def test_excess_loss_hardest_flips_the_loss_ranking():
    model = llama()
    ids, labels, mask = padded_batch()
    labels[5, 3:7] = ids[5, 3:7]   # score every row here
    k = 2
    by_loss = cggr_for(model, k, selection="hardest", scoring="loss")
    loss_rows, _ = by_loss._score_rows(ids, labels, mask, {}, None)
    assert torch.isfinite(loss_rows).all()
    with torch.no_grad():
        by_loss(ids, labels=labels, attention_mask=mask)
    top_loss = set(by_loss._last["rows"].tolist())
    order = torch.argsort(loss_rows, descending=True)
    assert top_loss == set(order[:k].tolist())

    # Constant reference NLL per row, chosen so that the excess (router NLL - reference) of a row is
    # its loss rank (0 = highest loss): the hardest rows by excess are the easiest rows by loss.
    rank = torch.empty(B)
    rank[order] = torch.arange(B, dtype=torch.float32)
    reference = (loss_rows - rank)[:, None].expand(B, T - 1).contiguous()
    by_excess = cggr_for(model, k, selection="hardest", scoring="excess_loss")
    excess_rows, _ = by_excess._score_rows(ids, labels, mask, {}, reference)
    torch.testing.assert_close(excess_rows, rank, rtol=0, atol=1e-4)
    with torch.no_grad():
        loss = by_excess(ids, labels=labels, attention_mask=mask, reference_nll=reference)
    top_excess = set(by_excess._last["rows"].tolist())
    assert top_excess == set(order[-k:].tolist()) and not top_excess & top_loss
    # and the loss is the plain model's on exactly those rows
    rows = sorted(top_excess)
    with torch.no_grad():
        plain = model(ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
    torch.testing.assert_close(loss, plain)
    # excess_loss with importance sampling runs too (the router's excess drives p)
    imp = cggr_for(model, k, scoring="excess_loss")
    with torch.no_grad():
        assert torch.isfinite(imp(ids, labels=labels, attention_mask=mask, reference_nll=reference))
