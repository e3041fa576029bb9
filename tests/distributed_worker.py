"""One rank of the data-parallel tests (tests/test_distributed.py), launched as users launch training:

    python -m torch.distributed.run --nproc-per-node W tests/distributed_worker.py OUT SCENARIO [SCENARIO ...]

Each scenario runs on every rank, in order, on the gloo backend (CPU); its outcome is written to
OUT/rank{r}.json: {"ok": true, ...numbers} or {"ok": false, "error": "..."}. A scenario expected to fail
(a mismatched configuration) records the error text; tests/test_distributed.py asserts on it. Every
collective runs under the group's timeout (TIMEOUT_S), so a hang becomes an error, not a stuck test.
"""
import copy
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import cggr
from cggr import CGGRLoss, CGGRModel, DataParallel, HardestRows, RandomRows, RouterSettings

TIMEOUT_S = 60
# CGGR_TEST_BACKEND=nccl (tests/gpu): the same scenarios on CUDA, one GPU per rank
BACKEND = os.environ.get("CGGR_TEST_BACKEND", "gloo")
DEVICE = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if BACKEND == "nccl" else "cpu")
VOCAB, T, B = 96, 12, 4
# float32 on the CPU: DDP's all-reduced mean against one process's sum differs by rounding only
RTOL, ATOL = 1e-4, 1e-6


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float().to(DEVICE)


