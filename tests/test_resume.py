"""Save and resume: a CGGRModel run stopped at step k and resumed from its checkpoint (model + optimizer
state_dict, which carries ``cggr_step``) continues with the same losses, bitwise on the CPU, and a fixed
seed gives the same run twice."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cggr import CGGRModel, ExcessLossRows, RandomRows, ReferenceRanked, RouterSettings

STEPS, STOP, B, T, V = 6, 3, 8, 12, 64


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (B, T), generator=g), torch.rand(B, T - 1, generator=g) * 4) for _ in range(STEPS)]


POLICIES = {"random": lambda: RandomRows(), "ranked": lambda: ReferenceRanked(2.0),
            "excess": lambda: ExcessLossRows(RouterSettings(layers=1, token_stride=2))}


def _train(policy, steps, state=None, accumulate=1):
    model = _model()
    cggr_model = CGGRModel(model, policy=POLICIES[policy](), min_tokens_ratio=0.25, warmup_steps=4, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if state is not None:
        cggr_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    losses, rows = [], []
    for ids, ref in _batches()[cggr_model.step_count:steps]:
        for micro in range(accumulate):
            kwargs = {} if policy == "random" else {"reference_nll": ref}
            loss = cggr_model(ids, labels=ids, **kwargs)
            (loss / accumulate).backward()
            losses.append(loss.detach())
            rows.append(cggr_model.selected_rows)
        optimizer.step()
        optimizer.zero_grad()
        cggr_model.step()
    return losses, rows, {"model": copy.deepcopy(cggr_model.state_dict()),
                          "optimizer": copy.deepcopy(optimizer.state_dict())}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_resumed_run_continues_bitwise(policy):
    full, full_rows, _ = _train(policy, STEPS)
    first, _, state = _train(policy, STOP)
    assert int(state["model"]["cggr_step"]) == STOP
    rest, rest_rows, _ = _train(policy, STEPS, state=state)
    assert len(first) + len(rest) == len(full)
    for a, b in zip(first + rest, full):
        assert torch.equal(a, b)
    for a, b in zip(rest_rows, full_rows[STOP:]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_same_seed_same_run_and_micro_batches_draw_independently():
    a, rows_a, _ = _train("random", STEPS, accumulate=2)
    b, rows_b, _ = _train("random", STEPS, accumulate=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the two micro-batches of the last step (ratio at its floor) draw different rows
    assert not torch.equal(rows_a[-1], rows_a[-2])
