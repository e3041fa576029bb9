"""The Trainer path's step against the plain-loop CGGRModel step at the same settings (issue 18: within 5 %).

    python -m benchmarks.bench_trainer_step --out OUT_DIR [--batch 32] [--seq 1024] [--steps 20]
        [--policy excess|hardest|random] [--compile none|blocks|blocks-cudagraphs] [--device cuda] [--tiny]

Both paths: the SmolLM-135M architecture (``bench_model_step.smollm_config``; ``--tiny`` a 6-layer toy) built
from the same initial weights, bf16 parameters, fused AdamW (lr 1e-4, no weight decay, no gradient
clipping, constant schedule), ratio 0.25 from the first step, batches of uniform random tokens
(labels = input_ids) taken from the same CPU dataset in the same order and moved to the device each step.
``excess`` is ``ExcessLossRows()`` with a precomputed reference column (``CGGRConfig(reference=column)``; the
loop passes the same values as ``reference_nll``), ``hardest`` ``HardestRows(RouterSettings(layers=1,
token_stride=8))``, ``random`` ``RandomRows()``.

- loop: ``loss = cggr_model(ids, labels=labels[, reference_nll=...]); loss.backward(); opt.step();
  opt.zero_grad(); cggr_model.step()``.
- trainer: ``cggr.hf.CGGRTrainer`` (per_device_train_batch_size = batch, no accumulation, no evaluation,
  no checkpoints, no logging until the end, ``dataloader_num_workers=0``); the step is timed from the
  Trainer's ``on_step_begin`` to ``on_step_end`` callbacks (data loading of the step included, as in the loop).

Timing: device events (CUDA) or perf_counter (CPU) around each step after ``--warmup`` untimed steps; median
and p10/p90 of ``--steps`` steps. Prints a markdown table; writes OUT_DIR/trainer_step.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_model_step import Timer, smollm_config  # noqa: E402
from cggr import CGGRModel, ExcessLossRows, HardestRows, RandomRows, RouterSettings, StepOptions  # noqa: E402
from cggr.hf import CGGRConfig, CGGRTrainer  # noqa: E402

RATIO = 0.25
POLICIES = {"excess": ExcessLossRows, "hardest": lambda: HardestRows(router=RouterSettings(layers=1, token_stride=8)),
            "random": RandomRows}


def dataset(n, seq, vocab, with_reference):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        row = {"input_ids": torch.randint(0, vocab, (seq,), generator=g).tolist()}
        if with_reference:
            row["reference_nll"] = (10.0 * torch.rand(seq - 1, generator=g)).tolist()
        rows.append(row)
    return rows


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def step_options(args):
    return None if args.compile == "none" else StepOptions(compile=args.compile)


def run_loop(model, data, args, device):
    cggr_model = CGGRModel(model, policy=POLICIES[args.policy](), min_tokens_ratio=RATIO, warmup_steps=0,
                           step_options=step_options(args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    timer = Timer(device)
    for i in range(args.warmup + args.steps):
        start = timer.start() if i >= args.warmup else None
        rows = data[i * args.batch:(i + 1) * args.batch]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        kwargs = {}
        if args.policy == "excess":
            kwargs["reference_nll"] = torch.tensor([r["reference_nll"] for r in rows]).to(device)
        loss = cggr_model(batch["input_ids"], labels=batch["labels"], **kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cggr_model.step()
        if start is not None:
            timer.stop(start)
    return timer.times_ms()


class StepTimer(tf.TrainerCallback):
    def __init__(self, device, warmup):
        self.timer, self.warmup, self.start = Timer(device), warmup, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = self.timer.start() if state.global_step >= self.warmup else None

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.timer.stop(self.start)


def run_trainer(model, data, args, device):
    targs = tf.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="cggr_trainer_step_"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=1e-4, weight_decay=0.0, max_grad_norm=0.0,
        lr_scheduler_type="constant", optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        bf16=False, report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential", use_cpu=device.type == "cpu", seed=0)
    config = CGGRConfig(policy=POLICIES[args.policy](), min_tokens_ratio=RATIO, warmup_steps=0,
                        reference="reference_nll" if args.policy == "excess" else None,
                        step_options=step_options(args), log_metrics=False)
    timer = StepTimer(device, args.warmup)
    trainer = CGGRTrainer(model=model, args=targs, train_dataset=data, data_collator=collate, cggr_config=config,
                          callbacks=[timer])
    trainer.train()
    return timer.timer.times_ms()


def summary(times):
    times = sorted(times)
    return {"step_ms": statistics.median(times), "p10_ms": times[int(0.1 * (len(times) - 1))],
            "p90_ms": times[int(0.9 * (len(times) - 1))], "steps": len(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--policy", choices=sorted(POLICIES), default="excess")
    p.add_argument("--compile", choices=["none", "blocks", "blocks-cudagraphs"], default="none")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 6-layer toy model (CPU smoke run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible (use --device cpu --tiny for a smoke run)")
    if args.compile == "blocks-cudagraphs" and device.type != "cuda":
        raise SystemExit(f"--compile blocks-cudagraphs replays CUDA graphs: it needs --device cuda, got {device}")
    config = smollm_config(args.tiny)
    data = dataset(args.batch * (args.warmup + args.steps), args.seq, config.vocab_size, args.policy == "excess")
    torch.manual_seed(0)
    with torch.device(device):
        init = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    del init
    rows = []
    for path, run in (("loop", run_loop), ("trainer", run_trainer)):
        torch._dynamo.reset()
        with torch.device(device):
            model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(state)
        model.train()
        rows.append(dict(path=path, **summary(run(model, data, args, device))))
        del model
    rows[1]["vs_loop"] = rows[1]["step_ms"] / rows[0]["step_ms"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"{'tiny' if args.tiny else 'SmolLM-135M'} architecture, bf16, batch {args.batch} x {args.seq}, "
              f"policy {args.policy}, ratio {RATIO}, compile {args.compile}, {name}, torch {torch.__version__}, "
              f"transformers {tf.__version__}")
    print(header)
    print("\n| path | step ms (p10-p90) | vs loop |\n|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['step_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) | {r.get('vs_loop', 1.0):.3f}x |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trainer_step.json"), "w") as f:
        json.dump({"header": header, "args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
