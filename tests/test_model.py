"""CGGRModel: router-scored row selection, full step on the selected rows only."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from cggr.experimental import HalfHardestRows
from cggr.model import STEP_KEY, CGGRModel
from cggr.options import StepOptions
from cggr.policies import ExcessLossRows, HardestRows, RandomRows, RouterSettings, RowPolicy, RowSelection
from cggr.router import create_truncated_router
from cggr.rows import rows_for_ratio
from cggr.schedule import RatioSchedule

from test_router import VOCAB, tiny_model  # tests/ is on sys.path (rootdir conftest, no package)

FAMILIES = ["llama", "gpt2", "gpt_neox"]


def hardest(layers=2, **router):
    """HardestRows (scoring 'loss') over a router of ``layers`` blocks."""
    return HardestRows(router=RouterSettings(layers=layers, **router))


def batch(B=8, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    return ids, ids.clone()


class RowRecorder:
    """Forward pre-hook on the full model: what it was called with."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_row_nll(model, num_layers, ids, labels, mask=None):
    """Row difficulty for scoring='loss', by brute force: full logits of the logit lens + F.cross_entropy."""
    router = create_truncated_router(model, num_layers=num_layers)
    with torch.no_grad():
        logits = router.logits(ids, attention_mask=mask)[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    if mask is not None:
        valid &= mask[:, :-1].bool() & mask[:, 1:].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    rows = nll.sum(1) / valid.sum(1).clamp_min(1)
    return torch.where(valid.sum(1) > 0, rows, torch.full_like(rows, -math.inf))


# -- equality with the plain model at ratio 1.0 --------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_equals_plain_model(family):
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0          # right padding
    labels[2, 9:] = -100
    labels[5, :4] = -100     # ignore_index inside a row
    plain = tiny_model(family)
    plain_loss = plain(ids, attention_mask=mask, labels=labels).loss
    plain_loss.backward()

    model = tiny_model(family)
    cggr = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    loss = cggr(ids, labels=labels, attention_mask=mask)
    loss.backward()
    assert recorder.calls[0]["input_ids"].shape == ids.shape
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    expected = grads(plain)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_loss_is_the_models_loss_on_those_rows(family):
    ids, labels = batch(B=8)
    labels[3, 2:7] = -100
    model = tiny_model(family)
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    loss = cggr(ids, labels=labels)
    rows = recorder.calls[0]
    with torch.no_grad():
        plain = model(rows["input_ids"], labels=rows["labels"]).loss
    torch.testing.assert_close(loss.detach(), plain)
    # mean over the valid shifted tokens of the selected rows
    logits = model(rows["input_ids"]).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), rows["labels"][:, 1:], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss.detach(), (nll / (rows["labels"][:, 1:] != -100).sum()).detach())


