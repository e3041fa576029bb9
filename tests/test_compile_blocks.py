"""StepOptions(compile='blocks' | 'blocks-cudagraphs'): the decoder blocks compiled in place (cggr.compile_blocks).

On the CPU with Dynamo's eager backend (graphs and guards, no code generation): the same losses as the
uncompiled step, every block compiled, the clear errors of the CUDA-graph variant off CUDA. The CUDA-graphed
step itself is tested on the GPU (tests/gpu/test_model_cuda.py)."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cggr import CGGRModel, ExcessLossRows, RandomRows, RouterSettings, StepOptions
from cggr.compile_blocks import compile_decoder_blocks, decoder_blocks

V = 64


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def steps(cggr_model, n=3):
    optimizer = torch.optim.SGD(cggr_model.model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n):
        ids = torch.randint(0, V, (8, 12), generator=g)
        kwargs = {"reference_nll": torch.rand(8, 11, generator=g)} if cggr_model.policy.needs_reference_nll else {}
        loss = cggr_model(ids, labels=ids, **kwargs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        cggr_model.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("policy", [RandomRows(), ExcessLossRows(RouterSettings(layers=1, token_stride=2))],
                         ids=["random", "excess"])
def test_blocks_compiled_in_place_give_the_same_losses(policy):
    plain = steps(CGGRModel(llama(), policy=policy, warmup_steps=0))
    model = llama()
    compiled = CGGRModel(model, policy=policy, warmup_steps=0,
                         step_options=StepOptions(compile="blocks", compile_options={"backend": "eager"}))
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    assert compiled(torch.randint(0, V, (2, 12))).logits.shape == (2, 12, V)  # evaluation without labels too
    assert steps(compiled) == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_decoder_blocks_found_for_other_families_and_refused_otherwise():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    assert decoder_blocks(gpt2) is gpt2.transformer.h
    assert compile_decoder_blocks(gpt2, backend="eager") == 2
    with pytest.raises(TypeError, match="unsupported architecture Linear"):
        compile_decoder_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        decoder_blocks("llama")


def test_cuda_graphs_need_cuda_inputs_and_their_own_mode():
    with pytest.raises(ValueError, match="cuda_graphs=True compiles with mode='reduce-overhead', got compile "
                                         "option mode='max-autotune'"):
        CGGRModel(llama(), step_options=StepOptions(compile="blocks-cudagraphs",
                                                    compile_options={"mode": "max-autotune"}))
    cggr_model = CGGRModel(llama(), warmup_steps=0, step_options=StepOptions(compile="blocks-cudagraphs"))
    ids = torch.randint(0, V, (4, 8))
    with pytest.raises(ValueError, match=r"CGGRModel: StepOptions\(compile='blocks-cudagraphs'\) replays CUDA "
                                         "graphs, so input_ids must be on a CUDA device, got cpu"):
        cggr_model(ids, labels=ids)
    with pytest.raises(ValueError, match="CGGRModel.select_rows: .* got cpu"):
        cggr_model.select_rows(ids, ids)


def test_accumulated_gradients_of_graphed_blocks_are_copied_once_per_window(monkeypatch):
    """pytorch/pytorch#169545: with CUDA-graphed blocks a parameter's first gradient is graph memory that the
    next micro-batch's replay overwrites; begin_graph_step() copies it before the replay, once per
    accumulation window (the copy is kept while it accumulates), and copies nothing after the gradients
    were cleared."""
    from cggr import compile_blocks

    model = llama()
    blocks = decoder_blocks(model)
    # the registration of compile_decoder_blocks(cuda_graphs=True), without compiling (no CUDA here)
    monkeypatch.setattr(compile_blocks, "_graphed_parameters", {})
    monkeypatch.setattr(compile_blocks, "_graph_trees_in_use", False)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **options: None)
    compile_decoder_blocks(model, cuda_graphs=True)
    n = len(compile_blocks._graphed_parameters)
    assert n == len(list(blocks.parameters()))
    outside = model.lm_head.weight
    assert id(outside) not in compile_blocks._graphed_parameters
    assert compile_blocks.own_accumulated_gradients() == 0  # no gradients: nothing to copy

    model(torch.randint(0, V, (2, 5)), labels=torch.randint(0, V, (2, 5))).loss.backward()  # micro-batch 1
    first = {id(p): p.grad for p in blocks.parameters()}
    values = {k: g.clone() for k, g in first.items()}
    compile_blocks.begin_graph_step()  # what every graphed call does before its replay
    for p in blocks.parameters():
        assert p.grad is not first[id(p)] and p.grad.data_ptr() != first[id(p)].data_ptr()
        torch.testing.assert_close(p.grad, values[id(p)], rtol=0, atol=0)
    assert compile_blocks.own_accumulated_gradients() == 0  # copied once: nothing left to copy
    copies = {id(p): p.grad for p in blocks.parameters()}
    model(torch.randint(0, V, (2, 5)), labels=torch.randint(0, V, (2, 5))).loss.backward()  # accumulates in place
    assert compile_blocks.own_accumulated_gradients() == 0
    assert all(p.grad is copies[id(p)] for p in blocks.parameters())
    model.zero_grad(set_to_none=True)
    assert compile_blocks.own_accumulated_gradients() == 0
