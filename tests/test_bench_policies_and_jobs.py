"""cggr bench pieces added for the policy study: the reference-ranked policies, configurations built from the
library's policies (only the oracle chooses rows on the host), renamed configurations, cache locks shared by concurrent
jobs, the data-mix and other-sources report columns, and the multi-GPU job runner (on the CPU)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cggr.bench import report
from cggr.bench.configs import (CONFIGS, RENAMED, Batch, CGGRLossStep, CGGRModelStep, ConfidenceGateStep, FullBatch,
                                RowSubset, StepContext, get_config)
from cggr.bench.runner import cache_lock
from cggr.experimental import ReferenceHalfLowest, ReferenceLowest
from cggr.policies import RowPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_runner():
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", os.path.join(ROOT, "scripts", "bench_multi_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row_nll(values):
    return torch.tensor(values, dtype=torch.float32)


def _lowest(row_nll, k):
    """The k lowest values' positions (distinct values: a unique answer), NaN last."""
    return sorted(np.argsort(np.nan_to_num(row_nll.numpy(), nan=np.inf), kind="stable")[:k].tolist())


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_reference_half_lowest_takes_the_lowest_reference_rows_then_random(k):
    """reference_half_lowest (formerly reference_stratified): half the rows (rounded up) with the lowest mean
    reference NLL, the rest uniformly from the others."""
    rng_data = np.random.default_rng(k)
    row_nll = _row_nll(rng_data.permutation(100)[:8].astype(np.float32))  # distinct values: a unique order
    policy = ReferenceHalfLowest()
    assert policy.uses_reference_rows and not policy.uses_router and policy.needs_reference_nll
    picked = policy.select(row_nll, k, torch.Generator().manual_seed(0))
    assert picked.row_weight is None and picked.indices.dtype == torch.int64
    rows = picked.indices.tolist()
    assert rows == sorted(rows) and len(set(rows)) == k and min(rows) >= 0 and max(rows) < 8
    k_low = (k + 1) // 2
    assert set(_lowest(row_nll, k_low)) <= set(rows)
    # the filler is random: over many draws every other row of the batch gets picked sometimes
    if k > k_low:
        seen = set()
        generator = torch.Generator().manual_seed(1)
        for _ in range(200):
            seen |= set(policy.select(row_nll, k, generator).indices.tolist())
        assert seen == set(range(8))


def test_reference_half_lowest_puts_rows_with_nothing_scored_last():
    row_nll = _row_nll([float("nan"), 3.0, float("nan"), 1.0, 2.0, float("nan")])
    generator = torch.Generator().manual_seed(0)
    # k = 5: the 3 hardest slots go to the 3 scored rows, the 2 random ones to NaN rows
    assert {1, 3, 4} <= set(ReferenceHalfLowest().select(row_nll, 5, generator).indices.tolist())


@pytest.mark.parametrize("k", [1, 3, 7])
def test_reference_lowest_takes_exactly_the_lowest_reference_rows(k):
    rng_data = np.random.default_rng(10 + k)
    row_nll = _row_nll(rng_data.permutation(100)[:8].astype(np.float32))
    policy = ReferenceLowest()
    assert policy.uses_reference_rows and not policy.uses_router and policy.needs_reference_nll
    picked = policy.select(row_nll, k, torch.Generator().manual_seed(0))
    assert picked.indices.tolist() == _lowest(row_nll, k) and picked.row_weight is None
    # no randomness: ties give the same rows whatever the generator's state
    ties = torch.zeros(8)
    choices = {tuple(policy.select(ties, k, torch.Generator().manual_seed(s)).indices.tolist()) for s in range(5)}
    assert len(choices) == 1 and len(next(iter(choices))) == k


def test_reference_lowest_puts_rows_with_nothing_scored_last():
    row_nll = _row_nll([float("nan"), 3.0, float("nan"), 1.0, 2.0, float("nan")])
    generator = torch.Generator().manual_seed(0)
    assert ReferenceLowest().select(row_nll, 2, generator).indices.tolist() == [3, 4]
    assert ReferenceLowest().select(row_nll, 3, generator).indices.tolist() == [1, 3, 4]
    four = ReferenceLowest().select(row_nll, 4, generator).indices.tolist()
    assert {1, 3, 4} < set(four) and len(four) == 4


SEQ, ROWS, BATCH = 9, 32, 8