# -- which rows, how many ------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,B", [(0.25, 8), (0.3, 10), (0.5, 7), (0.1, 4), (0.99, 6)])
def test_full_model_sees_ceil_ratio_rows(ratio, B):
    model = tiny_model("llama")
    cggr = CGGRModel(model, min_tokens_ratio=ratio, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    ids, labels = batch(B=B)
    mask = torch.ones_like(ids)
    cggr(ids, labels=labels, attention_mask=mask, position_ids=torch.arange(12).expand(B, 12))
    k = math.ceil(round(ratio * B, 9))
    assert rows_for_ratio(ratio, B) == k
    call = recorder.calls[0]
    for name in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert call[name].shape == (k, 12), name
    metrics = cggr.get_metrics()
    assert metrics["sequences_selected"] == k and metrics["sequences_total"] == B


@pytest.mark.parametrize("family", FAMILIES)
def test_hardest_rows_are_picked(family):
    model = tiny_model(family)
    ids, labels = batch(B=8, seed=3)
    cggr = CGGRModel(model, min_tokens_ratio=0.375, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    cggr(ids, labels=labels)
    expected = torch.topk(reference_row_nll(model, 2, ids, labels), 3).indices.sort().values
    torch.testing.assert_close(recorder.calls[0]["input_ids"], ids[expected])


def test_row_difficulty_is_padding_and_ignore_index_aware():
    model = tiny_model("llama")
    ids, labels = batch(B=6, T=12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                  # right padding: pads carry real label ids on purpose
    mask[4, :5] = 0                  # left padding
    labels[2, :] = -100              # a row with nothing to learn is never preferred
    labels[3, 3:9] = -100
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    cggr(ids, labels=labels, attention_mask=mask, position_ids=position_ids)
    router = create_truncated_router(model, num_layers=2)
    with torch.no_grad():
        logits = router.logits(ids, attention_mask=mask, position_ids=position_ids)[:, :-1].float()
    targets = labels[:, 1:]
    valid = (targets != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    rows = torch.where(valid, nll, 0).sum(1) / valid.sum(1).clamp_min(1)
    rows[valid.sum(1) == 0] = -math.inf
    expected = torch.topk(rows, 3).indices.sort().values
    assert 2 not in expected.tolist()
    torch.testing.assert_close(recorder.calls[0]["input_ids"], ids[expected])
    torch.testing.assert_close(recorder.calls[0]["attention_mask"], mask[expected])
    torch.testing.assert_close(recorder.calls[0]["position_ids"], position_ids[expected])


def test_padded_row_scores_like_its_unpadded_self():
    # Same sequence, once unpadded (T=8) and once right-padded to 12 among others: same difficulty.
    model = tiny_model("gpt_neox")
    ids, labels = batch(B=4, T=12, seed=5)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=hardest())
    padded_rows, _ = cggr._score_rows(ids, labels, mask, {}, None)
    alone, _ = cggr._score_rows(ids[:1, :8], labels[:1, :8], None, {}, None)
    torch.testing.assert_close(padded_rows[0], alone[0], rtol=1e-5, atol=1e-6)


def test_non_batch_kwargs_pass_through_and_batch_kwargs_follow_rows():
    model = tiny_model("gpt2")
    ids, labels = batch(B=8)
    types = torch.arange(8)[:, None].expand(8, 12)  # GPT-2 embeds token types with wte: row id < vocab
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(model)
    cggr(ids, labels=labels, token_type_ids=types, position_ids=torch.arange(12)[None])
    call = recorder.calls[0]
    assert call["position_ids"].shape == (1, 12)       # [1, T]: not a per-row tensor
    rows = [int(r) for r in call["token_type_ids"][:, 0]]
    torch.testing.assert_close(call["input_ids"], ids[rows])


def test_half_hardest_keeps_hardest_half_plus_random_rest():
    model = tiny_model("llama")
    ids, labels = batch(B=8, seed=6)
    difficulty = reference_row_nll(model, 2, ids, labels)
    hardest_two = set(torch.topk(difficulty, 2).indices.tolist())
    picked = []
    cggr = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, seed=0,
                     policy=HalfHardestRows(router=RouterSettings(layers=2)))
    recorder = RowRecorder(model)
    for _ in range(6):
        cggr(ids, labels=labels)
        rows = {int((ids == r).all(1).nonzero()) for r in recorder.calls[-1]["input_ids"]}
        assert len(rows) == 4 and hardest_two <= rows
        picked.append(frozenset(rows))
    assert len(set(picked)) > 1   # the easier half is redrawn


def test_random_policy_needs_no_router_and_is_uniform():
    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                           num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=RandomRows(), seed=1)
    assert cggr.router is None
    recorder = RowRecorder(model)
    ids, labels = batch(B=8)
    counts = torch.zeros(8)
    for _ in range(40):
        cggr(ids, labels=labels)
        rows = [int((ids == r).all(1).nonzero()) for r in recorder.calls[-1]["input_ids"]]
        assert len(set(rows)) == 2
        counts[rows] += 1
    assert (counts > 0).all()


class OnesWeightedHardest(HardestRows):
    """The hardest rows, each with weight 1: the weighted loss path must give the model's own loss."""

    def select(self, row_scores, k, generator):
        hardest = super().select(row_scores, k, generator)
        return RowSelection(hardest.indices, torch.ones(k, device=row_scores.device))


class DoubleFirst(HardestRows):
    def select(self, row_scores, k, generator):
        hardest = super().select(row_scores, k, generator)
        weight = torch.ones(k)
        weight[0] = 2.0
        return RowSelection(hardest.indices, weight)


class EvenRows(RowPolicy):
    """A custom policy without a router: gets the batch size, returns the first k even rows."""

    def __init__(self):
        self.seen = []

    def select(self, batch_size, k, generator):
        self.seen.append(batch_size)
        return RowSelection(torch.arange(0, 2 * k, 2, device=generator.device), None)


def test_custom_row_policy_subclass_is_used():
    # the extension point: subclass RowPolicy (or a core policy) and pass an instance as policy=
    ids, labels = batch(B=8)
    labels[:, :3] = -100
    model = tiny_model("llama")
    base = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())(ids, labels=labels)
    ones = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0,
                     policy=OnesWeightedHardest(router=RouterSettings(layers=2)))
    torch.testing.assert_close(ones(ids, labels=labels), base, rtol=1e-6, atol=1e-6)
    recorder = RowRecorder(model)
    doubled = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0,
                        policy=DoubleFirst(router=RouterSettings(layers=2)))
    assert doubled.router is not None and doubled.router.num_layers == 2
    loss = doubled(ids, labels=labels)
    rows = recorder.calls[0]["input_ids"]
    picked = [int((ids == r).all(1).nonzero()) for r in rows]
    targets = labels[picked][:, 1:]
    with torch.no_grad():
        logits = model(rows).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    expected = (2 * nll[0].sum() + nll[1].sum()) / (targets != -100).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    # a policy that runs no router gets B and no router is built
    even = EvenRows()
    m = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=even)
    assert m.router is None and m.policy is even
    recorder = RowRecorder(model)
    m(ids, labels=labels)
    assert even.seen == [8] and m.selected_rows.tolist() == [0, 2, 4, 6]
    torch.testing.assert_close(recorder.calls[0]["input_ids"], ids[[0, 2, 4, 6]])


