"""Data parallelism on the CPU: 2 and 3 gloo processes launched by torchrun (tests/distributed_worker.py),
DDP and FSDP2, against one process on the concatenated batch. Plus the single-process parts of
``cggr.distributed`` (row assignment, bad settings)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cggr import CGGRLoss, CGGRModel, DataParallel, RandomRows
from cggr.distributed import assign_rows, config_fingerprint

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TWO_RANKS = ["ddp_per_rank", "ddp_no_targets", "fsdp_per_rank", "fsdp_no_targets", "ddp_global_hardest",
             "ddp_global_random", "fsdp_global_hardest", "mismatched_ratio", "mismatched_seed",
             "rows_differ_per_rank", "rows_differ_global", "loss_module", "ddp_fused", "fsdp_fused",
             "ddp_accumulation", "ddp_accumulation_global", "fsdp_accumulation", "fsdp_inner_root",
             "fsdp_inner_root_fused", "trainer_ddp", "gate_sampler", "trainer_gate", "rows_differ_router_ddp",
             "rows_differ_router_fsdp", "rows_differ_router_global", "rows_differ_caller_count",
             "rows_differ_last_step", "fsdp_both_roots", "bench_average_gradients",
             "trainer_ddp_packed_no_targets"]
THREE_RANKS = ["ddp_per_rank", "ddp_no_targets", "fsdp_per_rank", "ddp_global_hardest", "fsdp_global_hardest",
               "gate_sampler"]
LAUNCH_TIMEOUT_S = 600  # every collective also has the worker's own 60 s timeout


def launch(world, scenarios, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", WORKER,
           str(out), *scenarios]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = []
    for rank in range(world):
        with open(out / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(2, TWO_RANKS, tmp_path_factory.mktemp("dp2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(3, THREE_RANKS, tmp_path_factory.mktemp("dp3"))


def outcome(results, name):
    """The scenario's result on every rank; fails with the first rank's traceback when it raised."""
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        assert r["ok"], f"{name} failed on rank {rank}: {r.get('traceback', r)}"
    return per_rank


PER_RANK = ["ddp_per_rank", "ddp_no_targets", "fsdp_per_rank", "fsdp_no_targets", "ddp_fused", "fsdp_fused",
            "fsdp_inner_root"]
GLOBAL = ["ddp_global_hardest", "ddp_global_random", "fsdp_global_hardest"]


def runs(names):
    """(world, scenario) for every launch that ran the scenario (3 processes: a subset, for CPU time)."""
    return [(2, n) for n in names] + [(3, n) for n in names if n in THREE_RANKS]


@pytest.mark.parametrize("world,scenario", runs(PER_RANK))
def test_per_rank_selection_gradients_equal_one_process(request, world, scenario):
    results = request.getfixturevalue("two" if world == 2 else "three")
    for r in outcome(results, scenario):
        # the worker asserted the gradients within (rtol 1e-4, atol 1e-6); the loss of a rank without
        # targets is 0, not NaN, and that rank did not hang
        assert r["worst_rel_err"] < 1e-4
        if "rows_per_rank" in r:
            assert len(set(r["rows_per_rank"])) == 1 and r["loss_finite"]


@pytest.mark.parametrize("world,scenario", runs(GLOBAL))
def test_global_selection_is_one_process_selection(request, world, scenario):
    results = request.getfixturevalue("two" if world == 2 else "three")
    for r in outcome(results, scenario):
        assert r["union"] == r["expected"]  # the same rows as one process over the whole batch
        assert len(set(r["rows_per_rank"])) == 1  # and the same number on every rank
        assert r["selected_rows_are_the_share"]  # positions in the concatenated batch, as select_rows gave
        assert r["worst_rel_err"] < 1e-4


@pytest.mark.parametrize("scenario,setting", [("mismatched_ratio", "schedule"), ("mismatched_seed", "seed")])
def test_mismatched_configuration_is_reported_at_the_first_step(two, scenario, setting):
    for r in (res[scenario] for res in two):
        assert not r["ok"] and r["type"] == "ValueError", r
        assert "configured differently" in r["error"] and f"{setting}:" in r["error"], r["error"]


@pytest.mark.parametrize("scenario,step", [
    ("rows_differ_per_rank", 2), ("rows_differ_global", 1), ("rows_differ_caller_count", 2),
    ("rows_differ_last_step", "evaluation")])
def test_row_counts_that_differ_are_reported(two, scenario, step):
    for r in outcome(two, scenario):
        assert r["raised_at_step"] == step, r
        assert "different batch rows" in r["error"] and "rank 1: 6" in r["error"], r["error"]


@pytest.mark.parametrize("scenario,step", [("rows_differ_router_ddp", 1), ("rows_differ_router_fsdp", 1),
                                           ("rows_differ_router_global", 0)])
def test_a_rank_that_keeps_every_row_still_runs_the_collectives(two, scenario, step):
    """Rank 1 keeps all of its 2 rows, rank 0 selects 4 of 5: no hang (the worker's collectives time out
    after 60 s, which would fail the scenario), and the different rows are reported."""
    for r in outcome(two, scenario):
        assert r["raised_at_step"] == step, r
        assert "different batch rows" in r["error"] and "rank 0: 5, rank 1: 2" in r["error"], r["error"]


@pytest.mark.parametrize("scenario", ["ddp_accumulation", "ddp_accumulation_global", "fsdp_accumulation"])
def test_gradient_accumulation_with_the_window_count(two, scenario):
    """no_sync on the first micro-batch, num_items_in_batch = the window's trained targets over every rank."""
    for r in outcome(two, scenario):
        assert r["worst_rel_err"] < 1e-4 and r["num_items"] > 0


