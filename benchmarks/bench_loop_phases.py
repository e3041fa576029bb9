"""Where a `cggr bench` training step spends its time: each phase of the loop bracketed by device syncs.

    python -m benchmarks.bench_loop_phases [--configs standard random cggr_hardest excess_lean ...]
        [--compile none blocks blocks-cudagraphs] [--forward-impl model trunk]
        [--dtype bf16 bf16-weights] [--steps 20] [--out DIR]

For each (configuration, compile, forward impl, dtype; the forward impl is the bench's `--forward-impl`:
the model's own forward, or `cggr.router.ModelTrunk`, which has no host synchronisation): SmolLM-135M shape from config, random tokens (timing does not
depend on the text; the target-regime configurations get a random reference NLL), the bench's own step objects, optimizer and clipping (cggr.bench.train), then
``--steps`` steps in which the batch copy, the loss (forward), backward, gradient clipping and the
optimizer step + zero_grad are each timed twice: host time to issue the phase, and wall time to its
end on the device (a sync after each phase). The syncs serialise the step, so the phase sum exceeds a
free-running step; the point is which phase dominates. Then the same steps free-running, a sync around
each (`free step ms`: `cggr bench`'s default clock) and back to back with one sync at the end (`span step
ms`: `--clock span`, the host issuing ahead of the GPU). A final profiler pass over a few free-running
steps lists the ops with the most host (self CPU) time.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from cggr.bench.configs import StepContext, get_config
from cggr.bench.data import RowSet
from cggr.bench.models import begin_graph_step, build_preset, compile_decoder_blocks
from cggr.bench.runner import autocast_for, weights_dtype
from cggr.bench.train import OptimConfig, _batch, _compile_outside_clock, make_optimizer, training_step

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PHASES = ("batch", "loss", "backward", "clip", "optimizer")


def target_context(ctx, rows, seq_len, device, rng):
    """What the target-regime configurations read (excess*, oracle, reference_filter*): source 0 is the
    target, a random reference NLL per token in [2, 8), and every domain threshold at the median row mean
    (half the rows pass), so their selection work is timed as in a real run."""
    token_nll = rng.uniform(2.0, 8.0, (len(rows), seq_len)).astype(np.float32)
    row_nll = token_nll.mean(axis=1)
    threshold = float(np.median(row_nll))
    ctx.target_source_id = 0
    ctx.reference_token_nll = torch.from_numpy(token_nll).to(device)
    ctx.reference_thresholds = {"heldout": threshold, "heldout99": threshold, "otsu": threshold}
    ctx.num_sources, ctx.num_train_rows = 2, len(rows)
    return ctx


def run(config, compile_mode, forward_impl, dtype, args, device):
    model = build_preset(args.preset, 50257, args.seq_len + 1, 0, 50256).to(device, weights_dtype(dtype)).train()
    rng = np.random.default_rng(0)
    n_rows = args.batch_size * 8
    rows = RowSet(rng.integers(0, 50257, (n_rows, args.seq_len + 1)), rng.integers(0, 2, n_rows), ["target", "other"])
    ctx = target_context(StepContext(seed=0, router_layers=min(4, model.config.num_hidden_layers - 1),
                                     forward_impl=forward_impl), rows, args.seq_len, device, rng)
    build = get_config(config).build
    autocast = autocast_for(device, dtype)
    if compile_mode != "none":
        compile_decoder_blocks(model, compile_mode)
        _compile_outside_clock(model, build, 0.25, ctx, rows, args.batch_size, device, autocast, n=3)
    step_obj = build(model, 0.25, ctx)
    optimizer = make_optimizer(step_obj.module, OptimConfig(lr=1e-4), device)
    order = [rng.permutation(len(rows))[:args.batch_size] for _ in range(args.steps + args.warmup)]
    host = {p: [] for p in PHASES}
    wall = {p: [] for p in PHASES}
    totals = []

    def phase(name, fn, record):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        if record:
            host[name].append(1e3 * (t1 - t0))
            wall[name].append(1e3 * (t2 - t0))
        return out

    for i, idx in enumerate(order):
        record = i >= args.warmup
        sync(device)
        start = time.perf_counter()
        batch = phase("batch", lambda: _batch(rows, idx, device), record)

        def loss_fn():
            begin_graph_step()
            with autocast():
                return step_obj.loss(batch)
        loss = phase("loss", loss_fn, record)
        phase("backward", loss.backward, record)
        phase("clip", lambda: torch.nn.utils.clip_grad_norm_(step_obj.module.parameters(), 1.0), record)

        def opt():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_obj.after_step()
        phase("optimizer", opt, record)
        if record:
            totals.append(1e3 * (time.perf_counter() - start))
    # free-running steps (no sync between phases): the loop of cggr.bench.train
    free = []
    for idx in order[:args.steps]:
        sync(device)
        t0 = time.perf_counter()
        training_step(step_obj, _batch(rows, idx, device), optimizer, autocast, 1.0)
        t1 = time.perf_counter()
        sync(device)
        free.append((1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)))
    # the same steps back to back, one synchronisation at the end: cggr bench --clock span
    sync(device)
    t0 = time.perf_counter()
    for idx in order[:args.steps]:
        training_step(step_obj, _batch(rows, idx, device), optimizer, autocast, 1.0)
    sync(device)
    span_step_ms = 1e3 * (time.perf_counter() - t0) / args.steps
    row = {"config": config, "compile": compile_mode, "forward_impl": forward_impl, "dtype": dtype,
           "free_step_ms": statistics.median(f[1] for f in free), "free_host_ms": statistics.median(f[0] for f in free),
           "span_step_ms": span_step_ms, "phased_step_ms": statistics.median(totals)}
    for p in PHASES:
        row[f"{p}_host_ms"] = statistics.median(host[p])
        row[f"{p}_wall_ms"] = statistics.median(wall[p])
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for idx in order[:3]:
                training_step(step_obj, _batch(rows, idx, device), optimizer, autocast, 1.0)
            sync(device)
        row["profile_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        row["profile_cuda"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    del model, step_obj, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["standard", "random", "cggr_hardest"])
    p.add_argument("--compile", nargs="+", default=["none", "blocks"], choices=["none", "blocks", "blocks-cudagraphs"])
    p.add_argument("--forward-impl", nargs="+", default=["model"], choices=["model", "trunk"])
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "bf16-weights"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--preset", default="smollm-135m", help="model preset of cggr.bench.models")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="add profiler tables (host and device ops)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    print("| config | compile | forward | dtype | free step ms | free host ms | span step ms | " + " | ".join(f"{p} host/wall" for p in PHASES) + " |")
    for dtype in args.dtype:
        for compile_mode in args.compile:
            for forward_impl in args.forward_impl:
                for config in args.configs:
                    r = run(config, compile_mode, forward_impl, dtype, args, device)
                    rows.append(r)
                    print(f"| {config} | {compile_mode} | {forward_impl} | {dtype} | {r['free_step_ms']:.1f} | {r['free_host_ms']:.1f} | "
                          f"{r['span_step_ms']:.1f} | "
                          + " | ".join(f"{r[p + '_host_ms']:.1f}/{r[p + '_wall_ms']:.1f}" for p in PHASES) + " |",
                          flush=True)
    for r in rows:
        if "profile_cpu" in r:
            print(f"\n### {r['config']} {r['compile']} {r['forward_impl']} {r['dtype']}\n{r['profile_cpu']}\n{r['profile_cuda']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loop_phases.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
