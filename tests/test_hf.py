"""cggr.hf: CGGRTrainer / CGGRSFTTrainer on a real transformers Trainer, a tiny random Llama, CPU."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

pytest.importorskip("accelerate")  # transformers' Trainer needs it

from cggr import (ExcessLossRows, HardestRows, RandomRows, ReferenceFilter, ReferenceModel,  # noqa: E402
                  RouterSettings, StepOptions)
from cggr.hf import CGGRCallback, CGGRConfig, CGGRTrainer  # noqa: E402
from cggr.router import create_truncated_router  # noqa: E402

from test_router import VOCAB, tiny_model  # noqa: E402  (tests/ is on sys.path)

ROUTER = RouterSettings(layers=2)


def examples(n=16, seed=0, min_len=5, max_len=14):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(1, VOCAB, (L,), generator=g).tolist()} for L in lengths]


def pad_collate(features):
    """Right padding, labels = input_ids (-100 on padding), an attention mask."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": torch.where(mask.bool(), ids, -100), "attention_mask": mask}


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_steps=1, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                  optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                  train_sampling_strategy="sequential", seed=0)
    kwargs.update(overrides)
    return tf.TrainingArguments(**kwargs)


def trainer(tmp_path, model=None, data=None, config=None, collator=pad_collate, cls=CGGRTrainer, **args):
    return cls(model=tiny_model("llama") if model is None else model, args=training_args(tmp_path, **args),
               train_dataset=examples() if data is None else data, data_collator=collator,
               cggr_config=config or CGGRConfig(policy=HardestRows(router=ROUTER), min_tokens_ratio=0.5,
                                                 warmup_steps=0))


class ForwardRecorder:
    """Forward pre-hook on the trained model: the tensors of every forward it runs."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def router_row_nll(model, ids, labels, mask):
    """Row difficulty for HardestRows(scoring='loss'), brute force: logit-lens logits + F.cross_entropy."""
    with torch.no_grad():
        logits = create_truncated_router(model, num_layers=ROUTER.layers).logits(ids, attention_mask=mask)
    return masked_row_nll(logits, labels, mask)


def masked_row_nll(logits, labels, mask, reduce=True):
    targets = labels[:, 1:]
    valid = (targets != -100) & mask[:, :-1].bool() & mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum(1) / valid.sum(1).clamp_min(1) if reduce else (nll, valid)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the loss over the accumulation window ----------------------------------------------------------------
def test_one_step_with_accumulation_matches_a_hand_computed_window(tmp_path):
    """GA 2, 4 rows per micro-batch, ratio 0.5: each micro-batch trains its 2 hardest rows (router NLL), and the
    step's loss and gradient are sum(NLL of trained targets) / (trained targets of the whole window)."""
    data = examples()
    model = tiny_model("llama")
    start = params(model)
    reference = tiny_model("llama")  # same seed: the same initial weights, for the hand computation
    t = trainer(tmp_path, model=model, data=data)
    recorder = ForwardRecorder(model)
    t.train()

    # by hand: which rows, then the window's loss and gradient on a fresh copy
    nll_sum, n_targets, kept = 0.0, 0, []
    reference.train()
    for micro in (data[0:4], data[4:8]):
        batch = pad_collate(micro)
        rows = router_row_nll(reference, batch["input_ids"], batch["labels"], batch["attention_mask"])
        idx = torch.sort(torch.topk(rows, 2).indices).values
        kept.append(batch["input_ids"][idx])
        sub = {k: v[idx] for k, v in batch.items()}
        logits = reference(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        nll, valid = masked_row_nll(logits, sub["labels"], sub["attention_mask"], reduce=False)
        nll_sum = nll_sum + nll.sum()
        n_targets += int(valid.sum())
    expected = nll_sum / n_targets
    expected.backward()
    expected = expected.detach()

    trained = [call["input_ids"] for call in recorder.calls]
    assert len(trained) == 2
    for got, want in zip(trained, kept):
        assert torch.equal(got[:, :want.shape[1]], want)  # the collated rows, cut to the kept ones
    logged = t.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected.item(), abs=1e-5)
    # SGD, lr 1, no clipping: the update is minus the gradient of the hand-computed window loss
    for name, p in model.named_parameters():
        grad = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(start[name] - p.detach(), grad, atol=2e-5, rtol=1e-4)
    # the callback's keys, in log_history (and so in what every reporter gets)
    for key in ("cggr/kept_ratio", "cggr/kept_rows", "cggr/router_time_share", "cggr/selected_score",
                "cggr/curriculum_ratio", "cggr/step"):
        assert key in logged, key
    assert logged["cggr/kept_rows"] == 0.5
    assert logged["cggr/kept_ratio"] == pytest.approx(n_targets / sum(len(e["input_ids"]) - 1 for e in data[:8]))
    assert 0.0 < logged["cggr/router_time_share"] < 1.0
    assert isinstance(t.callback_handler.callbacks[0], CGGRCallback)
    assert t.cggr_model.step_count == 1


