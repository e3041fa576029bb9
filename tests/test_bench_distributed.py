"""``torchrun --nproc-per-node 2 -m cggr bench``: the same protocol on two processes (gloo, CPU).

With global selection the two-process run is one process's run (same rows, gradients averaged): the
validation curves agree within float32 rounding; standard training and the confidence gate (which prunes
the data order, the same on every rank, and trains every row of a batch) agree for either selection;
per-rank selection trains its own rows and is only checked to complete with the run files of a 2-process
run."""
import json
import os
import subprocess
import sys

import pytest

ARGS = ["bench", "--regime", "pretrain", "--configs", "standard", "random", "cggr_hardest", "confidence_gate",
        "--ratios", "0.5",
        "--seq-len", "16", "--batch-size", "4", "--token-budget", "256", "--eval-every", "64", "--eval-rows", "2",
        "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def bench(out, cache, processes=1, extra=(), args=ARGS):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                "-m", "cggr"] if processes > 1 else [sys.executable, "-m", "cggr"]
    cmd = launcher + list(args) + ["--out", str(out), "--cache-dir", str(cache), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def curves(out):
    runs = {}
    for name in sorted(os.listdir(out / "runs")):
        with open(out / "runs" / name) as f:
            record = json.load(f)
        runs[record["config"]] = record
    return runs


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench1")
    proc = bench(root / "out", root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return curves(root / "out")


@pytest.mark.parametrize("selection", ["global", "per_rank"])
def test_two_processes_train_the_single_process_protocol(tmp_path, single, selection):
    proc = bench(tmp_path / "out", tmp_path / "cache", processes=2, extra=["--data-parallel", selection])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = curves(tmp_path / "out")
    assert sorted(two) == sorted(single) == ["cggr_hardest", "confidence_gate", "random", "standard"]
    for config, record in two.items():
        assert record["settings"]["world_size"] == 2 and record["settings"]["data_parallel"] == selection
        assert record["steps"] == single[config]["steps"] and record["tokens"] == single[config]["tokens"]
        same = selection == "global" or config in ("standard", "confidence_gate")  # the gate: no row selection
        if same:  # the rows and the averaged gradients of one process: float32 rounding apart
            got = [p["val_mean"] for p in record["curve"]]
            expected = [p["val_mean"] for p in single[config]["curve"]]
            assert got == pytest.approx(expected, abs=1e-4), config
            # the sources of every rank's trained rows, counted together
            assert record["trained_rows_source_share"] == pytest.approx(single[config]["trained_rows_source_share"])
            # the reported training loss is the global batch's mean, not rank 0's share of it
            got = [p["train_loss"] for p in record["curve"][1:]]
            expected = [p["train_loss"] for p in single[config]["curve"][1:]]
            assert got == pytest.approx(expected, rel=1e-4), config
    assert (tmp_path / "out" / "summary.md").exists()  # rank 0 wrote the reports


def test_a_batch_that_does_not_split_across_processes_is_refused(tmp_path):
    proc = bench(tmp_path / "out", tmp_path / "cache", processes=3)
    assert proc.returncode != 0
    assert "--batch-size 4: torchrun started 3 processes" in proc.stderr and "use a multiple of 3" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists() or not os.listdir(tmp_path / "out" / "runs")


def test_a_time_budget_keeps_the_ranks_in_step(tmp_path):
    """Each rank's clock differs a little: rank 0's decides, on every rank, when to evaluate and stop and
    the learning rate (a rank that stopped alone would leave the other waiting in its next all-reduce)."""
    timed = [a for a in ARGS]
    timed[timed.index("--token-budget"):timed.index("--token-budget") + 4] = ["--time-budget", "1.5",
                                                                              "--eval-every", "0.3"]
    timed[timed.index("--configs") + 1:timed.index("--ratios")] = ["standard", "cggr_hardest"]
    proc = bench(tmp_path / "out", tmp_path / "cache", processes=2, args=timed)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for config, record in curves(tmp_path / "out").items():
        assert record["steps"] > 0 and len(record["curve"]) >= 2, config
