"""CUDA checks of CGGRModel / create_truncated_router (run on the GPU machine).

    pytest tests/gpu/test_model_cuda.py -q

- the router + scoring + row selection path does not synchronise (torch.cuda.set_sync_debug_mode("error"));
- compiled (StepOptions(compile='all')) steps, 'model' and 'fused' loss: same loss as eager and no synchronisation at
  all in forward + backward;
- StepOptions(forward_impl='trunk'): a whole eager step without synchronisation, the same loss as the model's forward;
- logit lens and ratio-1.0 equality in bf16 on the GPU.
Small Llama / GPT-2 configs (a few hundred MB at most).
"""
import contextlib
import os

import pytest
import torch
import transformers as tf

from cggr.experimental import HalfHardestRows, ImportanceRows
from cggr.model import CGGRModel
from cggr.options import StepOptions
from cggr.policies import (ExcessLossRows, HardestRows, RandomRows, ReferenceFilter, ReferenceRanked,
                           RouterSettings)
from cggr.router import create_truncated_router
from cggr.rows import reference_row_means

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton)",
)

VOCAB = 8192
ROUTER = RouterSettings(layers=2)


def hardest():
    return HardestRows(router=ROUTER)


def llama(layers=6, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).train()


def gpt2(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=layers, n_head=8, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = tf.GPT2LMHeadModel(cfg)
    return model.to(torch.bfloat16).train()


def batch(B=16, T=256, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), device="cuda", generator=g)
    return ids, ids.clone()


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _core_router_policy(scoring):
    return ExcessLossRows(ROUTER) if scoring == "excess_loss" else HardestRows(scoring, ROUTER)


# every policy with each scoring it takes (RandomRows has none: once)
POLICIES = {
    **{f"hardest-{s}": (lambda s=s: _core_router_policy(s)) for s in ("loss", "combined", "excess_loss")},
    **{f"half_hardest-{s}": (lambda s=s: HalfHardestRows(s, ROUTER)) for s in ("loss", "combined", "excess_loss")},
    **{f"importance-{s}": (lambda s=s: ImportanceRows(scoring=s, router=ROUTER))
       for s in ("loss", "combined", "excess_loss")},
    "random": RandomRows,
}


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_router_scoring_and_selection_do_not_sync(make, policy):
    model = make()
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=POLICIES[policy]())
    ids, labels = batch()
    k = 4
    reference = None
    if cggr.policy.needs_reference_nll:
        reference = 5.0 * torch.rand(ids.shape[0], ids.shape[1] - 1, device=ids.device)

    def route():
        rows = None
        if cggr.policy.uses_router:
            rows, _ = cggr._score_rows(ids, labels, None, {}, reference)
        picked = cggr.policy.select(rows if rows is not None else ids.shape[0], k, cggr._generator(ids.device))
        return ids.index_select(0, picked.indices), labels.index_select(0, picked.indices)

    route()  # lazy initialisation (cuBLAS handles, Triton compilation, the generator) may synchronise
    with no_sync():
        rows_ids, rows_labels = route()
    assert rows_ids.shape == (k, ids.shape[1])