def test_eval_loss_is_over_every_row(tmp_path):
    data = examples(8, seed=3)
    t = trainer(tmp_path, data=data, per_device_eval_batch_size=8,
                config=CGGRConfig(policy=HardestRows(router=ROUTER), min_tokens_ratio=0.25, warmup_steps=0))
    metrics = t.evaluate(eval_dataset=data)
    batch = pad_collate(data)
    with torch.no_grad():
        expected = t.model.eval()(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert t.cggr_model.step_count == 0  # evaluation advanced no curriculum


# -- resume -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [HardestRows(router=ROUTER), RandomRows()], ids=["hardest", "random"])
def test_resume_continues_the_selection_state_and_the_losses(tmp_path, policy):
    """A linear curriculum over 4 steps (the ratio, so the row count, changes every step); a run resumed from the
    step-2 checkpoint logs the same losses and ends with the same weights as the uninterrupted run."""
    config = CGGRConfig(policy=policy, min_tokens_ratio=0.25, warmup_steps=4)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, train_sampling_strategy="random",
                  learning_rate=0.5)
    full = trainer(tmp_path / "full", config=config, **common)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    state = json.loads((checkpoint / "cggr_state.json").read_text())
    assert state["cggr_step"] == 2

    resumed = trainer(tmp_path / "full", config=config, **common)
    assert resumed.cggr_model.step_count == 0
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.cggr_model.step_count == full.cggr_model.step_count == 4

    def losses(t):
        return {log["step"]: (log["loss"], log["cggr/kept_rows"], log["cggr/step"])
                for log in t.state.log_history if "loss" in log}

    got, want = losses(resumed), losses(full)  # steps 1-2 come from the checkpoint's trainer state
    assert set(got) == set(want) == {1, 2, 3, 4}
    assert [want[s][1] for s in (1, 2, 3, 4)] == [1.0, 1.0, 0.75, 0.5]  # the curriculum: 4, 4, 3, 2 rows of 4
    for step in (3, 4):
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-6)
        assert got[step][1:] == want[step][1:] == (want[step][1], step)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_second_train_without_resume_restarts_the_selection_state(tmp_path):
    """model_init, train() twice: the second run starts from a new model and global_step 0, and so does its
    curriculum (the same kept rows and losses as the first run), not from the first run's last step."""
    config = CGGRConfig(policy=RandomRows(), min_tokens_ratio=0.25, warmup_steps=2)
    t = CGGRTrainer(model_init=lambda: tiny_model("llama"), args=training_args(tmp_path, max_steps=2),
                    train_dataset=examples(), data_collator=pad_collate, cggr_config=config)

    def logged(run):
        return [(log["loss"], log["cggr/kept_rows"], log["cggr/step"]) for log in run.log_history if "loss" in log]

    t.train()
    first = logged(t.state)
    assert [kept for _, kept, _ in first] == [1.0, 0.75] and t.cggr_model.step_count == 2
    t.train()
    assert t.cggr_model.step_count == 2
    assert logged(t.state) == first


