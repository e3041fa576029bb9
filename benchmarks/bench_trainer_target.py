"""Regime 3 of ``cggr bench`` (target domain in a mixed pool, with a reference model) trained through
``transformers.Trainer`` and ``cggr.hf.CGGRTrainer`` instead of the bench's own loop (issue 18: reach the
standard run's final target loss in at most 0.5 of its time, through the Trainer).

    python -m benchmarks.bench_trainer_target --regime target <cggr bench flags> \
        [--trainer-compile none|blocks|blocks-cudagraphs] [--untimed-steps 3]

The flags are ``cggr bench``'s (one seed per ``--seeds`` value; ``--ratios`` takes one ratio). What is the
bench's, reused as is: the token file and its splits, the pool, the reference model (trained for
``--reference-budget`` on the clean target slice, cached in ``--cache-dir``) and its per-token NLL over the
pool, the model preset and its seeded initialisation, the optimizer (``make_optimizer``: AdamW 0.9/0.95,
weight decay 0.1 on matrices), the learning-rate schedule on training time (``lr_at``: warm-up, cosine),
gradient clipping, bf16 autocast over float32 weights, the validation and test rows, evaluation every
``--eval-every`` (in the budget's unit: training seconds or tokens) outside the clock, and the run-file format (``OUT/runs``; ``summary.md``,
``curves.csv`` and the plot come from ``cggr bench --report-only --out OUT``).

What is the Trainer's: the training loop, the data loader (its seeded ``RandomSampler``, the same order in
both runs), the forward and loss of the model, the optimizer and scheduler calls, clipping. The two runs:

- ``standard``: ``transformers.Trainer``, every row;
- ``excess_lean``: ``CGGRTrainer(cggr_config=CGGRConfig(reference='reference_nll', min_tokens_ratio=ratio,
  warmup_steps=0))``: ``ExcessLossRows()`` as defaulted (1-block router, every 8th position), the reference's
  NLL precomputed into a dataset column (``cggr.hf.add_reference_nll`` does that for a ``datasets.Dataset``;
  here the bench's cached pool NLL is the column), i.e. the bench's ``excess_lean``.

``--trainer-compile``: ``blocks`` / ``blocks-cudagraphs`` compile every decoder block in place (the standard
run through ``cggr.compile_blocks``, marking a CUDA-graph step at each forward; the CGGR run through
``StepOptions(compile=...)``).

Clock: training time runs from the end of one optimizer step (``on_step_end``) to the end of the next, with a
device synchronisation at both ends, so everything the Trainer does between steps (data loading, logging,
callbacks) is counted; evaluations are left out. The first ``--untimed-steps`` steps (compilation, CUDA-graph
recording) are not counted and run at learning rate 0, so they change no weight; AdamW's state is reset
after them.
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import transformers as tf  # noqa: E402

from cggr import StepOptions  # noqa: E402
from cggr.bench import data as D  # noqa: E402
from cggr.bench.cli import add_arguments, settings_from_args  # noqa: E402
from cggr.bench.models import check_vocab  # noqa: E402
from cggr.bench.report import atomic_open, write_reports  # noqa: E402
from cggr.bench.runner import Bench, run_name  # noqa: E402
from cggr.bench.train import Evaluator, lr_at, make_optimizer  # noqa: E402
from cggr.compile_blocks import begin_graph_step, compile_decoder_blocks, compiled_graph_count  # noqa: E402
from cggr.hf import CGGRConfig, CGGRTrainer  # noqa: E402

RUNS = ("standard", "excess_lean")
COLUMN = "reference_nll"


class PoolDataset(torch.utils.data.Dataset):
    """The bench's pool rows (``seq_len + 1`` tokens: ``seq_len`` shifted targets), as Trainer examples."""

    def __init__(self, rows: np.ndarray, reference_nll=None):
        self.rows, self.reference_nll = rows, reference_nll

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.from_numpy(self.rows[i].astype(np.int64))
        example = {"input_ids": ids, "labels": ids}
        if self.reference_nll is not None:
            example[COLUMN] = self.reference_nll[i]
        return example


