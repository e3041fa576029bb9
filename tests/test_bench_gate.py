"""The bench's confidence_gate configuration (cggr.bench.configs.ConfidenceGateStep) on the CPU."""
import json
import subprocess
import sys

import numpy as np
import torch

from cggr.bench.configs import ConfidenceGateStep, StepContext


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_passes_prune_well_fit_rows_and_the_tail_is_full():
    step = ConfidenceGateStep(tiny(), StepContext(seed=0), prune_ratio=0.5, anneal=0.25)
    order = step.batch_order(n_rows=40, batch_size=4, seed=0)
    first = np.concatenate([next(order) for _ in range(10)])  # pass 0: every row (nothing known yet)
    assert sorted(first.tolist()) == list(range(40))
    losses = torch.linspace(0, 1, 40)  # rows 0..19 below the mean
    step.sampler.update(torch.arange(40), losses)
    batch = next(order)  # pass 1 drawn now, from those scores
    kept = step.sampler.pass_stats()["rows_kept"]
    assert 20 <= kept < 40 and step.sampler.pass_stats()["rows_upweighted"] > 0
    assert not step.sampler.pass_stats()["full_pass"]  # decided by batch_order's progress, not the sampler's epochs
    assert set(step.sampler) >= set(range(20, 40))  # rows above the mean always stay in the pass
    rest = [batch] + [next(order) for _ in range(kept // 4 - 1)]  # the pass's batches (a partial one dropped)
    assert set(np.concatenate(rest).tolist()) <= set(step.sampler)
    step.progress = 0.8  # in the last quarter of the budget: the next pass is full
    nxt = [next(order) for _ in range(10)]
    assert sorted(np.concatenate(nxt).tolist()) == list(range(40)) and step.sampler.pass_stats()["full_pass"]


def test_a_bench_run_with_the_gate(tmp_path):
    cmd = [sys.executable, "-m", "cggr", "bench", "--regime", "finetune", "--configs", "standard", "confidence_gate",
           "--seq-len", "16", "--batch-size", "4", "--token-budget", "512", "--init-budget", "128",
           "--eval-every", "256", "--eval-rows", "2", "--untimed-warmup-steps", "1", "--device", "cpu",
           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.load(open(tmp_path / "out" / "runs" / "finetune__confidence_gate__rfull__s0.json"))
    assert record["steps"] == 8 and record["curve"][-1]["selection"]["rows_total"] > 0