def test_custom_row_policy_contract_is_checked():
    model = tiny_model("llama")

    class NoSelect(RowPolicy):
        pass

    m = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, policy=NoSelect())
    ids, labels = batch(B=4)
    with pytest.raises(NotImplementedError):
        m(ids, labels=labels)

    class BadNorm(RandomRows):
        loss_norm = "tokens"

    with pytest.raises(ValueError, match=r"BadNorm.loss_norm must be one of \('selected', 'batch'\), got 'tokens'"):
        CGGRModel(model, policy=BadNorm())

    class Both(HardestRows):
        uses_reference_rows = True

    with pytest.raises(ValueError, match="either on router scores"):
        CGGRModel(model, policy=Both(router=RouterSettings(layers=2)))


# -- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_block(family):
    model = tiny_model(family).train()
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())
    ids, labels = batch(B=8)
    cggr(ids, labels=labels).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    blocks = {"llama": model.model.layers if family == "llama" else None,
              "gpt2": getattr(getattr(model, "transformer", None), "h", None),
              "gpt_neox": getattr(getattr(model, "gpt_neox", None), "layers", None)}[family]
    for i, block in enumerate(blocks):
        assert any(p.grad.abs().sum() > 0 for p in block.parameters()), f"block {i} got no gradient"
    # the router pass itself builds no graph
    assert all(m.training for m in model.modules())


