"""CUDA checks of `cggr bench --compile` (run on the GPU machine).

    pytest tests/gpu/test_bench_cuda.py -q

Eager, compiled blocks and CUDA-graphed blocks train the same tiny model on the same rows for the same
token budget: their losses must agree (the graphs replay the same computation: stale graph outputs,
a missed step mark or a graph fed from a freed buffer would show here), and no graph may be compiled
inside a timed step. The span clock (host running ahead of the GPU, batches from pinned memory) must
train the same too: a pinned buffer reused before its copy landed would show here.
"""
import json
import os

import pytest
import torch

from cggr.cli import main

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton)",
)

TINY = ["--regime", "pretrain", "--seq-len", "64", "--batch-size", "8", "--token-budget", "2560",
        "--eval-every", "1280", "--eval-rows", "4", "--untimed-warmup-steps", "1", "--router-layers", "1",
        "--ratios", "0.25", "--seeds", "0", "--device", "cuda", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_compile")
    out = {}
    for mode in ("eager", "blocks", "blocks-cudagraphs", "span-cudagraphs"):
        extra = {"eager": [], "span-cudagraphs": ["--compile", "blocks-cudagraphs", "--clock", "span"]}.get(
            mode, ["--compile", mode])
        folder = root / mode
        assert main(["bench", "--configs", "standard", "random", "cggr_hardest", "--out", str(folder),
                     "--cache-dir", str(root / "cache")] + TINY + extra) == 0
        out[mode] = {json.load(open(folder / "runs" / f))["config"]: json.load(open(folder / "runs" / f))
                     for f in os.listdir(folder / "runs")}
    return out


@pytest.mark.parametrize("mode", ["blocks", "blocks-cudagraphs", "span-cudagraphs"])
@pytest.mark.parametrize("config", ["standard", "random", "cggr_hardest"])
def test_compiled_training_matches_eager(runs, mode, config):
    eager, compiled = runs["eager"][config], runs[mode][config]
    assert compiled["steps"] == eager["steps"] == 5  # 2560 tokens / (8 rows x 64 targets)
    assert compiled["graphs_compiled_in_clock"] == 0
    assert eager["graphs_compiled_in_clock"] is None
    for source, value in eager["final_val"].items():
        assert compiled["final_val"][source] == pytest.approx(value, abs=2e-3), source
    for point_e, point_c in zip(eager["curve"][1:], compiled["curve"][1:]):
        assert point_c["train_loss"] == pytest.approx(point_e["train_loss"], abs=2e-3)


def test_batches_and_host_choices_reach_the_gpu_without_a_sync():
    import numpy as np

    from cggr.bench.configs import to_device

    array = np.arange(4 * 33, dtype=np.int64).reshape(4, 33)
    to_device(array, "cuda")  # lazy initialisation (pinned allocator, CUDA context) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = [to_device(array + i, "cuda") for i in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, tensor in enumerate(moved):
        assert torch.equal(tensor.cpu(), torch.from_numpy(array + i))
