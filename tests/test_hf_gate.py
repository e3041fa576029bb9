"""CGGRConfig(policy=ConfidenceGate(...)) in CGGRTrainer: pruned epochs, the weighted loss, resume (CPU)."""
import math

import pytest
import torch

pytest.importorskip("accelerate")

from cggr import ConfidenceGate  # noqa: E402
from cggr.pruning import ConfidenceGatedStream  # noqa: E402
from cggr.hf import CGGRConfig  # noqa: E402

from test_hf import examples, pad_collate, trainer  # noqa: E402  (tests/ is on sys.path)
from test_router import tiny_model  # noqa: E402

GATE = ConfidenceGate(prune_ratio=0.5, anneal=0.25)


def gated(tmp_path, **args):
    defaults = dict(max_steps=-1, num_train_epochs=4, gradient_accumulation_steps=1, learning_rate=0.3)
    return trainer(tmp_path, config=CGGRConfig(policy=GATE, seed=1), **{**defaults, **args})


def test_passes_are_pruned_and_the_tail_is_full(tmp_path):
    """4 Trainer epochs of 16 rows (16 steps of 4): the first pass trains every row, later passes leave
    well-fit rows out (so the 64 rows of the stream hold more than 4 passes), the tail is full again."""
    t = gated(tmp_path, logging_steps=1)
    t.train()
    sampler = t.cggr_gate.sampler
    assert isinstance(sampler, ConfidenceGatedStream) and sampler.num_epochs == 4
    assert not torch.isnan(sampler.scores).any()  # every example was trained and scored
    assert t.state.global_step == 16 and sampler.pass_index >= 4
    pruned = [log["cggr/pruned_rows"] for log in t.state.log_history if "cggr/pruned_rows" in log]
    assert pruned[0] == 0 and max(pruned) > 0 and pruned[-1] == 0


def test_the_loss_is_the_weighted_mean_over_the_window(tmp_path):
    """One optimizer step of 2 micro-batches in the first (unpruned) epoch: the logged loss is the mean NLL
    over every target of the window's 8 rows, the rows the sampler put first."""
    t = gated(tmp_path, max_steps=1, gradient_accumulation_steps=2, learning_rate=0.0, logging_steps=1)
    model_before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    stream = ConfidenceGatedStream(16, 4, GATE, seed=1)  # the same stream, from its start
    stream.set_epoch(0)
    order = [index for index, weight in list(stream)[:8]]
    batch = pad_collate([examples()[i] for i in order])
    model = t.model.eval()
    for n, p in model.named_parameters():
        assert torch.equal(p, model_before[n])  # learning rate 0
    with torch.no_grad():
        expected = model(**batch).loss
    logged = [log["loss"] for log in t.state.log_history if "loss" in log][0]
    assert logged == pytest.approx(float(expected), rel=1e-4)


def test_resume_in_a_pruned_epoch_continues_the_same_run(tmp_path):
    common = dict(save_strategy="steps", save_steps=5, logging_steps=1)
    full = gated(tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-5"  # epoch 1 (pruned): after 4 + 1 steps
    assert (checkpoint / "cggr_gate.pt").exists()
    resumed = gated(tmp_path / "full", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step
    assert torch.equal(resumed.cggr_gate.sampler.scores, full.cggr_gate.sampler.scores)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_bad_configurations(tmp_path):
    from cggr import ReferenceModel
    from test_router import tiny_model

    with pytest.raises(ValueError, match="ConfidenceGate scores examples by the model's own training loss"):
        CGGRConfig(policy=GATE, reference=ReferenceModel(tiny_model("llama")))
    from transformers import DataCollatorWithFlattening

    t = gated(tmp_path, max_steps=1, collator=DataCollatorWithFlattening(return_position_ids=True))
    with pytest.raises(ValueError, match="a packed batch"):
        t.train()


def test_planned_epochs_from_max_steps():
    from types import SimpleNamespace

    from cggr.hf.gate import planned_epochs

    args = SimpleNamespace(max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1,
                           num_train_epochs=3.0)
    assert planned_epochs(args, 16) == math.ceil(10 * 8 / 16)
    assert planned_epochs(SimpleNamespace(**{**vars(args), "max_steps": -1}), 16) == 3


def test_a_datasets_dataset_with_unused_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([{**e, "text": "unused"} for e in examples()])
    t = trainer(tmp_path, data=data, config=CGGRConfig(policy=GATE), max_steps=2, gradient_accumulation_steps=1)
    t.train()
    assert t.state.global_step == 2 and int((~torch.isnan(t.cggr_gate.sampler.scores)).sum()) == 8
    assert t.train_dataset is data  # the trainer's dataset is given back unchanged


def test_a_model_without_loss_kwargs_gets_the_same_window_loss(tmp_path):
    """The gate's loss is normalised over the window already: the Trainer must not divide it by the
    accumulation steps again for a model that declares accepts_loss_kwargs = False."""
    losses = []
    for accepts in (True, False):
        model = tiny_model("llama")
        model.accepts_loss_kwargs = accepts
        t = trainer(tmp_path / str(accepts), model=model, data=examples(32), gradient_accumulation_steps=4,
                    config=CGGRConfig(policy=ConfidenceGate(prune_ratio=0.5, anneal=0.0)))
        t.train()
        losses.append(t.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
