"""CGGRModel.select_rows (choose without training) and forward(rows=...), and num_items_in_batch on every
loss path."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cggr import CGGRModel, ExcessLossRows, HardestRows, RandomRows, RouterSettings, StepOptions
from cggr.experimental import ImportanceRows

V, B, T = 48, 6, 10


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _batch():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, V, (B, T), generator=g), torch.rand(B, T - 1, generator=g)


@pytest.mark.parametrize("policy", [RandomRows(), HardestRows(router=RouterSettings(layers=1)),
                                    ExcessLossRows(RouterSettings(layers=2, token_stride=2))], ids=repr)
def test_select_then_forward_equals_forward(policy):
    ids, ref = _batch()
    kwargs = {"reference_nll": ref} if policy.needs_reference_nll else {}
    a = CGGRModel(_model(), policy=policy, min_tokens_ratio=0.5, warmup_steps=0, seed=1)
    b = CGGRModel(_model(), policy=policy, min_tokens_ratio=0.5, warmup_steps=0, seed=1)
    selection = a.select_rows(ids, ids, **kwargs)
    assert selection.indices.shape == (3,)
    assert (a.last_row_values is None) == (not policy.uses_router)
    loss_a = a(ids, labels=ids, rows=selection, **kwargs)
    loss_b = b(ids, labels=ids, **kwargs)
    assert torch.equal(loss_a, loss_b) and torch.equal(a.selected_rows, b.selected_rows)


def test_select_rows_keeps_every_row_at_ratio_one_and_checks_its_input():
    m = CGGRModel(_model(), min_tokens_ratio=1.0, warmup_steps=0)
    ids, ref = _batch()
    assert m.select_rows(ids, ids) is None
    with pytest.raises(ValueError, match="labels: expected shape"):
        m.select_rows(ids, ids[:, 1:])
    with pytest.raises(TypeError, match="rows must be 'policy', a RowSelection or None"):
        m(ids, labels=ids, rows=torch.tensor([0, 1]))


@pytest.mark.parametrize("options, policy", [(StepOptions(), RandomRows()),
                                             (StepOptions(loss_impl="fused"), RandomRows()),
                                             (StepOptions(), ImportanceRows(router=RouterSettings(layers=1))),
                                             (StepOptions(forward_impl="trunk"), RandomRows())],
                         ids=["model", "fused", "weighted", "trunk"])
def test_num_items_in_batch_is_the_divisor_on_every_path(options, policy):
    """The loss is sum(nll over trained targets) / num_items_in_batch, whatever path computes it."""
    ids, _ = _batch()
    m = CGGRModel(_model(), policy=policy, min_tokens_ratio=1.0 if policy == RandomRows() else 0.5,
                  warmup_steps=0, step_options=options)
    mean = m(ids, labels=ids)
    if m.selected_rows is None:
        n = (ids[:, 1:] != -100).sum()
        expected = mean * n / 1000
        assert torch.allclose(m(ids, labels=ids, num_items_in_batch=torch.tensor(1000)), expected, rtol=1e-5)
    else:  # importance sampling: divisor = the batch's targets by default, num_items_in_batch when given
        n_total = (ids[:, 1:] != -100).sum()
        m2 = CGGRModel(_model(), policy=policy, min_tokens_ratio=0.5, warmup_steps=0, step_options=options)
        got = m2(ids, labels=ids, num_items_in_batch=torch.tensor(1000))
        assert torch.allclose(got, mean * n_total / 1000, rtol=1e-5)


def test_eval_mode_is_the_model_loss_over_every_row_and_draws_nothing():
    ids, _ = _batch()
    model = _model()
    m = CGGRModel(model, policy=RandomRows(), min_tokens_ratio=0.5, warmup_steps=0)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(ids, labels=ids), model(input_ids=ids, labels=ids).loss)
    assert m._calls_in_step == 0 and m.selected_rows is None


def test_forward_with_rows_checks_them_and_keeps_the_ratio_select_rows_used():
    from cggr import RatioSchedule
    from cggr.policies import RowSelection

    ids, _ = _batch()
    m = CGGRModel(_model(), policy=HardestRows(router=RouterSettings(layers=1)),
                  schedule=RatioSchedule(0.25, 0, dynamic_threshold=True))
    selection = m.select_rows(ids, ids)
    used = m._ratio
    m(ids, labels=ids, rows=selection)
    assert m.get_metrics()["row_ratio"] == used and "avg_confidence" in m.get_metrics()
    for bad in (RowSelection(torch.tensor([0, 9]).int(), None), RowSelection(torch.arange(B + 1), None),
                RowSelection(torch.tensor([1, 2]), torch.ones(3))):
        with pytest.raises(ValueError, match=r"rows: RowSelection\."):
            m(ids, labels=ids, rows=bad)


def test_fused_num_items_with_rows_dropped():
    """With rows dropped, the fused loss is sum(nll over the trained targets) / num_items_in_batch."""
    ids, _ = _batch()
    a = CGGRModel(_model(), policy=RandomRows(), min_tokens_ratio=0.5, warmup_steps=0, seed=2,
                  step_options=StepOptions(loss_impl="fused"))
    b = CGGRModel(_model(), policy=RandomRows(), min_tokens_ratio=0.5, warmup_steps=0, seed=2,
                  step_options=StepOptions(loss_impl="fused"))
    mean = a(ids, labels=ids)
    n = a.get_metrics()["tokens_selected"]
    got = b(ids, labels=ids, num_items_in_batch=torch.tensor(100))
    assert torch.equal(a.selected_rows, b.selected_rows)
    assert torch.allclose(got, mean * n / 100, rtol=1e-5)


def test_fused_loss_refuses_an_moe_load_balancing_loss():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                           num_experts_per_tok=1, output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        CGGRModel(MixtralForCausalLM(config), step_options=StepOptions(loss_impl="fused"))


def test_legacy_calls_that_0_6_cannot_reproduce_are_refused():
    from cggr import RatioSchedule

    with pytest.raises(ValueError, match="not both"):
        CGGRModel(_model(), schedule=RatioSchedule(0.5, 0), min_tokens_ratio=0.1, selection="hardest",
                  router_layers=1)
    with pytest.raises(ValueError, match="takes no token scoring"):
        CGGRModel(_model(), selection="random", scoring="entropy", loss_impl="fused", token_ratio=0.5)
    with pytest.raises(ValueError, match="takes no token scoring"):
        CGGRModel(_model(), selection="random", scoring="excess_loss")


@pytest.mark.parametrize("policy", [RandomRows(), ImportanceRows(router=RouterSettings(layers=1))], ids=repr)
def test_trained_targets_is_the_count_the_loss_is_divided_by(policy):
    """The accumulation recipe (num_items_in_batch = trained_targets) reproduces the loss without it: the
    selected rows' targets, or the whole batch's for a weighted loss_norm='batch' selection."""
    ids, _ = _batch()
    labels = ids.clone()
    labels[0, 3:] = -100  # rows with different target counts
    labels[4, :7] = -100
    a = CGGRModel(_model(), policy=policy, min_tokens_ratio=0.5, warmup_steps=0, seed=2)
    b = CGGRModel(_model(), policy=policy, min_tokens_ratio=0.5, warmup_steps=0, seed=2)
    rows = a.select_rows(ids, labels)
    n = a.trained_targets(labels, rows)
    if policy.loss_norm == "batch":
        assert int(n) == int((labels[:, 1:] != -100).sum())
    else:
        assert int(n) == int((labels[rows.indices, 1:] != -100).sum())
    got = a(ids, labels=labels, rows=rows, num_items_in_batch=n)
    assert torch.allclose(got, b(ids, labels=labels), rtol=1e-6)
    assert a.trained_targets(labels, None) == (labels[:, 1:] != -100).sum()
