"""CGGRTrainer with a reference, offline, on a tiny random Llama (a few minutes on a CPU).

The pool mixes two synthetic "domains": target rows (a noisy cyclic pattern the model can learn) and noise
rows (uniform random tokens: nothing to learn). A small reference model is first trained on a few clean
target rows with the plain Trainer; then the model trains on the pool through CGGRTrainer with
ExcessLossRows (policy='auto' with a reference), which keeps the rows whose loss is high under the model
but low under the reference: the target rows. Printed: the target validation loss after standard training
and after CGGR, at the same number of optimizer steps, and the share of target rows CGGR trained on.

    python examples/hf_trainer_tiny.py [--steps 60] [--out /tmp/cggr_hf_example]
"""
import argparse
import tempfile

import torch
import transformers as tf

import cggr
from cggr.hf import CGGRConfig, CGGRTrainer

VOCAB, LENGTH = 64, 32


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    return tf.LlamaForCausalLM(config)


def target_row(g):
    """A cycle of 8 tokens from a random offset, 10 % of the tokens replaced."""
    start = int(torch.randint(0, VOCAB, (1,), generator=g))
    row = (start + torch.arange(LENGTH) * 3) % VOCAB
    noise = torch.rand(LENGTH, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (LENGTH,), generator=g), row).tolist()


def noise_row(g):
    return torch.randint(0, VOCAB, (LENGTH,), generator=g).tolist()


def rows(n_target, n_noise, seed):
    g = torch.Generator().manual_seed(seed)
    data = [{"input_ids": target_row(g), "domain": 1} for _ in range(n_target)]
    data += [{"input_ids": noise_row(g), "domain": 0} for _ in range(n_noise)]
    order = torch.randperm(len(data), generator=g).tolist()
    return [data[i] for i in order]


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def args(out, steps, **kw):
    return tf.TrainingArguments(output_dir=out, per_device_train_batch_size=16, max_steps=steps, learning_rate=3e-3,
                                lr_scheduler_type="constant", logging_steps=max(1, steps // 5), report_to=[],
                                save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                                remove_unused_columns=False, seed=0, **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    out = opts.out or tempfile.mkdtemp(prefix="cggr_hf_example_")
    pool, clean, heldout = rows(256, 768, seed=0), rows(64, 0, seed=1), rows(32, 0, seed=2)

    reference_lm = tiny_llama(seed=1)  # the reference: a small budget on clean target rows
    tf.Trainer(model=reference_lm, args=args(f"{out}/reference", 40), train_dataset=clean,
               data_collator=collate).train()

    results = {}
    for name in ("standard", "cggr"):
        model = tiny_llama(seed=0)
        common = dict(model=model, args=args(f"{out}/{name}", opts.steps), train_dataset=pool,
                      eval_dataset=heldout, data_collator=collate)
        if name == "standard":
            trainer = tf.Trainer(**common)
        else:
            kept = []
            trainer = CGGRTrainer(**common, cggr_config=CGGRConfig(
                reference=cggr.ReferenceModel(reference_lm), min_tokens_ratio=0.25, warmup_steps=0))
            # which rows were trained: a forward pre-hook on the model (training forwards only)
            model.register_forward_pre_hook(
                lambda m, a, kw: kept.append(kw["input_ids"]) if m.training else None, with_kwargs=True)
        trainer.train()
        results[name] = trainer.evaluate()["eval_loss"]
        if name == "cggr":
            targets = {tuple(r["input_ids"]) for r in pool if r["domain"] == 1}
            trained = [tuple(row.tolist()) for batch in kept for row in batch]
            share = sum(row in targets for row in trained) / max(1, len(trained))
            print(f"CGGR trained {len(trained)} rows, {share:.0%} of them target rows (the pool: 25 %)")
    for name, loss in results.items():
        print(f"{name:>8}: target validation loss {loss:.3f} after {opts.steps} steps")


if __name__ == "__main__":
    main()
