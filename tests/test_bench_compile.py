"""cggr bench --compile: decoder blocks compiled in place, graphs built before the clock, weights untouched."""
import json
import os

import pytest
import torch

from cggr.bench import data as D
from cggr.bench.configs import StepContext, get_config
from cggr.bench.models import build_preset, compile_decoder_blocks, compiled_graph_count, decoder_blocks
from cggr.bench.runner import Settings
from cggr.bench.train import _compile_outside_clock
from cggr.cli import main

TINY = ["--seq-len", "16", "--batch-size", "4", "--token-budget", "96", "--eval-every", "48",
        "--eval-rows", "2", "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu"]


def test_decoder_blocks_of_llama_and_a_clear_error_otherwise():
    model = build_preset("tiny", 256, 17, 0, 0)
    assert decoder_blocks(model) is model.model.layers
    with pytest.raises(TypeError, match="unsupported architecture Linear: no list of decoder layers"):
        decoder_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_decoder_blocks(model, "max")


def test_compile_warm_up_leaves_the_weights_and_gradients_as_they_were():
    torch.manual_seed(0)
    model = build_preset("tiny", 256, 17, 0, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compile_decoder_blocks(model, "blocks", backend="eager")  # Dynamo only: the guards and graphs, no codegen
    rows = D.RowSet(torch.randint(0, 256, (12, 17)).numpy(), torch.zeros(12, dtype=torch.int64).numpy(),
                    ["only"])
    graphs = compiled_graph_count()
    _compile_outside_clock(model, get_config("cggr_hardest").build, 0.5, StepContext(seed=0, router_layers=1),
                           rows, 4, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert compiled_graph_count() > graphs  # the router's no-grad call and the training call
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_settings_hash_ignores_compile_when_off():
    fields = Settings().key_fields("tokens-x.npz")
    assert "compile" not in fields
    assert Settings(compile="blocks").key_fields("tokens-x.npz")["compile"] == "blocks"


def test_compile_refuses_a_row_count_curriculum(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--compile", "--selection-warmup-steps", "5", "--out", str(tmp_path)] + TINY)


def test_cuda_graphs_need_a_cuda_device(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--compile", "blocks-cudagraphs", "--out", str(tmp_path)] + TINY)
    assert "it needs a CUDA device, got --device cpu" in capsys.readouterr().err


def test_bench_with_compiled_blocks_end_to_end(tmp_path):
    """Router configuration and a plain one, inductor on the CPU: no graph is compiled inside a timed step."""
    out = tmp_path / "out"
    assert main(["bench", "--regime", "pretrain", "--configs", "standard", "cggr_hardest", "--ratios", "0.5",
                 "--seeds", "0", "--compile", "--out", str(out), "--cache-dir", str(tmp_path / "cache")] + TINY) == 0
    runs = sorted(os.listdir(out / "runs"))
    assert runs == ["pretrain__cggr_hardest__r0.5__s0.json", "pretrain__standard__rfull__s0.json"]
    for name in runs:
        record = json.load(open(out / "runs" / name))
        assert record["settings"]["compile"] == "blocks"
        assert record["graphs_compiled_in_clock"] == 0
        assert record["steps"] == 2  # ceil(96 tokens / (4 rows x 16 targets)): the token budget, as eager
    assert "compiled blocks" in (out / "summary.md").read_text()


@pytest.mark.parametrize("forward_impl", ["model", "trunk"])
@pytest.mark.parametrize("config", ["excess_lean", "reference_filter", "oracle"])
def test_loop_phase_benchmark_runs_the_target_configurations(config, forward_impl):
    """benchmarks.bench_loop_phases gives the target-regime configurations a synthetic reference, so their
    selection work is timed too (a CPU smoke run of the same code the GPU run uses)."""
    import argparse

    from benchmarks import bench_loop_phases as lp

    args = argparse.Namespace(preset="tiny", seq_len=16, batch_size=4, steps=2, warmup=1, profile=False)
    row = lp.run(config, "none", forward_impl, "bf16", args, torch.device("cpu"))
    assert row["config"] == config and row["forward_impl"] == forward_impl and row["free_step_ms"] > 0
    assert all(row[f"{p}_wall_ms"] >= row[f"{p}_host_ms"] >= 0 for p in lp.PHASES)
