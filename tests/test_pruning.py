"""ConfidenceGatedSampler / ConfidenceGate / gated_causal_lm_loss (cggr.pruning) on the CPU."""
import math
import re

import pytest
import torch

from cggr import ConfidenceGate, ConfidenceGatedSampler
from cggr.pruning import gated_causal_lm_loss


def trained(sampler, scores):
    """Every row trained once with these losses."""
    sampler.update(torch.arange(len(scores)), torch.as_tensor(scores, dtype=torch.float32))


def test_first_pass_keeps_every_row_with_weight_one():
    s = ConfidenceGatedSampler(10, num_epochs=4, seed=1)
    s.set_epoch(0)
    assert sorted(s) == list(range(10))
    assert torch.equal(s.weights(torch.arange(10)), torch.ones(10))


def test_well_fit_rows_are_pruned_and_the_kept_ones_upweighted():
    n = 2000
    s = ConfidenceGatedSampler(n, num_epochs=8, gate=ConfidenceGate(prune_ratio=0.5, anneal=0.125), seed=3)
    losses = torch.rand(n, generator=torch.Generator().manual_seed(0))
    trained(s, losses)
    s.set_epoch(1)
    kept = torch.tensor(sorted(s))
    well_fit = losses.double() < losses.double().mean()
    assert torch.isin(torch.nonzero(~well_fit).flatten(), kept).all()  # rows above the mean always stay
    kept_fit = int(well_fit[kept].sum())
    assert abs(kept_fit / int(well_fit.sum()) - 0.5) < 0.05  # about half of the well-fit rows stay
    w = s.weights(kept)
    assert torch.equal(w, torch.where(well_fit[kept], 2.0, 1.0).float())
    assert s.pass_stats()["rows_pruned"] == n - len(kept)


def test_the_kept_rows_estimate_the_full_sum_without_bias():
    """E[sum over kept rows of w_i x_i] = sum of x_i over every row: averaged over 400 draws (seeds)."""
    n = 200
    g = torch.Generator().manual_seed(1)
    losses, x = torch.rand(n, generator=g), torch.randn(n, generator=g) + 2
    estimates = []
    for seed in range(400):
        s = ConfidenceGatedSampler(n, num_epochs=10, gate=ConfidenceGate(prune_ratio=0.7, anneal=0.0), seed=seed)
        trained(s, losses)
        s.set_epoch(1)
        kept = torch.tensor(list(s))
        estimates.append(float((s.weights(kept) * x[kept]).sum()))
    mean = sum(estimates) / len(estimates)
    spread = (sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)) ** 0.5 / len(estimates) ** 0.5
    assert abs(mean - float(x.sum())) < 4 * spread


def test_the_annealing_tail_trains_every_row():
    s = ConfidenceGatedSampler(50, num_epochs=8, gate=ConfidenceGate(prune_ratio=0.9, anneal=0.25))
    trained(s, torch.linspace(0, 1, 50))
    s.set_epoch(5)
    assert len(s) < 50 and not s.pass_stats()["full_pass"]
    for epoch in (6, 7):
        s.set_epoch(epoch)
        assert sorted(s) == list(range(50)) and s.pass_stats()["full_pass"]
        assert torch.equal(s.weights(torch.arange(50)), torch.ones(50))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_share_the_kept_rows(drop_last):
    samplers = [ConfidenceGatedSampler(31, 4, num_replicas=3, rank=r, seed=5, drop_last=drop_last) for r in range(3)]
    for s in samplers:
        trained(s, torch.linspace(0, 1, 31))
        s.set_epoch(1)
    parts = [list(s) for s in samplers]
    assert len({len(p) for p in parts}) == 1
    single = ConfidenceGatedSampler(31, 4, seed=5)
    trained(single, torch.linspace(0, 1, 31))
    single.set_epoch(1)
    kept = set(single)
    union = [i for p in parts for i in p]
    if drop_last:
        assert len(union) == len(kept) - len(kept) % 3 and set(union) <= kept
    else:
        assert set(union) == kept and len(union) == math.ceil(len(kept) / 3) * 3


def test_unknown_and_non_finite_scores():
    s = ConfidenceGatedSampler(6, num_epochs=4, gate=ConfidenceGate(prune_ratio=0.99, anneal=0.0), seed=0)
    s.update(torch.tensor([0, 1, 2]), torch.tensor([0.1, 5.0, math.nan]))
    assert torch.isnan(s.scores[2]) and torch.isnan(s.scores[3])  # NaN loss: the row keeps its unknown score
    s.set_epoch(1)
    kept = set(s)
    assert {1, 2, 3, 4, 5} <= kept  # above the mean, or never scored: never pruned


def test_resume_mid_pass_iterates_the_same_order():
    a = ConfidenceGatedSampler(40, num_epochs=5, seed=9)
    trained(a, torch.rand(40, generator=torch.Generator().manual_seed(2)))
    a.set_epoch(2)
    order = list(a)
    a.update(torch.tensor(order[:5]), torch.zeros(5))  # the pass goes on: scores change
    state = a.state_dict()
    b = ConfidenceGatedSampler(40, num_epochs=5, seed=9)
    b.load_state_dict(state)
    assert list(b) == order and b.epoch == 2
    assert torch.equal(b.scores, a.scores) and torch.equal(b.weights(torch.arange(40)), a.weights(torch.arange(40)))
    with pytest.raises(ValueError, match="saved with gate, num_epochs, seed"):
        ConfidenceGatedSampler(40, num_epochs=6, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="scores of 40 rows, this sampler has 41"):
        ConfidenceGatedSampler(41, num_epochs=5, seed=9).load_state_dict(state)


