"""The router and ModelTrunk on every decoder family, each on a tiny config.

A k-block router's logits must equal the logits of the same weights built with k blocks
(``config.num_hidden_layers = k``, the first k blocks' state dict), padded batches included; that covers
what each family's forward does outside its layers (Gemma's embedding scale, Gemma 2's logit soft cap and
sliding-window layers, MoE routing, Granite's multipliers, OPT's positions and projections, Falcon's ALiBi).
ModelTrunk at full depth must give the model's own logits and labels loss, or refuse the model clearly.
"""
import copy

import pytest
import torch
import transformers as tf
from torch import nn

from cggr.router import (ROUTER_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelTrunk, TruncatedRouter,
                         create_truncated_router)
from cggr.router_adapters import FAMILIES
from test_model_trunk import assert_trunk_draws_the_model_dropout  # (tests/ is on sys.path)

V, L, T = 101, 3, 12
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DENSE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, **IDS)
MOE = dict(DENSE, intermediate_size=32)

# variant -> (model_type, config kwargs). Windows of 4 < T, so the sliding masks really differ from causal.
VARIANTS = {
    "llama": ("llama", DENSE),
    "mistral": ("mistral", dict(DENSE, sliding_window=4)),
    "qwen2": ("qwen2", dict(DENSE, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", dict(DENSE, head_dim=8, layer_types=["full_attention", "sliding_attention",
                                                            "full_attention"], use_sliding_window=True,
                            sliding_window=4)),
    "gpt2": ("gpt2", dict(vocab_size=V, n_embd=32, n_layer=L, n_head=4, n_positions=64, **IDS)),
    "gpt_neox": ("gpt_neox", dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                                  num_attention_heads=4, max_position_embeddings=64, **IDS)),
    "gemma": ("gemma", dict(DENSE, head_dim=8)),
    "gemma2": ("gemma2", dict(DENSE, head_dim=8, sliding_window=4, final_logit_softcapping=0.5,
                              attn_logit_softcapping=2.0, query_pre_attn_scalar=8)),
    "gemma3": ("gemma3_text", dict(DENSE, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("phi3", dict(DENSE, sliding_window=4)),
    "phi": ("phi", dict(DENSE)),
    "olmo2": ("olmo2", DENSE),
    "granite": ("granite", dict(DENSE, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0,
                                attention_multiplier=0.2)),
    "granitemoe": ("granitemoe", dict(MOE, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                                      logits_scaling=3.0, residual_multiplier=0.7)),
    "cohere": ("cohere", dict(DENSE, logit_scale=0.25)),
    "opt": ("opt", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=L, num_attention_heads=4,
                        word_embed_proj_dim=16, max_position_embeddings=64, **IDS)),
    "opt_post_norm": ("opt", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=L,
                                  num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                  do_layer_norm_before=False, **IDS)),
    "falcon": ("falcon", dict(vocab_size=V, hidden_size=32, num_hidden_layers=L, num_attention_heads=4, **IDS)),
    "falcon_alibi": ("falcon", dict(vocab_size=V, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                    alibi=True, multi_query=False, parallel_attn=False, bias=True, **IDS)),
    "falcon_new_arch": ("falcon", dict(vocab_size=V, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                       new_decoder_architecture=True, num_kv_heads=2, **IDS)),
    "mixtral": ("mixtral", dict(MOE, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    "qwen2_moe": ("qwen2_moe", dict(MOE, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(MOE, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "starcoder2": ("starcoder2", dict(DENSE, sliding_window=4)),
    # model types without an entry in FAMILIES: the generic path, mask rule read from the forward
    "smollm3": ("smollm3", dict(DENSE)),
    "olmo": ("olmo", DENSE),
    "stablelm": ("stablelm", dict(DENSE)),
}
# the 15 families of issue 18 item 3, by the variant that covers them
ISSUE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gemma", "gemma2", "phi3", "olmo2",
                  "granite", "opt", "falcon", "mixtral", "qwen2_moe"]
GENERIC = ["smollm3", "olmo", "stablelm"]
# ModelTrunk refuses a final logit soft cap: Gemma 2 is checked with its cap off there
TRUNK_OVERRIDES = {"gemma2": dict(final_logit_softcapping=None)}


def make_config(variant, **extra):
    model_type, kwargs = VARIANTS[variant]
    return tf.AutoConfig.for_model(model_type, **{**kwargs, **extra})


def make_model(variant, seed=0, **extra):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(make_config(variant, **extra)).eval()


def model_with_k_blocks(model, k):
    """The same weights built with k blocks: config.num_hidden_layers = k, the first k blocks' state dict."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:k]
    if getattr(config, "mlp_only_layers", None):
        config.mlp_only_layers = [i for i in config.mlp_only_layers if i < k]
    small = tf.AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        index = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1])
                      if p in ("layers", "h") and parts[i + 1].isdigit()), None)
        if index is None or index < k:
            state[name] = value
    small.load_state_dict(state, strict=True)
    return small


def batch(seed=3, B=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, -3:] = 0  # right padding
    return ids, mask


def test_the_issue_families_are_all_covered():
    types = {VARIANTS[v][0] for v in ISSUE_FAMILIES}
    assert len(types) == 15 and types <= set(FAMILIES)
    assert not {VARIANTS[v][0] for v in GENERIC} & set(FAMILIES)
    assert set(SUPPORTED_ARCHITECTURES) < set(ROUTER_ARCHITECTURES)
    assert "Gemma2ForCausalLM" not in SUPPORTED_ARCHITECTURES and "LlamaForCausalLM" in SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_logits_equal_the_model_built_with_k_blocks(variant):
    model = make_model(variant)
    ids, mask = batch()
    valid = mask.bool()
    for k in (1, 2):
        router = create_truncated_router(model, num_layers=k)
        small = model_with_k_blocks(model, k)
        with torch.no_grad():
            want = small(ids).logits
            got = router.logits(ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{variant} k={k}")
            want = small(ids, attention_mask=mask).logits
            got = router.logits(ids, attention_mask=mask)
            # a pad position's output is unspecified
            torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5, msg=f"{variant} k={k} padded")


@pytest.mark.parametrize("variant, off", [
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=64)),
    ("gemma3", dict(sliding_window=64)),
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(use_sliding_window=False)),
    ("granite", dict(embedding_multiplier=1.0)),
    ("granite", dict(logits_scaling=1.0)),
    ("cohere", dict(logit_scale=1.0)),
    ("falcon_alibi", dict(alibi=False)),
    ("mixtral", dict(num_experts_per_tok=1)),
], ids=lambda x: "-".join(x) if isinstance(x, dict) else x)
def test_the_tiny_configs_exercise_each_feature(variant, off):
    """Turning the feature off changes the 2-block router's logits: the equality above really covers it."""
    ids, _ = batch()
    with torch.no_grad():
        on = create_truncated_router(make_model(variant), 2).logits(ids)
        without = create_truncated_router(make_model(variant, **off), 2).logits(ids)
    assert not torch.allclose(on, without, atol=1e-4)


def test_gemma2_soft_cap_is_reported():
    model = make_model("gemma2")
    out = create_truncated_router(model, 2)(batch()[0])
    assert out.softcap == 0.5 and create_truncated_router(model, 1).logit_softcap == 0.5
    assert create_truncated_router(make_model("llama"), 1)(batch()[0]).softcap is None


def test_cggr_model_scores_gemma2_rows_on_capped_logits():
    """The router pass scores the logits the model would produce: soft-capped for Gemma 2."""
    from cggr import CGGRModel, HardestRows, RouterSettings

    model = make_model("gemma2")
    ids, _ = batch()
    m = CGGRModel(model, policy=HardestRows(router=RouterSettings(layers=1)), min_tokens_ratio=0.5, warmup_steps=0)
    m(ids, labels=ids)
    logits = create_truncated_router(model, 1).logits(ids).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                                            reduction="none").view(ids.shape[0], -1).mean(1)
    torch.testing.assert_close(m.router_row_nll, nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_shares_every_tensor_and_registers_none(variant):
    model = make_model(variant)
    keys = list(model.state_dict())
    router = create_truncated_router(model, num_layers=2)
    assert isinstance(router, TruncatedRouter) and router.family == VARIANTS[variant][0]
    assert list(router.parameters()) == [] and list(router.buffers()) == [] and router.state_dict() == {}
    assert list(model.state_dict()) == keys
    shared = {t.data_ptr() for m in router.shared_modules() for t in m.parameters()}
    assert shared <= {t.data_ptr() for t in model.parameters()}
    assert router.head_params()[0].data_ptr() == model.get_output_embeddings().weight.data_ptr()
    layers = router.adapter.layers
    assert all(t.data_ptr() in shared for block in layers[:2] for t in block.parameters())
    assert not {t.data_ptr() for t in layers[2].parameters()} & shared


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_trunk_equals_the_model_forward(variant):
    model = make_model(variant, **TRUNK_OVERRIDES.get(variant, {}))
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    trunk = ModelTrunk(model)
    valid = mask.bool()
    with torch.no_grad():
        for m in (None, mask):
            out = model(ids, attention_mask=m, labels=labels)
            logits = trunk.head()(trunk(ids, m))
            rows = valid if m is not None else torch.ones_like(valid)
            torch.testing.assert_close(logits[rows], out.logits[rows], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(trunk.labels_loss(logits, labels), out.loss, rtol=1e-5, atol=1e-6)


DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "embed_dropout", "resid_dropout", "router_jitter_noise")


@pytest.mark.parametrize("variant", ["gpt2", "gpt_neox", "phi", "opt", "falcon", "granite", "mixtral", "qwen2_moe",
                                     "gemma3", "starcoder2"])
def test_model_trunk_draws_the_same_dropout_in_training(variant):
    config = make_config(variant)
    drop = {key: 0.3 for key in DROPOUT_KEYS if isinstance(getattr(config, key, None), float)}
    model = make_model(variant, **drop).train()
    ids, _ = batch()
    assert_trunk_draws_the_model_dropout(model, ids)


@pytest.mark.parametrize("variant, extra, match", [
    ("gemma2", {}, "final_logit_softcapping=0.5"),
    ("mixtral", dict(output_router_logits=True), "output_router_logits=True"),
    ("qwen2_moe", dict(output_router_logits=True), "load-balancing"),
    ("opt", dict(layerdrop=0.5), "layerdrop=0.5"),
])
def test_model_trunk_refuses_what_it_cannot_reproduce_while_the_router_works(variant, extra, match):
    model = make_model(variant, **extra)
    with pytest.raises(TypeError, match=f"ModelTrunk: .*{match}"):
        ModelTrunk(model)
    create_truncated_router(model, num_layers=1)(batch()[0])


def test_router_in_training_mode_refuses_opt_layerdrop():
    model = make_model("opt", layerdrop=0.5)
    with pytest.raises(ValueError, match="deterministic=False.*layerdrop"):
        create_truncated_router(model, num_layers=1, deterministic=False)


@pytest.mark.parametrize("variant", ["gpt2", "opt", "falcon_alibi", "granite", "gemma3"])
def test_router_trunk_traces_without_a_graph_break(variant):
    """fullgraph=True: no .item(), no data-dependent Python branch in the adapters (CPU stand-in for the GPU
    synchronisation check). Without attention_mask, as the no-sync guarantee states."""
    model = make_model(variant)
    router = create_truncated_router(model, num_layers=2)
    ids, _ = batch()
    compiled = torch.compile(router.trunk, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), router.trunk(ids), rtol=1e-5, atol=1e-5)


class _NotADecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.blocks_by_another_name = nn.ModuleList([nn.Linear(2, 2)])
        self.lm_head = nn.Linear(2, 2)

    def get_output_embeddings(self):
        return self.lm_head


def test_a_model_of_another_shape_is_told_what_is_missing():
    with pytest.raises(TypeError, match=r"create_truncated_router: unsupported architecture _NotADecoder: no list "
                                        r"of decoder layers \(nn.ModuleList\) found at model.model.layers / "
                                        r"model.model.h"):
        create_truncated_router(_NotADecoder(tf.LlamaConfig()), 1)
    with pytest.raises(TypeError, match="unsupported architecture Linear: not a Hugging Face causal LM"):
        create_truncated_router(nn.Linear(2, 2), 1)
    with pytest.raises(TypeError, match="ModelTrunk: unsupported architecture Linear"):
        ModelTrunk(nn.Linear(2, 2))
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=2, num_heads=2,
                                                   d_kv=8))
    with pytest.raises(TypeError, match="encoder-decoder model, not decoder-only"):
        create_truncated_router(t5, 1)
    base = tf.LlamaModel(make_config("llama"))  # no LM head
    with pytest.raises(TypeError, match="expected an nn.Linear LM head"):
        create_truncated_router(base, 1)


