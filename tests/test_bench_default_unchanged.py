"""The default policy's bench run gives the same losses as before the policy objects (issue 17).

``tests/data/bench_target_default_losses.json`` was recorded at ac78f8d, before the API rework, with the
command it names: the target regime on the CPU under a token budget (deterministic), configuration
``excess_lean`` (``ExcessLossRows()`` as defaulted: 1-block router, every 8th position). The same command
must reproduce every training and validation loss.
"""
import json
import os

import pytest
import torch

from cggr.cli import main

RECORDED = os.path.join(os.path.dirname(__file__), "data", "bench_target_default_losses.json")


def test_default_policy_reproduces_the_recorded_losses(tmp_path):
    recorded = json.load(open(RECORDED))
    args = recorded["command"].split()[1:] + ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    run = json.load(open(tmp_path / "out" / "runs" / "target__excess_lean__r0.25__s0.json"))
    assert len(run["curve"]) == len(recorded["curve"])
    for got, want in zip(run["curve"], recorded["curve"]):
        assert got["step"] == want["step"]
        if want["train_loss"] == want["train_loss"]:  # NaN before the first step
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5, abs=1e-6)
        for source, value in want["val"].items():
            assert got["val"][source] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], source)
    for source, value in recorded["test"].items():
        assert run["test"][source] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert run["trained_rows_source_share"] == recorded["trained_rows_source_share"]