def test_pass_stats_report_a_full_pass_decided_by_set_epoch():
    """set_epoch(..., full_pass=) overrides the annealing tail: pass_stats and a restored state say so."""
    s = ConfidenceGatedSampler(50, num_epochs=10, gate=ConfidenceGate(prune_ratio=0.9, anneal=0.2))
    s.set_epoch(0, full_pass=True)
    assert s.pass_stats()["full_pass"]
    trained(s, torch.linspace(0, 1, 50))
    s.set_epoch(9, full_pass=False)  # in the tail by the epochs, drawn pruned
    assert len(s) < 50 and not s.pass_stats()["full_pass"]
    s.set_epoch(1, full_pass=True)
    assert len(s) == 50 and s.pass_stats()["full_pass"]
    restored = ConfidenceGatedSampler(50, num_epochs=10, gate=ConfidenceGate(prune_ratio=0.9, anneal=0.2))
    restored.load_state_dict(s.state_dict())
    assert restored.pass_stats()["full_pass"]


def test_bad_settings_and_inputs():
    with pytest.raises(ValueError, match=r"ConfidenceGate.prune_ratio must be a number in \[0, 1\), got 1.0"):
        ConfidenceGate(prune_ratio=1.0)
    with pytest.raises(ValueError, match=r"ConfidenceGate.anneal must be a number in \[0, 1\], got 2"):
        ConfidenceGate(anneal=2)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
        ConfidenceGatedSampler(0, 3)
    with pytest.raises(TypeError, match="gate must be a cggr.ConfidenceGate, got float"):
        ConfidenceGatedSampler(5, 3, gate=0.5)
    s = ConfidenceGatedSampler(5, 3)
    with pytest.raises(ValueError, match=r"indices: dataset indices must be in \[0, 5\), got 0..7"):
        s.update(torch.tensor([0, 7]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"row_losses: expected a tensor of shape \(2,\)"):
        s.update(torch.tensor([0, 1]), torch.zeros(3))
    with pytest.raises(ValueError, match="indices: expected a 1-D int64 tensor"):
        s.weights(torch.tensor([0.0, 1.0]))


def test_gated_loss_with_unit_weights_is_the_models_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 40, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, :] = -100  # a row without targets: NaN row loss, no contribution
    out = model(input_ids=ids, labels=labels)
    loss, row_nll = gated_causal_lm_loss(out.logits, labels, torch.ones(3))
    torch.testing.assert_close(loss, out.loss)
    assert torch.isnan(row_nll[2]) and torch.isfinite(row_nll[:2]).all()
    single = model(input_ids=ids[1:2], labels=labels[1:2]).loss
    torch.testing.assert_close(row_nll[1], single)
    # weights: row 0 counts twice (as two copies of it would)
    doubled, _ = gated_causal_lm_loss(out.logits, labels, torch.tensor([2.0, 1.0, 1.0]))
    copies = model(input_ids=torch.cat([ids[:1], ids[:2]]), labels=torch.cat([labels[:1], labels[:2]])).loss
    torch.testing.assert_close(doubled, copies)


@pytest.mark.parametrize("shape", [(3, 1), (1,), (4,), ()])
def test_gated_loss_checks_the_row_weight_shape(shape):
    """A [3, 1] or [1] weight would broadcast against the [3] target counts: refused, as is a wrong length."""
    logits, labels = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    with pytest.raises(ValueError, match=rf"row_weight: expected a tensor of shape \(3,\) .*got {re.escape(str(shape))}"):
        gated_causal_lm_loss(logits, labels, torch.ones(shape))
    with pytest.raises(ValueError, match=r"row_weight: expected a tensor of shape \(3,\) .*got list"):
        gated_causal_lm_loss(logits, labels, [1.0, 1.0, 1.0])


def test_stream_epochs_have_a_fixed_length_and_more_passes():
    from cggr.pruning import ConfidenceGatedStream

    n = 20
    stream = ConfidenceGatedStream(n, num_epochs=4, gate=ConfidenceGate(prune_ratio=0.6, anneal=0.25), seed=2)
    losses = torch.rand(n, generator=torch.Generator().manual_seed(3))
    seen = []
    for epoch in range(4):
        stream.set_epoch(epoch)
        pairs = list(stream)
        assert len(pairs) == len(stream) == n  # the Trainer's epoch: n rows, whatever the passes
        for index, weight in pairs:
            stream.update(torch.tensor([index]), losses[index:index + 1])
        seen.append(pairs)
    assert stream.pass_index >= 4  # 5+ passes in 4 epochs of rows: pruned passes are shorter
    assert {w for _, w in seen[0]} == {1.0}  # the first pass: nothing known, every row, weight 1
    assert {round(w, 4) for pairs in seen[1:3] for _, w in pairs} == {1.0, 2.5}  # kept well-fit rows: 1 / (1 - 0.6)
    assert {w for _, w in seen[3][-5:]} == {1.0}  # the tail (last quarter of the stream): full passes


@pytest.mark.parametrize("epochs,anneal,first_full", [(10, 0.7, 3), (10, 0.3, 7), (8, 0.125, 7), (3, 1.0, 0),
                                                      (5, 0.0, 5)])
def test_the_annealing_tail_is_the_last_share_of_the_passes(epochs, anneal, first_full):
    """The tail starts at pass ceil(E * (1 - anneal)) computed exactly (no float off-by-one)."""
    gate = ConfidenceGate(prune_ratio=0.5, anneal=anneal)
    assert [e for e in range(epochs) if gate.full_pass(e, epochs)] == list(range(first_full, epochs))