def test_curriculum_row_count_and_step_and_state_dict():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=4, policy=hardest())
    assert sum(p.numel() for p in cggr.parameters()) == n_params
    recorder = RowRecorder(model)
    ids, labels = batch(B=8)
    seen = []
    for _ in range(6):
        cggr(ids, labels=labels)
        seen.append(recorder.calls[-1]["input_ids"].shape[0])
        cggr.step()
    assert seen == [8, 7, 5, 4, 2, 2]       # ceil(8 * (1 - 0.75 * min(s / 4, 1)))
    state = cggr.state_dict()
    assert list(state) == keys + [STEP_KEY] and int(state[STEP_KEY]) == 6
    resumed = CGGRModel(tiny_model("llama", seed=9), min_tokens_ratio=0.25, warmup_steps=4, policy=hardest())
    resumed.load_state_dict(state)
    assert resumed.step_count == 6
    torch.testing.assert_close(resumed.model.model.norm.weight, model.model.norm.weight)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "cggr_step"'):
        resumed.load_state_dict(model.state_dict())
    result = resumed.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [STEP_KEY] and result.unexpected_keys == [] and resumed.step_count == 6
    partial = dict(state)
    del partial["model.norm.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "model.norm.weight"'):
        resumed.load_state_dict(partial)
    # nested in a parent module: same layout under the parent's prefix, and loading resumes the step
    nested = torch.nn.ModuleDict({"inner": cggr}).state_dict()
    assert list(nested) == ["inner." + k for k in keys] + ["inner." + STEP_KEY]
    fresh = torch.nn.ModuleDict({"inner": CGGRModel(tiny_model("llama", seed=5), policy=hardest())})
    fresh.load_state_dict(nested)
    assert fresh["inner"].step_count == 6
    torch.testing.assert_close(fresh["inner"].model.lm_head.weight, model.lm_head.weight)


def test_metrics():
    model = tiny_model("llama")
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                     step_options=StepOptions(collect_timing=True))
    ids, labels = batch(B=8)
    labels[0, :] = -100
    cggr(ids, labels=labels).backward()
    cggr.step()
    m = cggr.get_metrics()
    assert m["step"] == 1 and m["sequences_selected"] == 2 and m["sequences_total"] == 8
    assert m["tokens_total"] == 7 * 11 and m["tokens_selected"] == 2 * 11
    assert m["token_ratio"] == pytest.approx(2 / 7)
    assert 0.0 < m["router_time_share"] < 1.0 and m["step_ms"] > m["router_ms"] > 0


def test_dynamic_threshold_sizes_rows_from_confidence():
    model = tiny_model("llama")
    # random weights: confidence ~ 1/V, so ratio = clamp(0.25 + 1.0 * (0.5 - c), 0.25, 1) ~ 0.74
    cggr = CGGRModel(model, policy=hardest(), schedule=RatioSchedule(min_tokens_ratio=0.25, warmup_steps=0,
                                                                     dynamic_threshold=True, threshold_sensitivity=1.0))
    recorder = RowRecorder(model)
    ids, labels = batch(B=8)
    cggr(ids, labels=labels)
    m = cggr.get_metrics()
    expected_ratio = 0.25 + (0.5 - m["avg_confidence"])
    assert m["row_ratio"] == pytest.approx(expected_ratio, rel=1e-5)
    assert recorder.calls[0]["input_ids"].shape[0] == math.ceil(expected_ratio * 8)


def test_without_labels_returns_plain_output():
    model = tiny_model("gpt2")
    cggr = CGGRModel(model, policy=hardest())
    ids, _ = batch(B=3)
    with torch.no_grad():
        torch.testing.assert_close(cggr(ids).logits, model(ids).logits)


def test_excess_loss_scoring_uses_reference_nll():
    model = tiny_model("llama")
    ids, labels = batch(B=4)
    reference = torch.zeros(4, 11)
    reference[1] = -100.0      # row 1 looks hugely "learnable" to the reference
    # ExcessLossRows' default stride (8) over a 2-block router, as the 0.5 call router_layers=2 gave
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0,
                     policy=ExcessLossRows(RouterSettings(layers=2, token_stride=8)))
    recorder = RowRecorder(model)
    cggr(ids, labels=labels, reference_nll=reference)
    torch.testing.assert_close(recorder.calls[0]["input_ids"], ids[1:2])
    with pytest.raises(ValueError, match=r"reference_nll: ExcessLossRows\(.*\) ranks rows by a reference model's NLL"):
        cggr(ids, labels=labels)
    with pytest.raises(ValueError, match=r"reference_nll: expected a tensor of shape \(4, 11\)"):
        cggr(ids, labels=labels, reference_nll=torch.zeros(4, 12))