def test_trainer_under_torchrun_ddp(two):
    """CGGRTrainer with accelerate's multi-process CPU backend: DDP, gradient accumulation 2, the first
    optimizer step's gradients against one process on every rank's cut micro-batches."""
    for r in outcome(two, "trainer_ddp"):
        assert r["ddp"] and r["worst_rel_err"] < 1e-4
        assert r["rows_per_rank"] == [[2, 2], [2, 2]]


def test_trainer_ddp_with_a_packed_micro_batch_without_targets_on_one_rank(two):
    """Rank 1's first packed micro-batch has no target: both ranks still run every forward and backward (no
    hang in DDP's all-reduce), and the step's gradient is the other micro-batches' alone."""
    for r in outcome(two, "trainer_ddp_packed_no_targets"):
        assert r["ddp"] and r["worst_rel_err"] < 1e-4 and r["total"] > 0
        assert r["rows_per_rank"] == [[1, 1], [1, 1]]


def test_fused_loss_needs_the_wrapper_as_fsdp_root(two):
    for r in (res["fsdp_inner_root_fused"] for res in two):
        assert not r["ok"] and r["type"] == "ValueError", r
        assert "apply fully_shard to the CGGRModel" in r["error"]


def test_bench_gradient_mean_keeps_absent_gradients_absent(two):
    for r in outcome(two, "bench_average_gradients"):
        assert r["some"] == [3.0, 3.0, 3.0] and r["every"] == [0.5, 0.5, 0.5] and r["none_is_none"], r


def test_fsdp_on_both_the_wrapper_and_the_model_is_refused(two):
    for r in (res["fsdp_both_roots"] for res in two):
        assert not r["ok"] and r["type"] == "ValueError", r
        assert "applied to both the CGGRModel and the model it wraps" in r["error"]


@pytest.mark.parametrize("world", [2, 3])
def test_confidence_gated_sampler_tables_agree_across_ranks(request, world):
    for r in outcome(request.getfixturevalue("two" if world == 2 else "three"), "gate_sampler"):
        assert r["tables_equal"] and r["table_is_single"] and r["union_is_single"]
        assert len(set(r["rows_per_rank"])) == 1


def test_trainer_with_a_confidence_gate_under_ddp(two):
    for r in outcome(two, "trainer_gate"):
        assert r["tables_equal"] and r["scored_all"]
        assert r["steps"] == 16 and r["passes"] >= 4  # 4 epochs of 16 rows, 2 ranks x 2 rows per step


def test_loss_module_group_mean(two):
    for r in outcome(two, "loss_module"):
        assert r["worst_rel_err"] < 1e-4


# -- single process -------------------------------------------------------------------------------------------
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_data_parallel_without_a_process_group_is_an_error():
    with pytest.raises(ValueError, match=r"data_parallel=DataParallel\(.*needs an initialised torch.distributed"):
        CGGRModel(tiny(), RandomRows(), data_parallel=DataParallel())
    with pytest.raises(ValueError, match="CGGRLoss: data_parallel=.*needs an initialised"):
        CGGRLoss(data_parallel=DataParallel())
    with pytest.raises(TypeError, match="data_parallel must be 'auto', None or a cggr.DataParallel, got str"):
        CGGRModel(tiny(), RandomRows(), data_parallel="ddp")
    with pytest.raises(ValueError, match=r"DataParallel.selection must be one of \('per_rank', 'global'\), got 'all'"):
        DataParallel(selection="all")


def test_auto_without_a_process_group_runs_alone():
    model = CGGRModel(tiny(), RandomRows(), min_tokens_ratio=0.5, warmup_steps=0)
    ids = torch.randint(0, 32, (4, 6))
    assert torch.isfinite(model(ids, labels=ids))
    assert model.selected_rows.numel() == 2


@pytest.mark.parametrize("world,rows", [(2, 4), (3, 5), (4, 1)])
def test_assign_rows_gives_every_rank_k_of_the_chosen_rows_keeping_its_own(world, rows):
    gen = torch.Generator().manual_seed(world * 100 + rows)
    for _ in range(50):
        k = int(torch.randint(1, rows + 1, (1,), generator=gen))
        chosen = sorted(torch.randperm(world * rows, generator=gen)[: world * k].tolist())
        shares = [assign_rows(chosen, world, rows, r) for r in range(world)]
        assert all(len(s) == k for s in shares)
        assert sorted(p for s in shares for p in s) == chosen
        for r, share in enumerate(shares):
            own = [p for p in chosen if p // rows == r]
            kept = [p for p in share if p // rows == r]
            assert len(kept) == min(k, len(own))  # a rank moves none of its own rows while it has room


def test_config_fingerprint_ignores_memory_addresses_only():
    """Every process has its own addresses: the same kind of object compares equal, other values do not."""
    class Backend:
        pass

    a = config_fingerprint({"step_options": {"backend": Backend()}, "seed": 1})
    b = config_fingerprint({"step_options": {"backend": Backend()}, "seed": 1})
    assert a == b and " at 0x" not in a["step_options"]
    assert config_fingerprint({"seed": 2})["seed"] != a["seed"]