def _context(forward_impl="model"):
    """A target-regime context with a synthetic reference: [ROWS, SEQ - 1] token NLLs, distinct row means."""
    rng = np.random.default_rng(0)
    token_nll = rng.uniform(0.5, 6.0, size=(ROWS, SEQ - 1)).astype(np.float32)
    token_nll += np.arange(ROWS, dtype=np.float32)[rng.permutation(ROWS), None] * 0.01  # no tied row means
    threshold = float(np.quantile(token_nll.mean(1), 0.3))
    return StepContext(seed=0, router_layers=1, target_source_id=0, reference_token_nll=torch.from_numpy(token_nll),
                       reference_thresholds={"heldout": threshold, "heldout99": threshold + 0.1, "otsu": threshold},
                       num_sources=2, num_train_rows=ROWS, forward_impl=forward_impl)


def _bench_batch(index):
    index = np.asarray(index, dtype=np.int64)
    rows = torch.from_numpy(np.random.default_rng(int(index.sum())).integers(0, 256, size=(len(index), SEQ)))
    return Batch(rows, torch.from_numpy(index), (index % 4 == 0).astype(np.int64) ^ 1, index)


@pytest.mark.parametrize("name, half", [("reference_lowest", False), ("reference_half_lowest", True)])
def test_reference_configurations_choose_by_the_reference_of_the_batch_rows(name, half):
    """The bench's reference configurations pass the reference NLL of the batch's own rows (Batch.index) to
    the library policy: the rows chosen are the lowest of those rows' means."""
    from cggr.bench.models import build_preset

    ctx = _context()
    step = get_config(name).build(build_preset("tiny", 256, SEQ, 0, 0), 0.5, ctx)
    k = 4
    for index in (np.arange(BATCH), np.random.default_rng(1).choice(ROWS, BATCH, replace=False)):
        batch = _bench_batch(index)
        assert torch.isfinite(step.loss(batch))
        picked = step.selected_rows().tolist()
        means = ctx.reference_token_nll[torch.from_numpy(index)].double().mean(1).float()
        lowest = _lowest(means, (k + 1) // 2 if half else k)
        assert len(picked) == k and set(lowest) <= set(picked)
        step.after_step()


def test_renamed_configurations_resolve_to_their_new_names():
    """Job files of earlier rounds keep their names (cggr_stratified, ...): each resolves to the renamed one."""
    assert RENAMED == {"cggr_stratified": "cggr_half_hardest", "excess_stratified": "excess_half_hardest",
                       "reference_stratified": "reference_half_lowest", "cggr_random": "random"}
    for old, new in RENAMED.items():
        assert old not in CONFIGS and new in CONFIGS
        assert get_config(old) is get_config(new) is CONFIGS[new]
    with pytest.raises(ValueError, match="unknown configuration 'cggr_importanc'"):
        get_config("cggr_importanc")
    with pytest.raises(ValueError, match="unknown configuration"):
        get_config("cggr_reference_filter")  # the cggr_<policy> lookups are gone


# Configurations that are not a row policy: the whole batch, the token-level CGGRLoss, and the oracle, the only
# one that chooses rows on the host (it reads the domain labels, which the library never sees).
NOT_ROW_POLICIES = {"standard": FullBatch, "cggr_loss": CGGRLossStep, "excess_tokens": CGGRLossStep,
                    "oracle": RowSubset, "confidence_gate": ConfidenceGateStep}  # the gate: the library's sampler


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_configuration_but_the_oracle_chooses_rows_on_the_host(name):
    """Every row configuration is CGGRModel with a library policy (cggr.policies / cggr.experimental)."""
    from cggr.bench.models import build_preset
    from cggr.model import CGGRModel

    step = get_config(name).build(build_preset("tiny", 256, SEQ, 0, 0), 0.5, _context())
    if name in NOT_ROW_POLICIES:
        assert type(step) is NOT_ROW_POLICIES[name]
        return
    assert isinstance(step, CGGRModelStep) and not isinstance(step, RowSubset)
    assert isinstance(step.module, CGGRModel) and isinstance(step.module.policy, RowPolicy)
    assert type(step.module.policy).__module__ in ("cggr.policies", "cggr.experimental.policies")


def test_cache_lock_serialises_two_holders(tmp_path):
    path = str(tmp_path / "reference" / "x.npy")
    events = []

    def hold(name, delay):
        with cache_lock(path):
            events.append((name, "in"))
            time.sleep(delay)
            events.append((name, "out"))

    first = threading.Thread(target=hold, args=("a", 0.3))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=hold, args=("b", 0.0))
    second.start()
    first.join()
    second.join()
    assert events == [("a", "in"), ("a", "out"), ("b", "in"), ("b", "out")]