def router_policy(scoring, router):
    return ExcessLossRows(router) if scoring == "excess_loss" else HardestRows(scoring, router)


@pytest.mark.parametrize("stride", [2, 3, 5])
@pytest.mark.parametrize("scoring", ["loss", "excess_loss", "entropy"])
def test_router_token_stride_scores_exactly_the_strided_positions(stride, scoring):
    """Stride s == stride 1 on labels that leave only positions s-1, 2s-1, ... scored (odd T = 13)."""
    torch.manual_seed(stride)
    model = tiny_model("llama")
    ids, labels = batch(B=5, T=13, seed=stride)
    reference = torch.randn(5, 12) if scoring == "excess_loss" else None
    kwargs = {} if reference is None else {"reference_nll": reference}
    positions = torch.arange(13)
    kept_targets = labels.clone()
    # position t predicts labels[t + 1]: keep the targets of the strided predicting positions only
    kept_targets[:, 1:][:, (positions[:-1] % stride) != stride - 1] = -100
    strided = CGGRModel(model, policy=router_policy(scoring, RouterSettings(layers=1, token_stride=stride)))
    dense = CGGRModel(model, policy=router_policy(scoring, RouterSettings(layers=1, token_stride=1)))
    rows_strided, _ = strided._score_rows(ids, labels, None, {}, reference)
    rows_dense, _ = dense._score_rows(ids, kept_targets, None, {}, reference)
    assert torch.isfinite(rows_strided).all()
    torch.testing.assert_close(rows_strided, rows_dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [0, -1, 1.5, True, "2"])
def test_router_token_stride_must_be_a_positive_int(stride):
    with pytest.raises(ValueError, match=r"RouterSettings.token_stride must be an int >= 1, got"):
        RouterSettings(layers=1, token_stride=stride)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("max_positions,stride", [(5, 1), (8, 3), (13, 2), (40, 1)])
def test_router_max_positions_scores_exactly_the_prefix(family, max_positions, stride):
    """The trunk on the first P positions == the full-length router with every target from P on ignored
    (causal attention), with right padding and a stride on top; P >= T is the full row."""
    torch.manual_seed(max_positions)
    model = tiny_model(family)
    ids, labels = batch(B=5, T=13, seed=max_positions)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    labels = labels.masked_fill(mask == 0, -100)
    reference = torch.randn(5, 12)
    kept = labels.clone()
    kept[:, 1:][:, torch.arange(12) >= max_positions] = -100   # position t (< P) keeps target t + 1
    short = CGGRModel(model, policy=ExcessLossRows(RouterSettings(layers=1, token_stride=stride,
                                                                  max_positions=max_positions)))
    full = CGGRModel(model, policy=ExcessLossRows(RouterSettings(layers=1, token_stride=stride)))
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    rows_short, _ = short._score_rows(ids, labels, mask, {}, reference)
    hook.remove()
    assert seen == [min(13, max_positions)]  # the trunk ran on the prefix only
    rows_full, _ = full._score_rows(ids, kept, mask, {}, reference)
    assert torch.isfinite(rows_short).all()
    torch.testing.assert_close(rows_short, rows_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short.router_row_nll, full.router_row_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_router_max_positions_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"RouterSettings.max_positions must be None or an int >= 1, got"):
        RouterSettings(layers=1, max_positions=bad)


@pytest.mark.parametrize("policy,layers,stride", [(ExcessLossRows(), 1, 8), (HardestRows("loss"), 4, 1),
                                                   (HardestRows("entropy"), 4, 1)])
