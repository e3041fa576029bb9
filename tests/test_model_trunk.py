"""ModelTrunk and CGGRModel(step_options=StepOptions(forward_impl='trunk')): the model's own modules in the
order of its forward, so the logits, the loss and the gradients equal the model's own forward (in eval and in
training mode, dropout included). The GPU check that it issues no host synchronisation is in
tests/gpu/test_model_cuda.py."""
import pytest
import torch

from cggr.experimental import ImportanceRows
from cggr.model import CGGRModel
from cggr.options import StepOptions
from cggr.policies import HardestRows, RandomRows, RouterSettings
from cggr.router import ModelTrunk

from test_router import ALL_FAMILIES, VOCAB, tiny_model  # tests/ is on sys.path (rootdir conftest)

DROPOUT = {  # every dropout the family's forward applies, at 0.3
    "llama": dict(attention_dropout=0.3),
    "mistral": dict(attention_dropout=0.3),
    "qwen2": dict(attention_dropout=0.3),
    "qwen3": dict(attention_dropout=0.3),
    "gpt2": dict(embd_pdrop=0.3, resid_pdrop=0.3, attn_pdrop=0.3),
    "gpt_neox": dict(hidden_dropout=0.3, attention_dropout=0.3),
}


def padded_batch(B=6, T=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[4, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, labels, mask


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_trunk_logits_equal_the_model_logits(family, padded):
    model = tiny_model(family, layers=3)
    ids, _, mask = padded_batch()
    mask = mask if padded else None
    trunk = ModelTrunk(model)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = trunk.head()(trunk(ids, mask))
    rows = mask.bool() if padded else torch.ones_like(ids, dtype=torch.bool)  # pads' outputs are unspecified
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trunk_applies_the_same_dropout_in_training(family):
    """Same RNG state, same dropout masks: the trunk draws them in the order of the model's forward."""
    model = tiny_model(family, layers=2, **DROPOUT[family]).train()
    ids, _, _ = padded_batch()
    assert_trunk_draws_the_model_dropout(model, ids)


def assert_trunk_draws_the_model_dropout(model, ids):
    """Under one RNG state the trunk's logits equal the model's (same dropout masks); under another they
    differ (dropout is really on)."""
    trunk = ModelTrunk(model)
    torch.manual_seed(7)
    expected = model(ids).logits
    torch.manual_seed(7)
    got = trunk.head()(trunk(ids))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(8)
    assert not torch.allclose(trunk.head()(trunk(ids)), expected, atol=1e-3)


def test_trunk_takes_position_ids_and_token_type_ids_like_the_model():
    model = tiny_model("gpt2", layers=2)
    ids, _, _ = padded_batch()
    types = torch.randint(0, 3, ids.shape)
    positions = torch.arange(3, 3 + ids.shape[1]).expand_as(ids)
    trunk = ModelTrunk(model)
    with torch.no_grad():
        expected = model(ids, token_type_ids=types, position_ids=positions).logits
        got = trunk.head()(trunk(ids, position_ids=positions, token_type_ids=types))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    llama = tiny_model("llama", layers=2)
    with torch.no_grad():
        expected = llama(ids, position_ids=positions).logits
        trunk = ModelTrunk(llama)
        got = trunk.head()(trunk(ids, position_ids=positions))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _loss_and_grads(family, forward_impl, padded, policy, **options):
    model = tiny_model(family, layers=3, seed=0).train()
    ids, labels, mask = padded_batch()
    m = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=policy, seed=4,
                  step_options=StepOptions(forward_impl=forward_impl, **options))
    loss = m(ids, labels=labels, attention_mask=mask if padded else None)
    loss.backward()
    return loss.detach(), m.selected_rows, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("policy,options", [(HardestRows(router=RouterSettings(layers=1)), {}),
                                            (RandomRows(), dict(loss_impl="fused")),
                                            (ImportanceRows(router=RouterSettings(layers=1)), {})],
                         ids=["hardest-model_loss", "random-fused_loss", "importance-weighted_loss"])
@pytest.mark.parametrize("padded", [False, True])
def test_cggr_model_trunk_forward_equals_the_model_forward(family, policy, options, padded):
    want_loss, want_rows, want_grads = _loss_and_grads(family, "model", padded, policy, **options)
    loss, rows, got_grads = _loss_and_grads(family, "trunk", padded, policy, **options)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads) and got_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_trunk_forward_passes_num_items_in_batch_to_the_loss():
    model = tiny_model("llama", layers=2)
    ids, labels, _ = padded_batch()
    for forward_impl in ("model", "trunk"):
        m = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0,
                      step_options=StepOptions(forward_impl=forward_impl))
        with torch.no_grad():
            loss = m(ids, labels=labels, num_items_in_batch=torch.tensor(1000))
        n_valid = (labels[:, 1:] != -100).sum()
        with torch.no_grad():
            expected = model(ids, labels=labels).loss * n_valid / 1000
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_trunk_forward_rejects_what_it_cannot_honour():
    model = tiny_model("llama", layers=2)
    ids, labels, _ = padded_batch()
    m = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=HardestRows(router=RouterSettings(layers=1)),
                  step_options=StepOptions(forward_impl="trunk"))
    with pytest.raises(ValueError, match=r"forward_impl='trunk' .* got output_attentions"):
        m(ids, labels=labels, output_attentions=True)
    with pytest.raises(ValueError, match=r"StepOptions.forward_impl must be one of \('model', 'trunk'\), got 'hf'"):
        StepOptions(forward_impl="hf")

    class UnsupportedForCausalLM(torch.nn.Module):  # a causal LM by name, of no family ModelTrunk knows
        def forward(self, input_ids, **kwargs):
            return None

    with pytest.raises(TypeError, match=r"StepOptions\(forward_impl='trunk'\): unsupported architecture "
                                        "UnsupportedForCausalLM"):
        CGGRModel(UnsupportedForCausalLM(), policy=RandomRows(), step_options=StepOptions(forward_impl="trunk"))
    with pytest.raises(TypeError, match="ModelTrunk: unsupported architecture UnsupportedForCausalLM"):
        ModelTrunk(UnsupportedForCausalLM())


def test_trunk_forward_compiles():
    """StepOptions(compile='model', forward_impl='trunk') compiles the trunk (dynamo's eager backend: the tracing,
    not inductor, is what this checks on the CPU) and keeps the loss."""
    ids, labels, _ = padded_batch()
    losses = []
    for compile in (False, "model"):
        model = tiny_model("llama", layers=2)
        options = StepOptions(forward_impl="trunk", compile=compile,
                              compile_options={"backend": "eager"} if compile else None)
        m = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=RandomRows(), seed=2, step_options=options)
        losses.append(m(ids, labels=labels))
        losses[-1].backward()
        assert model.model.layers[-1].mlp.down_proj.weight.grad is not None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
