"""cggr bench pieces added for the policy study: reference-ranked rows, cache locks shared by concurrent
jobs, the data-mix and other-sources report columns, and the multi-GPU job runner (on the CPU)."""
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cggr.bench import report
from cggr.bench.configs import Batch, StepContext, _choose_reference_lowest, _choose_reference_stratified
from cggr.bench.runner import cache_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_runner():
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", os.path.join(ROOT, "scripts", "bench_multi_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(host_index):
    n = len(host_index)
    return Batch(torch.zeros(n, 3, dtype=torch.long), torch.as_tensor(host_index), np.zeros(n, dtype=np.int64),
                 np.asarray(host_index))


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_reference_stratified_takes_the_lowest_reference_rows_then_random(k):
    rng_data = np.random.default_rng(k)
    row_nll = rng_data.permutation(100).astype(np.float32)          # distinct values: a unique order
    host_index = rng_data.choice(100, size=8, replace=False)
    ctx = StepContext(seed=0, reference_row_nll=row_nll)
    picked = _choose_reference_stratified(_batch(host_index), k, np.random.default_rng(0), ctx)
    assert len(picked) == k and len(set(picked.tolist())) == k and picked.min() >= 0 and picked.max() < 8
    k_low = (k + 1) // 2
    lowest = set(np.argsort(row_nll[host_index])[:k_low].tolist())
    assert lowest <= set(picked.tolist())
    # the filler is random: over many draws every other row of the batch gets picked sometimes
    if k > k_low:
        seen = set()
        rng = np.random.default_rng(1)
        for _ in range(200):
            seen |= set(_choose_reference_stratified(_batch(host_index), k, rng, ctx).tolist())
        assert seen == set(range(8))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_reference_lowest_takes_exactly_the_lowest_reference_rows(k):
    rng_data = np.random.default_rng(10 + k)
    row_nll = rng_data.permutation(100).astype(np.float32)
    host_index = rng_data.choice(100, size=8, replace=False)
    ctx = StepContext(seed=0, reference_row_nll=row_nll)
    picked = _choose_reference_lowest(_batch(host_index), k, np.random.default_rng(0), ctx)
    assert sorted(picked.tolist()) == sorted(np.argsort(row_nll[host_index])[:k].tolist())
    # ties keep the batch order (stable), so the choice is deterministic
    ctx_ties = StepContext(seed=0, reference_row_nll=np.zeros(100, dtype=np.float32))
    assert _choose_reference_lowest(_batch(host_index), k, np.random.default_rng(1), ctx_ties).tolist() == list(range(k))


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
    jobs.write_text(f"a {common} --configs standard reference_stratified\nb {common} --configs excess oracle\n")
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
                    [("excess", "0.5"), ("oracle", "0.5"), ("reference_stratified", "0.5"), ("standard", "full")]]
    assert (merged / "summary.md").read_text().count("| reference_stratified | 0.5 |") == 2  # main + per-source
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
                                            ("target", ["excess", "reference_stratified"]),
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