class GraphStepTrainer(tf.Trainer):
    """The standard Trainer over CUDA-graphed blocks: a new graph step before each forward."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        begin_graph_step()
        return super().compute_loss(model, inputs, *args, **kwargs)


class TrainingClock(tf.TrainerCallback):
    """Training time, the schedule's progress, evaluations outside the clock, the stop at the budget (seconds
    of training, or tokens: ``budget_kind`` of the bench's settings)."""

    def __init__(self, model, evaluator, settings, optim_cfg, device, untimed_steps, tokens_per_step, log):
        self.model, self.evaluator, self.s, self.optim = model, evaluator, settings, optim_cfg
        self.device, self.untimed_steps, self.tokens_per_step, self.log = device, untimed_steps, tokens_per_step, log
        self.train_time, self.steps, self.span_start, self.next_eval = 0.0, 0, None, 0.0
        self.curve, self.graphs_in_clock, self._graphs = [], 0, 0
        self.optimizer = None  # set by make_trainer: its state is reset when the clock starts

    def used(self) -> float:
        return self.train_time if self.s.budget_kind == "time" else float(self.steps * self.tokens_per_step)

    def progress(self) -> float:
        return min(1.0, self.used() / self.s.budget)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self):
        val = self.evaluator(self.model)
        self.curve.append({"step": self.steps, "time": self.train_time, "tokens": self.steps * self.tokens_per_step,
                           "lr": lr_at(self.progress(), self.optim), "val": val,
                           "train_loss": float("nan"),  # the Trainer keeps its loss to itself between logs
                           "val_mean": float(np.mean(list(val.values())))})
        self.log(f"  step {self.steps:5d}  {self.train_time:6.1f} s  val {self.curve[-1]['val_mean']:.3f}")

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if self.span_start is not None:
            self.train_time += now - self.span_start
            self.steps += 1
            self.graphs_in_clock += compiled_graph_count() - self._graphs
        elif state.global_step < self.untimed_steps:
            return  # compilation steps: not counted
        else:
            self.optimizer.state.clear()  # AdamW's moments start at the first timed step
        used = self.used()
        if used >= self.next_eval:
            self.evaluate()
            self.next_eval = (math.floor(used / self.s.eval_every) + 1) * self.s.eval_every
        if used >= self.s.budget:
            control.should_training_stop = True
            self.span_start = None
            return
        self._sync()
        self._graphs = compiled_graph_count()
        self.span_start = time.perf_counter()


def make_trainer(name, model, bench, dataset, clock, optim_cfg, seed, ratio, compile_mode, out_dir):
    s = bench.s
    targs = tf.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=s.batch_size, max_steps=10 ** 8,
        max_grad_norm=optim_cfg.grad_clip, bf16=s.dtype == "bf16" and bench.device.type == "cuda",
        report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10 ** 8, disable_tqdm=True,
        dataloader_num_workers=0, seed=seed, data_seed=seed, use_cpu=bench.device.type == "cpu",
        # full batches only, as the loop bench: a short last batch of the pool is a new shape, whose CUDA
        # graphs were compiled inside the clock (about 8 s in the run of 2026-12-06)
        dataloader_drop_last=True, remove_unused_columns=False)
    optimizer = make_optimizer(model, optim_cfg, bench.device)
    clock.optimizer = optimizer
    # LambdaLR's argument is the number of steps taken: the untimed ones run at learning rate 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda taken: 0.0 if taken < clock.untimed_steps else lr_at(clock.progress(), optim_cfg) / optim_cfg.lr)
    common = dict(model=model, args=targs, train_dataset=dataset, data_collator=tf.default_data_collator,
                  callbacks=[clock], optimizers=(optimizer, scheduler))
    if name == "standard":
        if compile_mode != "none":
            compile_decoder_blocks(model, cuda_graphs=compile_mode == "blocks-cudagraphs")
        return (GraphStepTrainer if compile_mode == "blocks-cudagraphs" else tf.Trainer)(**common)
    options = None if compile_mode == "none" else StepOptions(compile=compile_mode)
    config = CGGRConfig(reference=COLUMN, min_tokens_ratio=ratio, warmup_steps=0, seed=seed, step_options=options,
                        log_metrics=False)
    return CGGRTrainer(cggr_config=config, **common)