def test_the_cggr_state_is_in_the_checkpoint_when_it_is_pushed(tmp_path):
    """push_to_hub pushes each checkpoint folder from inside Trainer._save_checkpoint: cggr_state.json must be
    there by then (no network: the push is replaced by a recorder; push_to_hub set after construction, where
    the Trainer would create the Hub repository)."""
    t = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    t.args.push_to_hub = True
    pushed = []
    t._push_from_checkpoint = lambda folder: pushed.append(
        (os.path.basename(folder), os.path.exists(os.path.join(folder, "cggr_state.json"))))
    t.train()
    assert pushed == [("checkpoint-1", True), ("checkpoint-2", True)]
    with open(tmp_path / "out" / "checkpoint-2" / "cggr_state.json") as f:
        assert json.load(f)["cggr_step"] == 2


# -- packed (padding-free) batches ----------------------------------------------------------------------------
def test_packed_batches_select_whole_sequences(tmp_path):
    """DataCollatorWithFlattening packs a micro-batch into one row; each packed sequence is a row to select, and
    the trained forward is packed again (position_ids restart at each kept sequence)."""
    data = examples(12, seed=5)
    model = tiny_model("llama")
    reference = tiny_model("llama")
    t = trainer(tmp_path, model=model, data=data, collator=tf.DataCollatorWithFlattening(),
                per_device_train_batch_size=6, gradient_accumulation_steps=2)
    recorder = ForwardRecorder(model)
    t.train()

    nll_sum, n_targets = 0.0, 0
    for micro, call in zip((data[0:6], data[6:12]), recorder.calls):
        batch = pad_collate(micro)
        rows = router_row_nll(reference, batch["input_ids"], batch["labels"], batch["attention_mask"])
        idx = torch.sort(torch.topk(rows, 3).indices).values
        lengths = batch["attention_mask"][idx].sum(1)
        want_ids = torch.cat([batch["input_ids"][i, :n] for i, n in zip(idx, lengths)])
        assert call["input_ids"].shape[0] == 1 and torch.equal(call["input_ids"][0], want_ids)
        assert torch.equal(call["position_ids"][0], torch.cat([torch.arange(int(n)) for n in lengths]))
        sub = {k: v[idx] for k, v in batch.items()}
        with torch.no_grad():
            logits = reference(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        nll, valid = masked_row_nll(logits, sub["labels"], sub["attention_mask"], reduce=False)
        nll_sum += float(nll.sum())
        n_targets += int(valid.sum())
    assert len(recorder.calls) == 2
    assert t.state.log_history[0]["loss"] == pytest.approx(nll_sum / n_targets, abs=1e-5)
    assert t.state.log_history[0]["cggr/kept_rows"] == 0.5


def test_a_packed_micro_batch_without_targets_runs_its_forward_and_trains_nothing(tmp_path):
    """A packed micro-batch whose sequences are all unlabelled (-100): its forward still runs (on the whole
    batch: data-parallel ranks run the same collectives) with a zero loss; the window's loss and update are
    the other micro-batch's alone. A window with no target at all trains nothing (loss 0, not NaN)."""
    data = examples(12, seed=5)
    data = [dict(e, labels=[-100] * len(e["input_ids"])) if i < 6 else e for i, e in enumerate(data)]
    runs = {}
    for name, subset, accumulation in (("mixed", data, 2), ("labelled", data[6:], 1), ("unlabelled", data[:6], 1)):
        model = tiny_model("llama")
        t = trainer(tmp_path / name, model=model, data=subset, collator=tf.DataCollatorWithFlattening(),
                    per_device_train_batch_size=6, gradient_accumulation_steps=accumulation)
        recorder = ForwardRecorder(model)
        t.train()
        runs[name] = (recorder.calls, t.state.log_history[0], params(model))
    calls, log, weights = runs["mixed"]
    assert len(calls) == 2
    assert torch.equal(calls[0]["input_ids"][0], torch.tensor([i for e in data[:6] for i in e["input_ids"]]))
    assert "labels" not in calls[0]
    _, want_log, want_weights = runs["labelled"]
    assert log["loss"] == pytest.approx(want_log["loss"], abs=1e-6)
    assert log["cggr/kept_rows"] == want_log["cggr/kept_rows"] == 0.5  # the unlabelled sequences are no rows
    for name, w in weights.items():
        torch.testing.assert_close(w, want_weights[name], msg=name)
    calls, log, weights = runs["unlabelled"]
    assert len(calls) == 1 and log["loss"] == 0.0
    start = params(tiny_model("llama"))
    assert all(torch.equal(w, start[name]) for name, w in weights.items())


# -- references -----------------------------------------------------------------------------------------------
def test_reference_on_the_fly_and_precomputed_column_choose_the_same_rows(tmp_path):
    data = examples(8, seed=7)
    ref_lm = tiny_model("llama", seed=11)
    reference = ReferenceModel(ref_lm)
    with_column = []
    for e in data:
        ids = torch.tensor([e["input_ids"]])
        with_column.append({**e, "ref_nll": reference(ids)[0].tolist()})

    runs = {}
    for name, ref, dataset in (("fly", reference, data), ("column", "ref_nll", with_column)):
        model = tiny_model("llama")
        config = CGGRConfig(reference=ref, policy=ExcessLossRows(router=RouterSettings(layers=1, token_stride=2)),
                            min_tokens_ratio=0.5, warmup_steps=0)
        assert config.resolved_policy() == ExcessLossRows(router=RouterSettings(layers=1, token_stride=2))
        t = trainer(tmp_path / name, model=model, data=dataset, config=config)
        recorder = ForwardRecorder(model)
        t.train()
        runs[name] = ([c["input_ids"] for c in recorder.calls], t.state.log_history[0])
    (ids_fly, log_fly), (ids_col, log_col) = runs["fly"], runs["column"]
    for a, b in zip(ids_fly, ids_col):
        assert torch.equal(a, b)
    assert log_fly["loss"] == pytest.approx(log_col["loss"], abs=1e-6)
    assert log_fly["cggr/selected_score"] == pytest.approx(log_col["cggr/selected_score"], abs=1e-5)


def test_reference_filter_with_a_per_row_column(tmp_path):
    """One float per example (the row's mean reference NLL): ReferenceFilter keeps the rows at or under the
    threshold first."""
    data = [{**e, "ref": float(i % 4)} for i, e in enumerate(examples(8, seed=2))]
    model = tiny_model("llama")
    t = trainer(tmp_path, model=model, data=data,
                config=CGGRConfig(policy=ReferenceFilter(threshold=1.0), reference="ref", min_tokens_ratio=0.5,
                                  warmup_steps=0))
    recorder = ForwardRecorder(model)
    t.train()
    for call, micro in zip(recorder.calls, (data[0:4], data[4:8])):
        batch = pad_collate(micro)
        assert torch.equal(call["input_ids"], batch["input_ids"][[0, 1]][:, :call["input_ids"].shape[1]])
    assert t.state.log_history[0]["cggr/selected_score"] == pytest.approx(0.5)


# -- PEFT, bf16, gradient checkpointing ---------------------------------------------------------------------
def test_lora_adapters_are_trained_and_routed(tmp_path):
    """With gradient checkpointing (PEFT's input-grad hook): only the adapters change."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                       init_lora_weights=False))
    start = params(model)
    t = trainer(tmp_path, model=model, learning_rate=0.1, gradient_checkpointing=True)
    assert t.cggr_model.model is model.get_base_model()
    # the router runs the adapted layers: its scores change when the adapters are off
    batch = pad_collate(examples()[:4])
    router = t.cggr_model.router
    with torch.no_grad():
        adapted = router(batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
        with model.disable_adapter():
            plain = router(batch["input_ids"], attention_mask=batch["attention_mask"]).hidden
    assert not torch.allclose(adapted, plain)
    t.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_a_lora_adapter_on_lm_head_is_refused_by_the_fused_loss():
    """The fused loss reads lm_head.weight directly: an adapted head (PEFT wrapper or its base model) is refused
    with what to do, instead of its adapter being ignored; the model's own loss, or no adapter on lm_head, run."""
    peft = pytest.importorskip("peft")
    from cggr import CGGRModel

    def lora(targets):
        return peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=targets,
                                                                         task_type="CAUSAL_LM"))

    fused, plain = StepOptions(loss_impl="fused"), StepOptions(loss_impl="model")
    adapted = lora(["q_proj", "lm_head"])
    for model in (adapted, adapted.get_base_model()):
        with pytest.raises(ValueError, match=r"loss_impl='fused'\) does not support an adapted LM head: .*peft.*"
                                             r"reads lm_head.weight directly.*target_modules.*loss_impl='model'"):
            CGGRModel(model, policy=RandomRows(), step_options=fused)
    CGGRModel(adapted.get_base_model(), policy=RandomRows(), step_options=plain)
    CGGRModel(lora(["q_proj"]).get_base_model(), policy=RandomRows(), step_options=fused)