def test_mix_and_other_sources_losses():
    val = {"a": 1.0, "b": 3.0, "c": 5.0}
    assert report.mix_loss(val, {"a": 0.5, "b": 0.25, "c": 0.25}) == pytest.approx(2.5)
    assert report.mix_loss(val, None) is None          # runs recorded before the shares were stored
    assert report.others_loss(val, "a") == pytest.approx(4.0)
    assert report.others_loss(val, None) is None       # pretrain: the headline already covers every source
    curve = [{"time": 0.0, "tokens": 0, "val": {"a": 4.0, "b": 8.0}},
             {"time": 10.0, "tokens": 100, "val": {"a": 2.0, "b": 8.0}}]
    # mix 0.75 a + 0.25 b: 5.0 -> 3.5; it reaches 4.25 halfway, where the unweighted mean (6.0 -> 5.0) is 5.5
    assert report.time_to_reach(curve, None, 4.25, {"a": 0.75, "b": 0.25}) == (5.0, 50.0)
    assert report.time_to_reach(curve, None, 4.25) is None


def test_job_file_parsing(tmp_path):
    runner = _load_runner()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# comment\n\nfirst --regime target --seeds 0  # trailing\nsecond --seeds 1\n")
    assert runner.parse_jobs(str(jobs)) == [("first", ["--regime", "target", "--seeds", "0"]),
                                            ("second", ["--seeds", "1"])]
    assert runner.regime_of(["--regime", "target"]) == "target" and runner.regime_of([]) == "pretrain"
    jobs.write_text("same --seeds 0\nsame --seeds 1\n")
    with pytest.raises(ValueError, match="unique"):
        runner.parse_jobs(str(jobs))
    jobs.write_text("bad/name --seeds 0\n")
    with pytest.raises(ValueError, match="job name 'bad/name'"):
        runner.parse_jobs(str(jobs))


JOB_FILES = sorted(os.path.join(ROOT, "benchmarks", "bench_jobs", f)
                   for f in os.listdir(os.path.join(ROOT, "benchmarks", "bench_jobs")) if f.endswith(".txt"))


@pytest.mark.parametrize("path", JOB_FILES, ids=os.path.basename)
def test_every_job_file_names_known_configurations_of_its_regimes(path):
    """The job files are what the GPU rounds run unattended: a typo must fail here, not on the GPU."""
    import argparse

    from cggr.bench.cli import add_arguments
    from cggr.bench.configs import get_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for name, args in _load_runner().parse_jobs(path):
        ns, unknown = parser.parse_known_args(args)
        assert not unknown, f"{name}: unknown arguments {unknown}"
        assert ns.configs, f"{name}: no --configs"
        for config in ns.configs:
            assert set(ns.regime) <= set(get_config(config).regimes), f"{name}: {config} not in {ns.regime}"


