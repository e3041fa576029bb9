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