def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    data = examples(16, seed=4)
    model = tiny_model("llama")
    start = params(model)
    t = trainer(tmp_path, model=model, data=data, bf16=True, gradient_checkpointing=True, max_steps=2,
                learning_rate=1e-2)
    t.train()
    logs = [log for log in t.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(log["cggr/kept_rows"] == 0.5 for log in logs)
    assert model.is_gradient_checkpointing
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())


class ToyForCausalLM(torch.nn.Module):
    """A causal LM outside the router's shape: an embedding and an LM head, no decoder blocks."""

    def __init__(self):
        super().__init__()
        self.config = tf.PretrainedConfig()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.lm_head = torch.nn.Linear(8, VOCAB)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])
        return tf.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="no reference was given"):
        CGGRConfig(policy=ExcessLossRows())
    with pytest.raises(ValueError, match="does not use it"):
        CGGRConfig(policy=RandomRows(), reference="ref_nll")
    for ratio in (0.0, 1.5, -0.25):
        with pytest.raises(ValueError, match=r"min_tokens_ratio must be a number in \(0, 1\]"):
            CGGRConfig(min_tokens_ratio=ratio)
    from cggr.experimental import ImportanceRows

    with pytest.raises(ValueError, match="weights the selected rows"):
        CGGRConfig(policy=ImportanceRows())
    with pytest.raises(ValueError, match="loss_impl='fused'"):
        CGGRConfig(step_options=StepOptions(loss_impl="fused"))
    with pytest.raises(TypeError, match="cggr_config must be"):
        trainer(tmp_path, config={"policy": "auto"})
    # not a causal LM
    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="causal LM"):
        trainer(tmp_path, model=bert)
    # a router policy with a causal LM the router cannot take apart (no decoder blocks)
    with pytest.raises((TypeError, ValueError), match="ToyForCausalLM"):
        trainer(tmp_path, model=ToyForCausalLM())
    trainer(tmp_path, model=ToyForCausalLM(), config=CGGRConfig(policy=RandomRows(), min_tokens_ratio=0.5))  # no router
    # a reference with another vocabulary, or the trained model itself
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB + 5, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        trainer(tmp_path, config=CGGRConfig(reference=other))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="frozen_copy"):
        trainer(tmp_path, model=model, config=CGGRConfig(reference=model))
    assert any(p.requires_grad for p in model.parameters())  # left untouched


