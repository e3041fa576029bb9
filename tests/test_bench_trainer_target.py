"""benchmarks/bench_trainer_target.py on the CPU: regime 3 through transformers.Trainer and CGGRTrainer, the
bench's data, reference and run files (tiny preset, embedded corpus, byte tokens, a token budget)."""
import json
import os

import pytest

pytest.importorskip("accelerate")  # transformers' Trainer needs it

from benchmarks import bench_trainer_target  # noqa: E402
from cggr.bench import data as D  # noqa: E402
from cggr.bench import report  # noqa: E402

TINY = ["--regime", "target", "--corpus", D.EMBEDDED_DIR, "--seq-len", "16", "--batch-size", "4",
        "--token-budget", "256", "--eval-every", "128", "--eval-rows", "2", "--router-layers", "1",
        "--reference-budget", "64", "--device", "cpu", "--ratios", "0.25", "--seeds", "0"]


def test_both_runs_train_the_budget_and_report(tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    assert bench_trainer_target.main(TINY + ["--out", out, "--cache-dir", cache, "--untimed-steps", "1"]) == 0
    runs = {r["config"]: r for r in report.load_runs(out)}
    assert sorted(runs) == ["excess_lean", "standard"]
    assert runs["standard"]["path"] == "transformers.trainer.Trainer"
    assert runs["excess_lean"]["path"] == "cggr.hf.trainer.CGGRTrainer"
    for r in runs.values():
        # 256 tokens of 4 x 16 per step: 4 timed steps after the untimed one, evaluated at 0, 128 and 256 tokens
        assert r["steps"] == 4 and r["tokens"] == 256
        assert [p["tokens"] for p in r["curve"]] == [0, 128, 256]
        assert r["curve"][0]["val"] == pytest.approx(runs["standard"]["curve"][0]["val"])  # same init, untrained
        assert r["settings_hash"] == runs["standard"]["settings_hash"]
    assert runs["excess_lean"]["final_val"] != runs["standard"]["final_val"]
    summary = open(os.path.join(out, "summary.md")).read()
    assert "excess_lean" in summary and "standard" in summary
    # a second invocation reuses the finished runs
    before = json.load(open(os.path.join(out, "runs", "target__standard__rfull__s0.json")))
    assert bench_trainer_target.main(TINY + ["--out", out, "--cache-dir", cache, "--untimed-steps", "1"]) == 0
    assert json.load(open(os.path.join(out, "runs", "target__standard__rfull__s0.json"))) == before


@pytest.mark.parametrize("flags, message", [
    (["--regime", "finetune"], "runs regime 3 only"),
    (["--ratios", "0.25", "0.5"], "one ratio"),
    (["--compile", "blocks"], "use --trainer-compile"),
    (["--untimed-steps", "0"], "must be >= 1"),
])
def test_bad_flags_are_refused(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        bench_trainer_target.main(TINY + ["--out", str(tmp_path)] + flags)
    assert message in capsys.readouterr().err