def test_multi_gpu_runner_end_to_end_on_cpu(tmp_path):
    """Two jobs of one regime on two workers share a cache (one reference model) and merge into one report."""
    jobs = tmp_path / "jobs.txt"
    common = "--regime target --ratios 0.5 --seeds 0 --reference-budget 64"
    jobs.write_text(f"a {common} --configs standard reference_half_lowest\nb {common} --configs excess oracle\n")
    root = tmp_path / "root"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_multi_gpu.py"), "--gpus", "0", "1",
           "--root", str(root), "--jobs", str(jobs), "--wall", "600", "--",
           "--seq-len", "16", "--batch-size", "4", "--token-budget", "128", "--eval-every", "64",
           "--eval-rows", "2", "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu",
           "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = root / "merged" / "target"
    runs = sorted(os.listdir(merged / "runs"))
    assert runs == [f"target__{c}__r{r}__s0.json" for c, r in
                    [("excess", "0.5"), ("oracle", "0.5"), ("reference_half_lowest", "0.5"), ("standard", "full")]]
    # main table (one seed: marked) + per-source table
    assert len(re.findall(r"\| reference_half_lowest( \(1 seed\))? \| 0\.5 \|", (merged / "summary.md").read_text())) == 2
    references = {json.load(open(merged / "runs" / r))["reference"]["steps"] for r in runs if "standard" not in r}
    assert len(references) == 1  # one reference model for the seed, trained once under the lock
    logs = "".join((root / "logs" / f"{n}.log").read_text() for n in "ab")
    assert logs.count("target: reference model") == 1 and "reference NLL" in logs
    # --merge-only over two jobs files (the queues of scripts/gpu_bench_round.sh's tests mode) merges both
    other = tmp_path / "other.txt"
    other.write_text("c --regime target --seeds 3 --configs standard\n")  # never ran: nothing to merge
    merge = [sys.executable, os.path.join(ROOT, "scripts", "bench_multi_gpu.py"), "--root", str(root),
             "--jobs", str(jobs), str(other), "--merge-only"]
    (merged / "summary.md").unlink()
    done = subprocess.run(merge, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(merged / "runs")) == runs and (merged / "summary.md").exists()
    other.write_text("a --regime target\n")
    done = subprocess.run(merge, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "job names must be unique" in done.stderr
    share = json.load(open(merged / "runs" / runs[0]))["train_source_share"]
    assert set(share) == {"fortunes", "python_doc", "shakespeare", "wordnet_glosses"}
    assert sum(share.values()) == pytest.approx(1.0)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux CPU affinity and at least 2 usable CPUs")
def test_multi_gpu_runner_pins_each_gpu_to_its_cpu_slice(tmp_path):
    """--cpu-slices: a job on GPU g runs on slice g mod N of the CPUs, disjoint from the other GPUs' slices."""
    import shutil

    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    record = tmp_path / "affinity.txt"
    fake_python = tmp_path / "python"  # stands in for `python -m cggr bench ...`: records where it ran
    fake_python.write_text(f"#!{sys.executable}\nimport os\nwith open({str(record)!r}, 'a') as f:\n"
                           "    f.write(os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + "
                           "','.join(map(str, sorted(os.sched_getaffinity(0)))) + '\\n')\n")
    fake_python.chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"j{i} --seeds {i}\n" for i in range(4)))
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_multi_gpu.py"), "--gpus", "0", "1", "--cpu-slices", "2",
           "--root", str(tmp_path / "root"), "--jobs", str(jobs), "--wall", "600", "--python", str(fake_python),
           "--no-merge"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = {}
    for line in record.read_text().split("\n"):
        if line:
            gpu, cpus = line.split()
            seen.setdefault(gpu, set()).add(cpus)
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    assert seen == {"0": {",".join(map(str, cpus[:half]))}, "1": {",".join(map(str, cpus[half:2 * half]))}}
    done = subprocess.run(cmd[:6] + [str(len(cpus) + 1)] + cmd[7:], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--cpu-slices must be between 1 and" in done.stderr


@pytest.mark.parametrize("regime,configs", [("pretrain", ["standard", "cggr_hardest", "cggr_loss"]),
                                            ("target", ["excess", "reference_half_lowest", "oracle"]),
                                            ("finetune", ["random"])])
def test_bf16_weights_runs_every_kind_of_step(tmp_path, regime, configs):
    """--dtype bf16-weights: the model (and the reference / stage-1 models) in bfloat16, no autocast."""
    from cggr.cli import main

    out = tmp_path / "out"
    rc = main(["bench", "--regime", regime, "--configs", *configs, "--ratios", "0.5", "--dtype", "bf16-weights",
               "--seq-len", "16", "--batch-size", "4", "--token-budget", "128", "--eval-every", "64",
               "--eval-rows", "2", "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    for name in os.listdir(out / "runs"):
        run = json.load(open(out / "runs" / name))
        assert run["settings"]["dtype"] == "bf16-weights" and run["param_dtype"] == "bfloat16"
        assert not run["diverged"]
        assert all(np.isfinite(v) for v in run["final_val"].values())


def test_multi_gpu_runner_skips_jobs_whose_bench_finished(tmp_path):
    """A job whose `cggr bench` said "done" is not started again with the same arguments; one that said
    INCOMPLETE is, and so is a finished one whose arguments changed."""
    record = tmp_path / "started.txt"
    fake_python = tmp_path / "python"  # stands in for `python -m cggr bench ...`: records, then reports
    fake_python.write_text(f"#!{sys.executable}\nimport sys\nwith open({str(record)!r}, 'a') as f:\n"
                           "    f.write(sys.argv[sys.argv.index('--seeds') + 1] + '\\n')\n"
                           "print('INCOMPLETE: 1 runs left' if '--left' in sys.argv else 'done in 0 s')\n")
    fake_python.chmod(0o755)
    jobs = tmp_path / "jobs.txt"

    def call(lines):
        jobs.write_text(lines)
        record.write_text("")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_multi_gpu.py"), "--gpus", "0",
               "--root", str(tmp_path / "root"), "--jobs", str(jobs), "--wall", "600", "--python", str(fake_python),
               "--no-merge"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return sorted(record.read_text().split()), done.stdout

    assert call("a --seeds 0\nb --seeds 1 --left\n")[0] == ["0", "1"]
    started, out = call("a --seeds 0\nb --seeds 1 --left\n")
    assert started == ["1"] and "a: done earlier" in out
    assert call("a --seeds 2\nb --seeds 1 --left\n")[0] == ["1", "2"]  # a's arguments changed