def run_one(bench, name, seed, ratio, prep, args, log):
    s = bench.s
    torch._dynamo.reset()
    model = bench.model_source.make(seed, bench.device).to(bench.weights_dtype)
    check_vocab(model, bench.corpus.vocab_size)
    model.config.use_cache = False
    reference = prep["reference"]["nll"].float().cpu() if name != "standard" else None
    dataset = PoolDataset(bench.train_rows.rows, reference)
    tokens_per_step = s.batch_size * s.seq_len
    clock = TrainingClock(model, bench.val, s, bench.optim, bench.device, args.untimed_steps, tokens_per_step, log)
    with tempfile.TemporaryDirectory(prefix="cggr_trainer_target_") as out_dir:
        trainer = make_trainer(name, model, bench, dataset, clock, bench.optim, seed, ratio, args.trainer_compile,
                               out_dir)
        log(f"target {name} s{seed} through {type(trainer).__name__} (compile {args.trainer_compile})")
        trainer.train()
    if not clock.curve or clock.curve[-1]["step"] != clock.steps:
        clock.evaluate()
    test = Evaluator(D.eval_rows(bench.corpus, "test", bench.row_len, s.eval_rows), s.eval_batch_size,
                     bench.device, bench.autocast)(model)
    final = clock.curve[-1]["val"]
    record = {
        "regime": s.regime, "config": name, "ratio": None if name == "standard" else ratio, "seed": seed,
        "primary": bench.primary, "settings_hash": bench.hash, "settings": bench.fields,
        "path": f"{type(trainer).__module__}.{type(trainer).__name__}", "trainer_compile": args.trainer_compile,
        "untimed_steps": args.untimed_steps, "steps": clock.steps, "train_time": clock.train_time,
        "tokens": clock.steps * tokens_per_step,
        "tokens_per_s": clock.steps * tokens_per_step / clock.train_time if clock.train_time > 0 else None,
        "step_time_ms": 1e3 * clock.train_time / clock.steps if clock.steps else None,
        "graphs_compiled_in_clock": clock.graphs_in_clock, "diverged": not all(math.isfinite(v) for v in final.values()),
        "final_val": final, "test": test, "curve": clock.curve, "train_source_share": bench.train_source_share(),
        "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": tf.__version__,
        "reference": {k: v for k, v in prep["reference"].items() if k not in ("nll", "row_nll", "heldout_row_nll")},
    }
    if clock.graphs_in_clock:
        log(f"{name}: {clock.graphs_in_clock} graph(s) compiled inside the clock")
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--trainer-compile", choices=("none", "blocks", "blocks-cudagraphs"), default="none",
                   help="decoder blocks compiled in place for both runs (CUDA graphs: a CUDA device)")
    p.add_argument("--untimed-steps", type=int, default=3, help="first steps left out of the clock (compilation)")
    args = p.parse_args(argv)
    if args.regime != ["target"]:
        p.error(f"--regime: this benchmark runs regime 3 only (--regime target), got {args.regime}")
    if len(args.ratios) != 1:
        p.error(f"--ratios: one ratio, got {args.ratios}")
    if args.compile:
        p.error("--compile is the bench loop's; use --trainer-compile (the reference is trained without it here)")
    if args.untimed_steps < 1:
        p.error(f"--untimed-steps must be >= 1 (the clock starts at the end of a step), got {args.untimed_steps}")
    if args.trainer_compile == "blocks-cudagraphs" and not torch.cuda.is_available():
        p.error("--trainer-compile blocks-cudagraphs replays CUDA graphs: it needs a CUDA GPU")
    args.configs = ["standard"]  # the bench's own validation of the rest; the runs are this script's
    log = print
    settings, corpus = settings_from_args(args, p, log)
    if settings is None:
        return 0
    bench = Bench(settings("target"), corpus, log)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    for seed in args.seeds:
        prep = bench._prepare(seed)
        for name in RUNS:
            path = os.path.join(args.out, "runs", run_name("target", name, None if name == "standard" else
                                                           args.ratios[0], seed) + ".json")
            if os.path.exists(path):
                log(f"{path}: done (reused)")
                continue
            record = run_one(bench, name, seed, args.ratios[0], prep, args, log)
            with atomic_open(path) as f:
                json.dump(record, f, indent=1)
    for name, path in write_reports(args.out, log).items():
        log(f"report: {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