def test_router_defaults_follow_the_policy(policy, layers, stride):
    assert policy.router == RouterSettings(layers=layers, token_stride=stride)
    model = tiny_model("llama", layers=6)
    m = CGGRModel(model, policy=policy)
    assert m.router.num_layers == layers and m.policy.router.token_stride == stride
    explicit = CGGRModel(model, policy=type(policy)(router=RouterSettings(layers=2, token_stride=3)))
    assert explicit.router.num_layers == 2 and explicit.policy.router.token_stride == 3
    # a router given to CGGRModel wins over the policy's depth
    given = CGGRModel(model, policy=policy, router=create_truncated_router(model, num_layers=3))
    assert given.router.num_layers == 3


# -- bad input -----------------------------------------------------------------------------------

def test_labels_shape_mismatch():
    cggr = CGGRModel(tiny_model("llama"), policy=hardest())
    ids, labels = batch()
    with pytest.raises(ValueError, match=r"labels: expected shape \(8, 12\) to match input_ids, got \(8, 11\)"):
        cggr(ids, labels=labels[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask: expected a 2-D mask of shape \(8, 12\)"):
        cggr(ids, labels=labels, attention_mask=torch.ones(8, 1, 12, 12))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, True, "0.5"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"min_tokens_ratio must be a number in \(0, 1\]"):
        CGGRModel(tiny_model("llama"), min_tokens_ratio=ratio, policy=hardest())


def test_router_layers_not_smaller_than_depth():
    with pytest.raises(ValueError, match=r"RouterSettings\(layers=.*4 blocks"):
        CGGRModel(tiny_model("gpt2", layers=4), policy=hardest(layers=4))


def test_unsupported_architecture():
    class UnsupportedForCausalLM(torch.nn.Module):  # a causal LM by name, of no family the router knows
        def forward(self, input_ids, **kwargs):
            return None

    with pytest.raises(TypeError, match="unsupported architecture UnsupportedForCausalLM"):
        CGGRModel(UnsupportedForCausalLM(), policy=hardest(layers=1))
    CGGRModel(UnsupportedForCausalLM(), policy=RandomRows())  # no router pass: any causal LM


def test_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"policy must be 'auto' or a cggr.RowPolicy .*got 'topk'"):
        CGGRModel(model, policy="topk")
    with pytest.raises(TypeError, match="policy must be 'auto' or a cggr.RowPolicy, got type"):
        CGGRModel(model, policy=HardestRows)  # the class, not an instance
    with pytest.raises(ValueError, match="scoring must be one of"):
        HardestRows(scoring="perplexity")
    with pytest.raises(ValueError, match=r"HardestRows\(scoring='excess_loss'\): use cggr.ExcessLossRows\(\)"):
        HardestRows(scoring="excess_loss")
    with pytest.raises(ValueError, match="combined_weights apply to scoring='combined' only"):
        HardestRows(scoring="loss", combined_weights={"entropy": 1.0})
    with pytest.raises(TypeError, match="router must be a cggr.RouterSettings"):
        HardestRows(router=2)
    with pytest.raises(ValueError, match="StepOptions.compile must be False, True or one of"):
        StepOptions(compile="everything")
    with pytest.raises(TypeError, match="step_options must be a cggr.StepOptions, got dict"):
        CGGRModel(model, policy=hardest(), step_options={"loss_impl": "fused"})
    with pytest.raises(ValueError, match="schedule must be one of"):
        CGGRModel(model, schedule="step")
    with pytest.raises(ValueError, match="not both"):
        CGGRModel(model, min_tokens_ratio=0.5, schedule=RatioSchedule(0.5, 0))
    with pytest.raises(ValueError, match="router must be built on the same model"):
        CGGRModel(model, router=create_truncated_router(tiny_model("llama"), 2))
    with pytest.raises(TypeError, match="router must be a cggr TruncatedRouter"):
        CGGRModel(model, router=lambda ids: ids)


