"""benchmarks/bench_trainer_step.py on the CPU (tiny model): both paths run the timed steps and report."""
import json

import pytest

pytest.importorskip("accelerate")  # transformers' Trainer needs it

from benchmarks import bench_trainer_step  # noqa: E402


@pytest.mark.parametrize("policy", ["excess", "random"])
def test_both_paths_are_timed(tmp_path, policy):
    bench_trainer_step.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--batch", "4", "--seq", "32",
                             "--steps", "3", "--warmup", "1", "--policy", policy])
    results = json.load(open(tmp_path / "trainer_step.json"))["results"]
    assert [r["path"] for r in results] == ["loop", "trainer"]
    assert all(r["steps"] == 3 and r["step_ms"] > 0 for r in results)
    assert results[1]["vs_loop"] == pytest.approx(results[1]["step_ms"] / results[0]["step_ms"])


def test_cuda_graphs_need_cuda(tmp_path):
    with pytest.raises(SystemExit, match="--compile blocks-cudagraphs replays CUDA graphs"):
        bench_trainer_step.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--compile", "blocks-cudagraphs"])