def batch_of(rank, rows=B, length=T, no_targets=False):
    """Rank ``rank``'s batch: the same on every process, so that each can build the concatenated batch."""
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt that is not trained
    if no_targets:
        labels[:] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def whole_batch(world, **kw):
    parts = [batch_of(r, **kw) for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cggr_model(model, policy, data_parallel, ratio=0.5, seed=0, **kw):
    return CGGRModel(model, policy=policy, min_tokens_ratio=ratio, warmup_steps=0, seed=seed,
                     data_parallel=data_parallel, **kw)


def auto():
    """data_parallel='auto' (DataParallel() with 2+ processes); with one process (the GPU's NCCL smoke test)
    an explicit DataParallel(), so that the collectives still run."""
    return "auto" if dist.get_world_size() > 1 else DataParallel()


def gather_rows(t):
    """Every rank's [k, ...] tensor, concatenated rank-major (k equal on every rank)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def grads_of(module):
    out = {}
    for name, p in module.named_parameters():
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor (full_tensor() is a collective)
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def compare_grads(got, expected):
    """Worst relative error; raises when any parameter is outside (RTOL, ATOL)."""
    worst = 0.0
    assert got.keys() == expected.keys(), (sorted(got)[:3], sorted(expected)[:3])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        scale = expected[name].abs().max().clamp_min(1e-12)
        worst = max(worst, float((got[name] - expected[name]).abs().max() / scale))
    return worst


def reference_grads(trained_ids, trained_labels):
    """One process, no selection: the model's own mean loss over the given rows."""
    model = tiny_llama()
    model(input_ids=trained_ids, labels=trained_labels).loss.backward()
    return {f"model.{n}": g for n, g in grads_of(model).items()}


def wrap(kind, module):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(module)
    from torch.distributed.fsdp import fully_shard

    for block in module.model.model.layers:
        fully_shard(block)
    fully_shard(module)
    return module


def unwrap(kind, module):
    return module.module if kind == "ddp" else module


def named(kind, module):
    """Parameter names as in CGGRModel (DDP prefixes 'module.')."""
    return {name.removeprefix("module."): g for name, g in grads_of(module).items()}


# -- scenarios -------------------------------------------------------------------------------------------
def per_rank(kind, no_targets_on_rank=None):
    """Per-rank selection: gradients equal one process's on the concatenation of every rank's trained rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inner = cggr_model(tiny_llama(), HardestRows(router=RouterSettings(layers=1)), auto())
    model = wrap(kind, inner)
    ids, labels = batch_of(rank, no_targets=rank == no_targets_on_rank)
    loss = model(ids, labels=labels)
    loss.backward()
    rows = unwrap(kind, model).selected_rows
    k = int(rows.numel())
    ks = [0] * world
    dist.all_gather_object(ks, k)
    trained_ids, trained_labels = gather_rows(ids[rows]), gather_rows(labels[rows])
    worst = compare_grads(named(kind, model), reference_grads(trained_ids, trained_labels))
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    return {"rows_per_rank": ks, "loss_finite": all(map(lambda v: v == v, losses)), "worst_rel_err": worst}


def global_selection(kind, policy_name):
    """Global selection: the union of the trained rows is what one process selects over the whole batch, and
    the gradients are that process's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    policy = RandomRows() if policy_name == "random" else HardestRows(router=RouterSettings(layers=1))
    inner = cggr_model(tiny_llama(), policy, DataParallel(selection="global"), seed=3)
    model = wrap(kind, inner)
    ids, labels = batch_of(rank)
    # select_rows outside the forward (as cggr.hf does): under FSDP2 it gathers the root's parameters itself
    selection = unwrap(kind, model).select_rows(ids, labels)
    model(ids, labels=labels, rows=selection).backward()

    all_ids, all_labels = whole_batch(world)
    single = cggr_model(tiny_llama(), policy, None, seed=3)
    single_selection = single.select_rows(all_ids, all_labels)
    shares = [None] * world
    dist.all_gather_object(shares, selection.indices.tolist())
    union = sorted(p for share in shares for p in share)
    single(all_ids, labels=all_labels, rows=single_selection).backward()
    worst = compare_grads(named(kind, model), grads_of(single))
    return {"union": union, "expected": sorted(single_selection.indices.tolist()), "rows_per_rank": [len(s) for s in shares],
            "worst_rel_err": worst,
            "selected_rows_are_the_share": unwrap(kind, model).selected_rows.tolist() == selection.indices.tolist()}


def mismatched(field):
    rank = dist.get_rank()
    kwargs = {"ratio": 0.5, "seed": 0}
    if rank == 1:
        kwargs = {"ratio": 0.25, "seed": 0} if field == "ratio" else {"ratio": 0.5, "seed": 7}
    model = cggr_model(tiny_llama(), RandomRows(), auto(), **kwargs)
    ids, labels = batch_of(rank)
    model(ids, labels=labels).backward()
    return {}


def rows_differ_later(selection):
    """Equal rows at step 1, rank 1 gets more at step 2: reported at step 2 (global) or 3 (per-rank)."""
    rank = dist.get_rank()
    model = cggr_model(tiny_llama(), RandomRows(), DataParallel(selection=selection))
    for step in range(3):
        ids, labels = batch_of(rank, rows=B + 2 if (rank == 1 and step >= 1) else B)
        try:
            model(ids, labels=labels).backward()
        except ValueError as error:
            return {"raised_at_step": step, "error": str(error)}
        model.step()
    return {"raised_at_step": None}


def rows_differ_router(kind, selection):
    """Rank 1's batch is so small that it keeps every row at ratio 0.8 (ceil(0.8 * 2) = 2) while rank 0
    selects 4 of 5: rank 1 still runs the router's pass (FSDP2 all-gathers inside it) and every exchange,
    so nothing hangs; the different rows are reported (global: at once; per-rank: at the next step)."""
    rank = dist.get_rank()
    inner = cggr_model(tiny_llama(), HardestRows(router=RouterSettings(layers=1)), DataParallel(selection=selection),
                       ratio=0.8)
    model = wrap(kind, inner)
    for step in range(2):
        ids, labels = batch_of(rank, rows=2 if rank == 1 else 5)
        try:
            model(ids, labels=labels).backward()
        except ValueError as error:
            return {"raised_at_step": step, "error": str(error)}
        inner.step()
    return {"raised_at_step": None}


def rows_differ_caller_count():
    """Per-rank selection with the caller's num_items_in_batch (the accumulation recipe): the ranks' rows
    are still compared (rank 1 gets more at step 1: reported at step 2)."""
    rank = dist.get_rank()
    model = cggr_model(tiny_llama(), RandomRows(), DataParallel())
    for step in range(3):
        ids, labels = batch_of(rank, rows=B + 2 if (rank == 1 and step >= 1) else B)
        try:
            rows = model.select_rows(ids, labels)
            n = cggr.distributed.sum_over_ranks(model.trained_targets(labels, rows), DataParallel())
            model(ids, labels=labels, rows=rows, num_items_in_batch=n).backward()
        except ValueError as error:
            return {"raised_at_step": step, "error": str(error)}
        model.step()
    return {"raised_at_step": None}


def rows_differ_last_step():
    """The last training step's different rows are reported by the evaluation that follows it."""
    rank = dist.get_rank()
    model = cggr_model(tiny_llama(), RandomRows(), DataParallel())
    ids, labels = batch_of(rank, rows=B + 2 if rank == 1 else B)
    model(ids, labels=labels).backward()
    model.eval()
    try:
        with torch.no_grad():
            model(*batch_of(rank)[:1], labels=batch_of(rank)[1])
    except ValueError as error:
        return {"raised_at_step": "evaluation", "error": str(error)}
    return {"raised_at_step": None}


def loss_module(kind_unused=None):
    """CGGRLoss(data_parallel=...) under DDP: gradients equal one process's mean over every rank's selected
    tokens (selection per rank, the masks gathered)."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB).to(DEVICE)
    ref_head = copy.deepcopy(head)
    model = torch.nn.parallel.DistributedDataParallel(head)
    gen = torch.Generator().manual_seed(50 + rank)
    hidden = torch.randn(2, 9, 16, generator=gen).to(DEVICE)
    targets = torch.randint(0, VOCAB, (2, 9), generator=gen).to(DEVICE)
    targets[0, :3] = -100
    criterion = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, data_parallel=DataParallel())
    loss = criterion(model(hidden), targets)
    loss.backward()
    mask = criterion._last["mask"] & (targets != -100)
    all_hidden, all_targets, all_mask = gather_rows(hidden), gather_rows(targets), gather_rows(mask)
    nll = torch.nn.functional.cross_entropy(ref_head(all_hidden).reshape(-1, VOCAB), all_targets.reshape(-1).clamp_min(0),
                                            reduction="none")
    (nll[all_mask.reshape(-1)].sum() / all_mask.sum()).backward()
    expected = {"weight": ref_head.weight.grad, "bias": ref_head.bias.grad}
    got = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
    return {"worst_rel_err": compare_grads(got, expected)}


def fused_dp(kind):
    """loss_impl='fused' with per-rank selection (FSDP2: the LM head gathered by the root's forward)."""
    rank = dist.get_rank()
    inner = cggr_model(tiny_llama(), HardestRows(router=RouterSettings(layers=1)), auto(),
                       step_options=cggr.StepOptions(loss_impl="fused"))
    model = wrap(kind, inner)
    ids, labels = batch_of(rank)
    model(ids, labels=labels).backward()
    rows = unwrap(kind, model).selected_rows
    worst = compare_grads(named(kind, model), reference_grads(gather_rows(ids[rows]), gather_rows(labels[rows])))
    return {"worst_rel_err": worst}


def accumulation(kind, selection):
    """Two micro-batches per optimizer step (DDP: no_sync on the first): rows chosen first, the window's
    trained targets summed over micro-batches and ranks as num_items_in_batch; the accumulated gradients
    equal one process's mean over every trained target of the window."""
    import contextlib

    rank, world = dist.get_rank(), dist.get_world_size()
    inner = cggr_model(tiny_llama(), HardestRows(router=RouterSettings(layers=1)), DataParallel(selection=selection))
    model = wrap(kind, inner)
    cggr_inner = unwrap(kind, model)
    micro = [batch_of(rank + world * i, rows=B) for i in range(2)]  # different data per micro-batch and rank
    selections = [cggr_inner.select_rows(ids, labels) for ids, labels in micro]
    n = sum(cggr_inner.trained_targets(labels, sel) for (_, labels), sel in zip(micro, selections))
    n = cggr.distributed.sum_over_ranks(n, cggr_inner._dp_state[0])
    for i, ((ids, labels), sel) in enumerate(zip(micro, selections)):
        sync = model.no_sync() if kind == "ddp" and i == 0 else contextlib.nullcontext()
        with sync:
            model(ids, labels=labels, rows=sel, num_items_in_batch=n).backward()
    # one process: every rank's trained rows of both micro-batches, one mean
    trained = []
    for (ids, labels), sel in zip(micro, selections):
        if selection == "global":
            every_ids, every_labels = gather_rows(ids), gather_rows(labels)
            shares = [None] * world
            dist.all_gather_object(shares, sel.indices.tolist())
            rows = torch.tensor(sorted(p for share in shares for p in share), device=DEVICE)
            trained.append((every_ids[rows], every_labels[rows]))
        else:
            trained.append((gather_rows(ids[sel.indices]), gather_rows(labels[sel.indices])))
    all_ids = torch.cat([t[0] for t in trained])
    all_labels = torch.cat([t[1] for t in trained])
    worst = compare_grads(named(kind, model), reference_grads(all_ids, all_labels))
    return {"worst_rel_err": worst, "num_items": int(n)}


def fsdp_inner_root(fused=False):
    """What accelerate's FSDP2 does under cggr.hf: the Hugging Face model itself is the FSDP root (its blocks
    sharded too) and the rows are chosen before its first forward: the router gathers the root's
    parameters itself. Gradients equal one process's on every rank's trained rows. With the fused loss
    (which runs the LM head outside the model's forward) this layout is refused with a clear error."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    hf_model = tiny_llama()
    for block in hf_model.model.layers:
        fully_shard(block)
    fully_shard(hf_model)
    options = cggr.StepOptions(loss_impl="fused") if fused else None
    model = cggr_model(hf_model, HardestRows(router=RouterSettings(layers=1)), auto(), step_options=options)
    ids, labels = batch_of(rank)
    selection = model.select_rows(ids, labels)
    model(ids, labels=labels, rows=selection).backward()
    rows = selection.indices
    worst = compare_grads(named("fsdp", model), reference_grads(gather_rows(ids[rows]), gather_rows(labels[rows])))
    return {"worst_rel_err": worst}


def fsdp_both_roots():
    """fully_shard on the Hugging Face model and on the CGGRModel around it: refused at the first step."""
    from torch.distributed.fsdp import fully_shard

    hf_model = tiny_llama()
    for block in hf_model.model.layers:
        fully_shard(block)
    fully_shard(hf_model)
    model = cggr_model(hf_model, HardestRows(router=RouterSettings(layers=1)), auto())
    fully_shard(model)
    ids, labels = batch_of(dist.get_rank())
    model(ids, labels=labels).backward()
    return {}


def bench_average_gradients():
    """cggr bench's gradient mean: a gradient present on some ranks is averaged (zeros elsewhere), one
    present on no rank stays None, so that the optimizer skips it as one process would."""
    from cggr.bench.parallel import ProcessGroupInfo, average_gradients

    rank, world = dist.get_rank(), dist.get_world_size()
    some, none, every = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    if rank == 0:
        some.grad = torch.full((3,), 6.0)
    every.grad = torch.full((3,), float(rank))
    average_gradients([some, none, every], ProcessGroupInfo(rank, world, rank))
    return {"some": some.grad.tolist(), "none_is_none": none.grad is None, "every": every.grad.tolist()}


def trainer_ddp(packed_no_targets_on_rank=None):
    """cggr.hf.CGGRTrainer under torchrun (accelerate's multi-process CPU backend, gloo): the gradient of the
    first optimizer step (2 micro-batches per rank) equals one process's mean over every trained target of
    every rank's cut micro-batches; every rank trains the same number of rows. ``packed_no_targets_on_rank``:
    packed batches (DataCollatorWithFlattening), that rank's first micro-batch without any target (its
    forward and backward must still run, or the other rank's gradient all-reduce waits)."""
    import tempfile

    import transformers as tf

    from cggr.hf import CGGRConfig, CGGRTrainer

    world = dist.get_world_size()
    recorded, grads = [], {}

    class Recording(CGGRTrainer):
        def _cggr_select(self, batch):
            out = super()._cggr_select(batch)
            recorded.append((out["input_ids"].clone(), out["labels"].clone(), out.get("position_ids")))
            return out

    class GradsAtFirstStep(tf.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not grads:
                grads.update(named("ddp", trainer.model_wrapped))

    gen = torch.Generator().manual_seed(7)
    data = [{"input_ids": torch.randint(1, VOCAB, (int(n),), generator=gen).tolist()}
            for n in torch.randint(6, T + 1, (8 * world,), generator=gen)]

    def collate_padded(features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "labels": torch.where(mask.bool(), ids, -100), "attention_mask": mask}

    collated = []

    def collate_packed(features):
        batch = tf.DataCollatorWithFlattening()(features)
        if dist.get_rank() == packed_no_targets_on_rank and not collated:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        collated.append(batch)
        return batch

    collate = collate_padded if packed_no_targets_on_rank is None else collate_packed
    out_dir = tempfile.mkdtemp()
    args = tf.TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                max_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                optim="sgd", learning_rate=1.0, max_grad_norm=0.0, seed=0, logging_steps=1,
                                average_tokens_across_devices=True, ddp_backend="gloo")
    trainer = Recording(model=tiny_llama(), args=args, train_dataset=data, data_collator=collate,
                        callbacks=[GradsAtFirstStep()],
                        cggr_config=CGGRConfig(policy=HardestRows(router=RouterSettings(layers=1)),
                                               min_tokens_ratio=0.5, warmup_steps=0))
    trainer.train()
    rows = [int(ids.shape[0]) for ids, _, _ in recorded]
    every = [None] * world
    dist.all_gather_object(every, [(ids.tolist(), labels.tolist(), None if pos is None else pos.tolist())
                                   for ids, labels, pos in recorded])
    model = tiny_llama()
    total = sum(int((torch.tensor(l)[:, 1:] != -100).sum()) for part in every for _, l, _ in part)
    for part in every:
        for ids, labels, pos in part:
            ids, labels = torch.tensor(ids), torch.tensor(labels)
            # a packed row: one forward per sequence (its position_ids restart), as the Trainer's keeps them apart
            bounds = [0, ids.shape[1]] if pos is None else \
                [0, *(torch.nonzero(torch.diff(torch.tensor(pos[0])) <= 0).flatten() + 1).tolist(), ids.shape[1]]
            for first, end in zip(bounds[:-1], bounds[1:]):
                model(input_ids=ids[:, first:end], labels=labels[:, first:end],
                      num_items_in_batch=total).loss.backward()
    expected = grads_of(model)
    worst = compare_grads(grads, expected)
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows)
    return {"worst_rel_err": worst, "rows_per_rank": all_rows, "total": total, "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)}


def gate_sampler():
    """ConfidenceGatedSampler on every rank: each trains its share of a pass and reports its rows' losses;
    after update (all-gathered) every rank holds the table one process would, and draws the same plan."""
    world = dist.get_world_size()
    n = 23
    losses = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    sampler = cggr.ConfidenceGatedSampler(n, num_epochs=4, seed=2)
    sampler.set_epoch(0)
    mine = torch.tensor(list(sampler))
    for chunk in mine.split(3):  # batches of 3 (the last one shorter: equal on every rank)
        sampler.update(chunk.to(DEVICE), losses[chunk].to(DEVICE))
    sampler.set_epoch(1)
    single = cggr.ConfidenceGatedSampler(n, num_epochs=4, seed=2, num_replicas=1, rank=0)
    single.update(torch.arange(n), losses)
    single.set_epoch(1)
    tables = [None] * world
    dist.all_gather_object(tables, sampler.scores.tolist())
    parts = [None] * world
    dist.all_gather_object(parts, list(sampler))
    return {"tables_equal": all(t == tables[0] for t in tables),
            "table_is_single": torch.equal(sampler.scores, single.scores),
            "union_is_single": sorted(set(i for p in parts for i in p)) == sorted(single),
            "rows_per_rank": [len(p) for p in parts]}


def trainer_gate():
    """CGGRTrainer with a ConfidenceGate under torchrun DDP: accelerate shards the stream's batches, every
    rank all-gathers the rows' losses: the same score table and the same passes on every rank."""
    import tempfile

    import transformers as tf

    from cggr.hf import CGGRConfig, CGGRTrainer

    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    data = [{"input_ids": torch.randint(1, VOCAB, (T,), generator=gen).tolist()} for _ in range(8 * world)]

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "labels": ids.clone()}

    args = tf.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, num_train_epochs=4,
                                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, optim="sgd",
                                learning_rate=0.5, seed=0, logging_steps=1, ddp_backend="gloo")
    trainer = CGGRTrainer(model=tiny_llama(), args=args, train_dataset=data, data_collator=collate,
                          cggr_config=CGGRConfig(policy=cggr.ConfidenceGate(prune_ratio=0.5, anneal=0.25)))
    trainer.train()
    sampler = trainer.cggr_gate.sampler
    tables = [None] * world
    dist.all_gather_object(tables, (sampler.scores.tolist(), sampler.pass_index))
    return {"tables_equal": all(t == tables[0] for t in tables), "scored_all": not torch.isnan(sampler.scores).any().item(),
            "passes": sampler.pass_index + 1, "steps": trainer.state.global_step}


SCENARIOS = {
    "trainer_gate": trainer_gate,
    "gate_sampler": gate_sampler,
    "trainer_ddp": trainer_ddp,
    "trainer_ddp_packed_no_targets": lambda: trainer_ddp(packed_no_targets_on_rank=1),
    "fsdp_inner_root": fsdp_inner_root,
    "fsdp_inner_root_fused": lambda: fsdp_inner_root(fused=True),
    "fsdp_both_roots": fsdp_both_roots,
    "bench_average_gradients": bench_average_gradients,
    "ddp_accumulation": lambda: accumulation("ddp", "per_rank"),
    "ddp_accumulation_global": lambda: accumulation("ddp", "global"),
    "fsdp_accumulation": lambda: accumulation("fsdp", "per_rank"),
    "ddp_per_rank": lambda: per_rank("ddp"),
    "ddp_no_targets": lambda: per_rank("ddp", no_targets_on_rank=1),
    "fsdp_per_rank": lambda: per_rank("fsdp"),
    "fsdp_no_targets": lambda: per_rank("fsdp", no_targets_on_rank=1),
    "ddp_global_hardest": lambda: global_selection("ddp", "hardest"),
    "ddp_global_random": lambda: global_selection("ddp", "random"),
    "fsdp_global_hardest": lambda: global_selection("fsdp", "hardest"),
    "mismatched_ratio": lambda: mismatched("ratio"),
    "mismatched_seed": lambda: mismatched("seed"),
    "rows_differ_per_rank": lambda: rows_differ_later("per_rank"),
    "rows_differ_global": lambda: rows_differ_later("global"),
    "loss_module": loss_module,
    "rows_differ_router_ddp": lambda: rows_differ_router("ddp", "per_rank"),
    "rows_differ_router_fsdp": lambda: rows_differ_router("fsdp", "per_rank"),
    "rows_differ_router_global": lambda: rows_differ_router("ddp", "global"),
    "rows_differ_caller_count": rows_differ_caller_count,
    "rows_differ_last_step": rows_differ_last_step,
    "ddp_fused": lambda: fused_dp("ddp"),
    "fsdp_fused": lambda: fused_dp("fsdp"),
}


def main():
    out, names = sys.argv[1], sys.argv[2:]
    if BACKEND == "nccl":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(BACKEND, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    for name in names:
        try:
            results[name] = {"ok": True, **SCENARIOS[name]()}
        except Exception as error:  # recorded for the test to assert on (expected errors included)
            results[name] = {"ok": False, "type": type(error).__name__, "error": str(error),
                             "traceback": traceback.format_exc()}
        dist.barrier()
    path = os.path.join(out, f"rank{dist.get_rank()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