def test_bf16_model_and_autocast():
    ids, labels = batch(B=8)
    model = tiny_model("llama").to(torch.bfloat16)
    cggr = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())
    loss = cggr(ids, labels=labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    fp32 = tiny_model("gpt2")
    cggr = CGGRModel(fp32, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())
    recorder = RowRecorder(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cggr(ids, labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and recorder.calls[0]["input_ids"].shape == (2, 12)


# -- loss_impl='fused' (cggr.linear) -------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_matches_model_loss(family):
    ids, labels = batch(B=6)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels[1, 8:] = -100
    labels[4, :3] = -100
    plain = tiny_model(family)
    plain_loss = plain(ids, attention_mask=mask, labels=labels).loss
    plain_loss.backward()
    model = tiny_model(family)
    cggr = CGGRModel(model, min_tokens_ratio=1.0, warmup_steps=0, policy=hardest(),
                     step_options=StepOptions(loss_impl="fused"))
    loss = cggr(ids, labels=labels, attention_mask=mask)
    loss.backward()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    expected, got = grads(plain), grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_rows_and_token_ratio():
    ids, labels = batch(B=8)
    model = tiny_model("llama")
    eager = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest())
    fused = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                      step_options=StepOptions(loss_impl="fused"))
    torch.testing.assert_close(fused(ids, labels=labels), eager(ids, labels=labels), rtol=1e-5, atol=1e-6)
    half = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=0, policy=hardest(),
                     step_options=StepOptions(loss_impl="fused", token_ratio=0.5))
    recorder = RowRecorder(model.model)    # fused mode runs the base model
    loss = half(ids, labels=labels)
    rows = recorder.calls[0]["input_ids"]
    assert rows.shape == (2, 12)
    # mean nll of the hardest half (by the full model's nll) of the selected rows' 22 targets
    with torch.no_grad():
        logits = model(rows).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").flatten()  # labels == ids
    torch.testing.assert_close(loss.detach(), torch.topk(nll, 11).values.mean(), rtol=1e-5, atol=1e-6)
    assert half.get_metrics()["tokens_selected"] == 11
    with pytest.raises(ValueError, match="token_ratio < 1 .* needs loss_impl='fused'"):
        StepOptions(token_ratio=0.5)
    with pytest.raises(ValueError, match="StepOptions.loss_impl must be one of"):
        StepOptions(loss_impl="liger")


def test_auto_policy_follows_the_measurements():
    # BENCHMARKS.md: without a reference, router difficulty never beat random rows on the data mix, so
    # 'auto' is RandomRows with no router pass; a router given to CGGRModel is used: HardestRows over it.
    plain = CGGRModel(tiny_model("llama"))
    assert plain.policy == RandomRows() and plain.router is None  # no router pass at all
    model = tiny_model("llama")
    routed = CGGRModel(model, router=create_truncated_router(model, num_layers=2), min_tokens_ratio=0.375,
                       warmup_steps=0)
    assert isinstance(routed.policy, HardestRows) and routed.policy.scoring == "loss"
    assert routed.router.num_layers == 2
    ids, labels = batch(B=8, seed=3)
    routed(ids, labels=labels)
    expected = torch.topk(reference_row_nll(model, 2, ids, labels), 3).indices.sort().values
    torch.testing.assert_close(routed.selected_rows, expected)
    # the dynamic threshold reads the router's batch confidence: with a policy that runs no router, an error
    dynamic = RatioSchedule(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=True)
    with pytest.raises(ValueError, match=r"RandomRows\(\) runs no router: use a router policy \(HardestRows"):
        CGGRModel(tiny_model("llama"), schedule=dynamic)
    routed_dynamic = CGGRModel(tiny_model("llama"), policy=hardest(), schedule=dynamic)
    loss = routed_dynamic(ids, labels=labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert 4 <= routed_dynamic.get_metrics()["sequences_selected"] <= 8
