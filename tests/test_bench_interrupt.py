"""``cggr bench`` killed (SIGKILL) at random points, then run again with the same --out: finished runs are
kept, no half-written file is read as a result, and the runs and their losses are those of an
uninterrupted run (token budget: deterministic). A corrupt run file gets an error naming it."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cggr.bench import report

ARGS = ["bench", "--regime", "pretrain", "--configs", "standard", "random", "cggr_hardest", "--ratios", "0.5",
        "--seq-len", "16", "--batch-size", "4", "--token-budget", "256", "--eval-every", "64", "--eval-rows", "2",
        "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu"]


def _bench(out, cache):
    return [sys.executable, "-m", "cggr"] + ARGS + ["--out", str(out), "--cache-dir", str(cache)]


def _losses(out):
    return {(r["config"], r["seed"]): [(p["tokens"], p["val"]) for p in r["curve"]] for r in report.load_runs(str(out))}


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_bench(tmp_path / "whole", tmp_path / "cache"), check=True, env=env, capture_output=True)
    # timed on a second whole run: the first also writes the token cache and byte-compiles the package
    # (a fresh clone), so its duration overstates the killed runs' and a kill could land after they ended
    start = time.monotonic()
    subprocess.run(_bench(tmp_path / "again", tmp_path / "cache"), check=True, env=env, capture_output=True)
    duration = time.monotonic() - start
    assert _losses(tmp_path / "again") == _losses(tmp_path / "whole")
    rng = random.Random(int(os.environ.get("CGGR_KILL_SEED", "0")))
    out = tmp_path / "killed"
    landed = 0
    for _ in range(3):  # three kills at random points of a run's duration, each from a fresh start
        process = subprocess.Popen(_bench(out, tmp_path / "cache"), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.9) * duration)
        landed += process.poll() is None  # still running: the kill interrupts it
        process.send_signal(signal.SIGKILL)
        process.wait()
        runs_dir = out / "runs"
        for name in os.listdir(runs_dir) if runs_dir.exists() else []:
            if name.endswith(".json"):  # every finished run file is whole
                report.read_run_file(str(runs_dir / name))
    assert landed >= 1, "no kill landed while the bench was running"
    subprocess.run(_bench(out, tmp_path / "cache"), check=True, env=env, capture_output=True)
    assert _losses(out) == _losses(tmp_path / "whole")
    summary = json.load(open(out / "results.json"))
    assert sorted(r["config"] for r in summary["runs"]) == ["cggr_hardest", "random", "standard"]
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_a_corrupt_run_file_is_named(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "pretrain__standard__rfull__s0.json").write_text('{"regime": "pretrain", "con')
    with pytest.raises(ValueError, match=r"pretrain__standard__rfull__s0.json: not a cggr bench run file"):
        report.load_runs(str(tmp_path))
    (runs / "pretrain__standard__rfull__s0.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match=r"not a cggr bench run file \(no regime, config"):
        report.load_runs(str(tmp_path))


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"val_loss_pretrain.png.tmp{dead.pid}").write_text("half a plot")
    (tmp_path / f"summary.md.tmp{os.getpid()}").write_text("a live writer's")  # this process: alive
    (tmp_path / "notes.tmp").write_text("not ours (no pid)")
    report.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp", f"summary.md.tmp{os.getpid()}"]