@pytest.mark.parametrize("policy_cls", [ReferenceFilter, ReferenceRanked])
def test_reference_filter_selection_does_not_sync(policy_cls):
    model = llama()
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=policy_cls(2.5))
    ids, labels = batch()
    reference = 5.0 * torch.rand(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    cggr(ids, labels=labels, reference_nll=reference)  # lazy initialisation may synchronise
    with no_sync():
        rows = cggr.policy.select(reference_row_means(reference, labels, None), 4, cggr._generator(ids.device)).indices
    means = reference.mean(1)
    rows, in_domain = set(rows.tolist()), set((means <= 2.5).nonzero().flatten().tolist())
    assert len(rows) == 4 and (rows <= in_domain if len(in_domain) >= 4 else in_domain <= rows)
    if policy_cls is ReferenceRanked:  # the lowest in-domain means, whatever the draw
        lowest = set(torch.argsort(means)[:min(4, len(in_domain))].tolist())
        assert lowest <= rows


@pytest.mark.parametrize("loss_impl", ["model", "fused"])
def test_compiled_step_matches_eager_and_does_not_sync(loss_impl):
    ids, labels = batch()
    eager_model = llama()
    eager = CGGRModel(eager_model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                      step_options=StepOptions(loss_impl=loss_impl))
    compiled_model = llama()
    compiled = CGGRModel(compiled_model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                         step_options=StepOptions(loss_impl=loss_impl, compile="all"))
    expected = eager(ids, labels=labels)
    expected.backward()
    for _ in range(2):   # compile, then a call that must hit the compiled graphs
        compiled_model.zero_grad(set_to_none=True)
        loss = compiled(ids, labels=labels)
        loss.backward()
    torch.testing.assert_close(loss.float(), expected.float(), rtol=2e-2, atol=2e-2)
    compiled_model.zero_grad(set_to_none=True)
    with no_sync():
        loss = compiled(ids, labels=labels)
        loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert compiled_model.model.layers[-1].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("policy", [hardest, lambda: ExcessLossRows(RouterSettings(layers=1, token_stride=8))],
                         ids=["hardest", "excess"])
def test_cuda_graphed_blocks_match_eager_and_stop_compiling(policy):
    """StepOptions(compile='blocks-cudagraphs'), the fast step: the same losses as eager over a few optimizer
    steps, no new graph after the first steps, and evaluation through the same graphed blocks."""
    from cggr.compile_blocks import compiled_graph_count

    torch._dynamo.reset()
    ids, labels = batch()
    reference = 5.0 * torch.rand(ids.shape[0], ids.shape[1] - 1, device="cuda")
    kwargs = {"reference_nll": reference} if policy().needs_reference_nll else {}
    losses = {}
    for name, options in (("eager", StepOptions()), ("graphs", StepOptions(compile="blocks-cudagraphs"))):
        model = llama()
        cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=policy(), step_options=options)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for step in range(6):
            if step == 3:
                graphs = compiled_graph_count()
            loss = cggr(ids, labels=labels, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cggr.step()
            losses[name].append(loss.item())
        if name == "graphs":
            assert compiled_graph_count() == graphs, "a graph was compiled after the warm-up steps"
        cggr.eval()
        with torch.no_grad():
            losses[name].append(cggr(ids, labels=labels).item())
    torch.testing.assert_close(torch.tensor(losses["graphs"]), torch.tensor(losses["eager"]), rtol=2e-2, atol=2e-2)


def test_cuda_graphed_blocks_accumulate_gradients_like_eager():
    """Two micro-batches per optimizer step with StepOptions(compile='blocks-cudagraphs'): the first
    micro-batch's gradients (graph memory) survive the second's replay (pytorch/pytorch#169545), and the
    accumulated gradients and losses are eager's."""
    torch._dynamo.reset()
    ids, labels = batch()
    half = ids.shape[0] // 2
    results = {}
    for name, options in (("eager", StepOptions()), ("graphs", StepOptions(compile="blocks-cudagraphs"))):
        model = llama()
        cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest(), step_options=options)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        losses = []
        for step in range(4):
            for rows in (slice(0, half), slice(half, None)):
                loss = cggr(ids[rows], labels=labels[rows]) / 2
                loss.backward()
                losses.append(loss.item())
            if step == 3:
                grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad(set_to_none=True)
            cggr.step()
        results[name] = (torch.tensor(losses), grads)
    torch.testing.assert_close(results["graphs"][0], results["eager"][0], rtol=2e-2, atol=2e-2)
    graphed, eager = results["graphs"][1], results["eager"][1]
    # bf16 kernels differ elementwise; a lost micro-batch would show as a far lower cosine (about 0.9)
    assert torch.nn.functional.cosine_similarity(graphed, eager, dim=0) > 0.99
    assert (graphed.norm() / eager.norm()).item() == pytest.approx(1.0, rel=2e-2)


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("loss_impl", ["model", "fused"])
def test_trunk_forward_trains_without_a_host_sync(make, loss_impl):
    """StepOptions(forward_impl='trunk') with attention_mask=None: router, selection, the selected rows' forward and the
    backward issue no host synchronisation, eagerly (the model's own eager forward issues one:
    transformers' packed-sequence check of position_ids), and the loss is the 'model' forward's."""
    ids, labels = batch()
    losses = {}
    for forward_impl in ("model", "trunk"):
        model = make()
        cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                         step_options=StepOptions(loss_impl=loss_impl, forward_impl=forward_impl))
        cggr(ids, labels=labels).backward()  # lazy initialisation (handles, Triton compilation) may synchronise
        model.zero_grad(set_to_none=True)
        if forward_impl == "trunk":
            with no_sync():
                loss = cggr(ids, labels=labels)
                loss.backward()
        else:
            loss = cggr(ids, labels=labels)
        losses[forward_impl] = loss.detach().float()
    torch.testing.assert_close(losses["trunk"], losses["model"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("make", [llama, gpt2])
def test_logit_lens_bf16(make):
    model = make().eval()
    router = create_truncated_router(model, num_layers=3)
    ids, _ = batch(B=4, T=128)
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
        norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
        expected = norm(hidden_states[3])
        got = router(ids).hidden
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_ratio_one_equals_plain_model_bf16():
    ids, labels = batch(B=8)
    plain = llama()
    plain_loss = plain(ids, labels=labels).loss
    plain_loss.backward()
    model = llama()
    loss = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0, policy=hardest())(ids, labels=labels)
    loss.backward()
    torch.testing.assert_close(loss, plain_loss)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        # SDPA's backward may use atomics: equal up to bf16 rounding, not bit for bit
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-3, msg=name)


def test_fused_loss_at_smollm_head_size():
    # 49152-entry vocabulary like SmolLM: fused loss equals the model's loss on the same rows
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=3,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, 49152, (8, 512), device="cuda", generator=g)
    eager = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest())(ids, labels=ids)
    fused = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest(),
                      step_options=StepOptions(loss_impl="fused"))(ids, labels=ids)
    torch.testing.assert_close(fused.float(), eager.float(), rtol=1e-2, atol=1e-2)
