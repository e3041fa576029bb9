"""Long run: many CGGRModel steps hold no growing state (live tensors and resident memory flat after
warm-up), and a fixed seed gives the same losses twice (bitwise on the CPU). The GPU suite runs the
SmolLM-135M shape for longer (tests/gpu/test_model_cuda.py)."""
import gc
import resource

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cggr import CGGRModel, ExcessLossRows, RandomRows, RouterSettings

B, T, V = 8, 16, 64
WARMUP, STEPS = 30, 150
RSS_GROWTH_BOUND_MB = 32  # after warm-up; allocator noise on a CPU is a few MB


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _run(policy, steps, probe=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    cggr_model = CGGRModel(model, policy=policy, min_tokens_ratio=0.25, warmup_steps=20, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    losses = []
    for step in range(steps):
        ids = torch.randint(0, V, (B, T), generator=g)
        kwargs = {"reference_nll": torch.rand(B, T - 1, generator=g)} if policy.needs_reference_nll else {}
        loss = cggr_model(ids, labels=ids, **kwargs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cggr_model.step()
        losses.append(loss.item())  # host floats: a list of tensors would itself grow the live-tensor count
        if probe is not None:
            probe(step)
    cggr_model.get_metrics()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("policy", [RandomRows(), ExcessLossRows(RouterSettings(layers=1, token_stride=4))],
                         ids=["random", "excess"])
def test_memory_stays_flat(policy):
    seen = {}

    def probe(step):
        if step in (WARMUP, STEPS - 1):
            seen[step] = (_live_tensors(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    _run(policy, STEPS, probe)
    (tensors_warm, rss_warm), (tensors_end, rss_end) = seen[WARMUP], seen[STEPS - 1]
    assert tensors_end == tensors_warm, "live tensors grew after warm-up"
    assert rss_end - rss_warm < RSS_GROWTH_BOUND_MB


def test_fixed_seed_same_losses_twice():
    """RandomRows draws from the seeded generator every step: the same seed gives the same run."""
    a, b = _run(RandomRows(), 30), _run(RandomRows(), 30)
    assert a == b  # float32 losses as Python floats: equal means bitwise