def test_a_batch_without_labels_is_an_error(tmp_path):
    def no_labels(features):
        batch = pad_collate(features)
        batch.pop("labels")
        return batch

    t = trainer(tmp_path, collator=no_labels)
    with pytest.raises(ValueError, match="has none"):
        t.train()


# -- TRL ----------------------------------------------------------------------------------------------------------
def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_sft_trainer(tmp_path, padding_free):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from cggr.hf import CGGRSFTTrainer

    data = datasets.Dataset.from_list([{"input_ids": e["input_ids"]} for e in examples(16, seed=9)])
    model = tiny_model("llama")
    start = params(model)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True, padding_free=padding_free, learning_rate=1e-2,
                         dataset_kwargs={"skip_prepare_dataset": True}, bf16=False, max_length=None)
    t = CGGRSFTTrainer(model=model, args=args, train_dataset=data, processing_class=_word_tokenizer(),
                       cggr_config=CGGRConfig(policy=HardestRows(router=ROUTER), min_tokens_ratio=0.5,
                                              warmup_steps=0))
    recorder = ForwardRecorder(model)
    t.train()
    logs = [log for log in t.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["cggr/kept_rows"] == 0.5 for log in logs)
    assert "mean_token_accuracy" in logs[0]  # TRL's own metrics still there
    rows = [c["input_ids"].shape[0] for c in recorder.calls]
    assert rows == ([1] * 4 if padding_free else [2] * 4)
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters())