def test_an_unknown_family_with_extras_is_refused_not_guessed():
    # GPTBigCode: learned positions and an embedding dropout in its forward, no hook for them
    bigcode = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                           n_positions=64, **IDS))
    with pytest.raises(TypeError, match=r"holds modules the router would not run \(wpe, drop\); model type "
                                        r"'gpt_bigcode' has no hook"):
        create_truncated_router(bigcode, 1)
    with pytest.raises(TypeError, match=r"model type 'smollm3' has no hook and its config sets logit_scale=2.0"):
        create_truncated_router(make_model("smollm3", logit_scale=2.0), 1)


def _cggr_loss_and_grads(variant, step_options):
    from cggr.model import CGGRModel
    from cggr.options import StepOptions
    from cggr.policies import HardestRows

    model = make_model(variant, **TRUNK_OVERRIDES.get(variant, {})).train()
    ids, mask = batch(B=4)
    labels = ids.masked_fill(mask == 0, -100)
    m = CGGRModel(model, HardestRows(), router=create_truncated_router(model, 1), min_tokens_ratio=0.5,
                  warmup_steps=0, step_options=StepOptions(**step_options))
    loss = m(ids, labels=labels, attention_mask=mask)
    loss.backward()
    return loss.detach(), m.selected_rows, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["gemma", "phi3", "olmo2", "opt", "falcon_alibi", "mixtral", "qwen2_moe"])
