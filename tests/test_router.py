"""create_truncated_router: logit lens of the model's own first blocks, sharing every tensor."""
import pytest
import torch
import transformers as tf
from torch import nn

from cggr.router import ROUTER_ARCHITECTURES, SUPPORTED_ARCHITECTURES, TruncatedRouter, create_truncated_router

VOCAB = 101


def tiny_config(family, layers=4, **extra):
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    elif family == "mistral":
        cfg = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=5, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, **common)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, **common)
    else:
        raise AssertionError(family)
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family, layers=4, seed=0, **extra):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(family, layers, **extra)).eval()


def final_norm(model):
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        return model.transformer.ln_f
    if name == "GPTNeoXForCausalLM":
        return model.gpt_neox.final_layer_norm
    return model.model.norm


def shared_tensors(model, num_layers):
    """(embedding, blocks, norm, head) tensors the router must share, per family."""
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        base, blocks = model.transformer, model.transformer.h
        embeds = [base.wte.weight, base.wpe.weight]
    elif name == "GPTNeoXForCausalLM":
        base, blocks = model.gpt_neox, model.gpt_neox.layers
        embeds = [base.embed_in.weight]
    else:
        base, blocks = model.model, model.model.layers
        embeds = [base.embed_tokens.weight]
    block_tensors = [t for block in blocks[:num_layers] for t in block.parameters()]
    norm = list(final_norm(model).parameters())
    head = [model.get_output_embeddings().weight]
    return embeds, block_tensors, norm, head


ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]
CORE_FAMILIES = ["llama", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_logit_lens_matches_hidden_states(family, num_layers):
    model = tiny_model(family)
    router = create_truncated_router(model, num_layers=num_layers)
    ids = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
        expected = model.get_output_embeddings()(final_norm(model)(hidden_states[num_layers]))
        out = router(ids)
        got = router.logits(ids)
    assert out.hidden.shape == (3, 12, 32)
    assert out.weight is model.get_output_embeddings().weight
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_router_shares_every_tensor(family):
    model = tiny_model(family)
    n_params = sum(p.numel() for p in model.parameters())
    keys = list(model.state_dict())
    router = create_truncated_router(model, num_layers=2)
    # the router registers nothing of its own
    assert list(router.parameters()) == [] and list(router.buffers()) == []
    assert router.state_dict() == {}
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert list(model.state_dict()) == keys

    shared_ptrs = {t.data_ptr() for m in router.shared_modules() for t in m.parameters()}
    embeds, blocks, norm, head = shared_tensors(model, 2)
    for group in (embeds, blocks, norm, head):
        assert group and all(t.data_ptr() in shared_ptrs for t in group)
    # and not a single tensor of the router's modules lies outside the model
    model_ptrs = {t.data_ptr() for t in model.parameters()}
    assert shared_ptrs <= model_ptrs
    assert router.head_params()[0].data_ptr() == model.get_output_embeddings().weight.data_ptr()
    # blocks past num_layers are not run
    _, all_blocks, _, _ = shared_tensors(model, 4)
    assert not {t.data_ptr() for t in all_blocks[len(blocks):]} & shared_ptrs


@pytest.mark.parametrize("family", CORE_FAMILIES + ["qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_row_matches_unpadded_row(family, side):
    model = tiny_model(family)
    router = create_truncated_router(model, num_layers=2)
    T, n, pad = 10, 7, 3
    row = torch.randint(1, VOCAB, (1, n))
    other = torch.randint(1, VOCAB, (1, T))
    filler = torch.zeros(1, pad, dtype=torch.long)
    padded = torch.cat([row, filler], 1) if side == "right" else torch.cat([filler, row], 1)
    ids = torch.cat([padded, other], 0)
    mask = torch.ones(2, T, dtype=torch.long)
    if side == "right":
        mask[0, n:] = 0
        kwargs = {}
        valid = slice(0, n)
    else:
        mask[0, :pad] = 0
        # what generate() does with left padding: positions count real tokens only
        kwargs = {"position_ids": (mask.cumsum(1) - 1).clamp_min(0)}
        valid = slice(pad, T)
    with torch.no_grad():
        batch = router(ids, attention_mask=mask, **kwargs).hidden
        alone = router(row).hidden
        other_alone = router(other).hidden
    torch.testing.assert_close(batch[0, valid], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[1], other_alone[0], rtol=1e-4, atol=1e-5)


def test_mistral_sliding_window_is_applied():
    # sliding_window=5 < T: the router must use the sliding mask like MistralModel.forward does
    model = tiny_model("mistral")
    router = create_truncated_router(model, num_layers=2)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = model.model.norm(model(ids, output_hidden_states=True).hidden_states[2])
        full_window = tiny_model("mistral", sliding_window=None)
        full_window.load_state_dict(model.state_dict())
        unwindowed = create_truncated_router(full_window, num_layers=2)(ids).hidden
        got = router(ids).hidden
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unwindowed, atol=1e-4)


def test_gpt2_token_type_ids_follow_the_model():
    model = tiny_model("gpt2")
    router = create_truncated_router(model, num_layers=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    types = torch.randint(0, 3, (2, 8))
    with torch.no_grad():
        hidden_states = model(ids, token_type_ids=types, output_hidden_states=True).hidden_states
        got = router(ids, token_type_ids=types).hidden
    torch.testing.assert_close(got, model.transformer.ln_f(hidden_states[2]), rtol=1e-5, atol=1e-5)


def test_router_runs_in_eval_mode_and_restores_training_flags():
    model = tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    router = create_truncated_router(model, num_layers=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        reference = router(ids).hidden  # model is in eval mode here
        model.train()
        flags = [m.training for m in model.modules()]
        first, second = router(ids).hidden, router(ids).hidden
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    assert [m.training for m in model.modules()] == flags and all(flags)


def test_router_gradients_flow_when_asked():
    # The router itself does not choose the grad mode: with grad enabled it differentiates like the model.
    model = tiny_model("llama")
    router = create_truncated_router(model, num_layers=1)
    router.logits(torch.randint(0, VOCAB, (2, 6))).sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    assert model.model.layers[1].mlp.down_proj.weight.grad is None


@pytest.mark.parametrize("num_layers", [0, -1, 4, 5])
def test_num_layers_out_of_range(num_layers):
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match=r"num_layers must be >= 1 and < the model's depth \(4 blocks"):
        create_truncated_router(model, num_layers=num_layers)


def test_num_layers_type():
    with pytest.raises(TypeError, match="num_layers must be an int"):
        create_truncated_router(tiny_model("gpt2"), num_layers=2.0)


def test_unsupported_architecture():
    # every family's coverage is in test_router_families.py; here the two refusals a user meets first
    bart = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2,
                                                         decoder_layers=2, encoder_attention_heads=2,
                                                         decoder_attention_heads=2, encoder_ffn_dim=32,
                                                         decoder_ffn_dim=32, max_position_embeddings=32))
    with pytest.raises(TypeError, match=r"unsupported architecture BartForConditionalGeneration: an encoder-decoder "
                                        r"model, not decoder-only"):
        create_truncated_router(bart, num_layers=1)
    with pytest.raises(TypeError, match="unsupported architecture Linear: not a Hugging Face causal LM"):
        create_truncated_router(nn.Linear(2, 2))


def test_supported_list_and_type():
    # the families of the original API stay supported for the router, ModelTrunk and the fused loss
    original = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
                "GPTNeoXForCausalLM"}
    assert original <= set(SUPPORTED_ARCHITECTURES) <= set(ROUTER_ARCHITECTURES)
    assert isinstance(create_truncated_router(tiny_model("gpt_neox"), 1), TruncatedRouter)


def test_bad_input_rank():
    router = create_truncated_router(tiny_model("llama"), num_layers=1)
    with pytest.raises(ValueError, match=r"input_ids: expected \[B, T\]"):
        router(torch.randint(0, VOCAB, (8,)))