def test_sft_trainer_without_trl_names_the_install(monkeypatch):
    import cggr.hf as hf

    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "cggr.hf.sft", raising=False)
    monkeypatch.delattr(hf, "CGGRSFTTrainer", raising=False)
    with pytest.raises(ImportError, match="pip install trl"):
        hf.CGGRSFTTrainer
    assert os.path.basename(hf.__file__) == "__init__.py"


def test_add_reference_nll_equals_the_reference_row_by_row():
    """cggr.hf.add_reference_nll (batched, padded) gives each example what the reference gives it alone."""
    datasets = pytest.importorskip("datasets")
    from cggr.hf import add_reference_nll

    data = examples(7, seed=3)
    data[2]["labels"] = [-100, -100] + data[2]["input_ids"][2:]  # a prompt whose targets are not trained
    for e in data:
        e.setdefault("labels", list(e["input_ids"]))
    reference = ReferenceModel(tiny_model("llama", seed=11))
    dataset = add_reference_nll(datasets.Dataset.from_list(data), reference, column="ref", batch_size=3)
    for e, row in zip(data, dataset["ref"]):
        alone = reference(torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]))[0]
        assert len(row) == len(e["input_ids"]) - 1
        torch.testing.assert_close(torch.tensor(row), alone, rtol=1e-5, atol=1e-5)
    assert dataset["ref"][2][0] == 0.0  # label -100: no NLL
    with pytest.raises(ValueError, match="column 'ref' already exists"):
        add_reference_nll(dataset, reference, column="ref")
    with pytest.raises(ValueError, match="an example of 1 token"):
        add_reference_nll(datasets.Dataset.from_list([{"input_ids": [3]}]), reference)


def test_an_iterable_dataset_that_runs_out_does_not_advance_the_curriculum(tmp_path):
    """An IterableDataset shorter than max_steps: the Trainer asks for windows of an exhausted iterator;
    the curriculum counts optimizer steps only, in the logs and in the checkpoints."""
    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            return iter(self.data)

    t = trainer(tmp_path, data=Stream(examples(8)), max_steps=6, gradient_accumulation_steps=1,
                save_strategy="steps", save_steps=2,
                config=CGGRConfig(policy=RandomRows(), min_tokens_ratio=0.25, warmup_steps=6))
    t.train()
    assert t.cggr_model.step_count == t.state.global_step == 6
    with open(tmp_path / "out" / "checkpoint-4" / "cggr_state.json") as f:
        assert json.load(f)["cggr_step"] == 4


# -- compiled blocks ------------------------------------------------------------------------------------------
def test_blocks_compiled_in_place_train_the_same_through_the_trainer(tmp_path):
    """StepOptions(compile='blocks'): the router and the Trainer's forward run the compiled blocks (Dynamo with
    the eager backend here: graphs and guards, no code generation), with the same losses and weights."""
    results = []
    for options in (None, StepOptions(compile="blocks", compile_options={"backend": "eager"})):
        model = tiny_model("llama")
        config = CGGRConfig(policy=HardestRows(router=ROUTER), min_tokens_ratio=0.5, warmup_steps=0,
                            step_options=options)
        t = trainer(tmp_path / str(len(results)), model=model, config=config, max_steps=2)
        t.train()
        if options is not None:
            assert all(block._compiled_call_impl is not None for block in model.model.layers)
        results.append(([h["loss"] for h in t.state.log_history if "loss" in h], params(model)))
    (losses, weights), (compiled_losses, compiled_weights) = results
    assert compiled_losses == pytest.approx(losses, rel=1e-5)
    for name, w in weights.items():
        torch.testing.assert_close(compiled_weights[name], w, atol=1e-5, rtol=1e-5)


def test_cuda_graphed_blocks_need_a_cuda_trainer(tmp_path):
    config = CGGRConfig(min_tokens_ratio=0.5, warmup_steps=0, step_options=StepOptions(compile="blocks-cudagraphs"))
    with pytest.raises(ValueError, match=r"StepOptions\(compile='blocks-cudagraphs'\) replays CUDA graphs, and this "
                                         "Trainer runs on cpu; use compile='blocks' there"):
        trainer(tmp_path, config=config)
    with pytest.raises(ValueError, match="compile='all'"):
        CGGRConfig(step_options=StepOptions(compile="all"))