def test_cggr_model_trunk_and_fused_paths_equal_the_model_forward(variant):
    """The new families pass CGGRModel's gate for forward_impl='trunk' and loss_impl='fused' (their class is in
    SUPPORTED_ARCHITECTURES): same rows, loss and gradients as the model's own forward."""
    want_loss, want_rows, want_grads = _cggr_loss_and_grads(variant, {})
    for options in (dict(forward_impl="trunk"), dict(loss_impl="fused"), dict(forward_impl="trunk", loss_impl="fused")):
        loss, rows, grads = _cggr_loss_and_grads(variant, options)
        assert torch.equal(rows, want_rows)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(want_grads) and grads
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{options} {name}")


def test_peft_lora_model_runs_the_adapted_layers():
    peft = pytest.importorskip("peft")
    model = make_model("qwen2")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ids, mask = batch()
    router = create_truncated_router(lora, num_layers=2)
    assert router.model is lora
    with torch.no_grad():
        hidden = lora(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        want = model.get_output_embeddings()(model.model.norm(hidden))
        got = router.logits(ids, attention_mask=mask)
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
        with lora.disable_adapter():
            plain = router.logits(ids, attention_mask=mask)
    assert not torch.allclose(plain[valid], got[valid], atol=1e-4)
    assert any("lora_A" in n for m in router.shared_modules() for n, _ in m.named_parameters())


@pytest.mark.parametrize("variant", GENERIC)
def test_an_unverified_family_is_said_once(variant):
    from cggr import router_adapters

    router_adapters._WARNED_GENERIC.clear()
    model = make_model(variant)
    with pytest.warns(UserWarning, match=r"is not among the verified families"):
        create_truncated_router(model, 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_truncated_router(model, 1)  # once per process and mask rule
