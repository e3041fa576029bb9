"""Which rows ``ExcessLossRows`` picks on a pretrained checkpoint: the target's share of the selected rows, by
router depth and stride (a selection measurement, no timing: it runs on a CPU).

    python -m benchmarks.probe_excess_selection --model /tmp/smollm2 [--corpus ../shared/corpus]

The data are example (a)'s (``examples/continued_pretraining.py``'s ``build_data``: a pool in which the
target, ``python_doc``, is a fifth of the rows, and a disjoint clean reference sample). The reference is the
checkpoint fine-tuned on that sample (AdamW 1e-4, batches of 8, ``--ref-epochs``), as in the example. Then,
for each router setting, ``CGGRModel(policy=ExcessLossRows(settings), min_tokens_ratio=0.25)`` chooses a
quarter of the rows of every batch of 32 (``select_rows``, the model untrained), and the share of target rows
among them is printed; last, the same with the excess of the full model's own NLL (all blocks, every
position; ``CGGRModel``'s router cannot be as deep as the model). Random rows would give the pool's share.
"""
import argparse
import os
import sys
import time
import types

import torch

import cggr
from cggr import CGGRModel, ExcessLossRows, RouterSettings

SETTINGS = {"1 block, every 8th (default)": RouterSettings(layers=1, token_stride=8),
            "4 blocks, every 8th": RouterSettings(layers=4, token_stride=8),
            "15 blocks, every 8th": RouterSettings(layers=15, token_stride=8),
            "29 blocks, every 8th": RouterSettings(layers=29, token_stride=8),
            "29 blocks, every position": RouterSettings(layers=29, token_stride=1)}


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the SmolLM2 folder (scripts/smollm2_checkpoint.py)")
    p.add_argument("--corpus", default=os.path.join(here, "..", "..", "shared", "corpus"))
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="batches of 32 rows in the pool")
    p.add_argument("--ref-rows", type=int, default=64)
    p.add_argument("--ref-epochs", type=int, default=2)
    args = p.parse_args(argv)
    import transformers as tf

    sys.path.insert(0, os.path.join(here, "..", "examples"))
    import continued_pretraining as example

    data_args = types.SimpleNamespace(steps=args.batches, batch_size=32, eval_rows=8, ref_rows=args.ref_rows,
                                      length=args.length, seed=0)
    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    pool, ref_rows, _, _ = example.build_data(args.corpus, "python_doc", tokenizer, data_args)
    torch.manual_seed(0)

    def load():
        return tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    ref = load().train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
    start = time.time()
    for _ in range(args.ref_epochs):
        for i in range(0, len(ref_rows), 8):
            ids = torch.tensor(ref_rows[i:i + 8])
            ref(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    print(f"reference fine-tuned in {time.time() - start:.0f} s", flush=True)
    reference = cggr.ReferenceModel(ref)
    model = load()
    vocab = model.config.vocab_size
    batches = [pool[i:i + 32] for i in range(0, len(pool), 32)]
    with torch.no_grad():
        refs = [reference(torch.tensor([r for r, _ in b])) for b in batches]
        ref_row = torch.cat([x.mean(1) for x in refs])
        is_target = torch.tensor([s == "python_doc" for b in batches for _, s in b])
        print(f"pool: {len(is_target)} rows, target share {is_target.float().mean():.2f}; reference row NLL "
              f"target {ref_row[is_target].mean():.2f} others {ref_row[~is_target].mean():.2f}")
        for name, settings in SETTINGS.items():
            cggr_model = CGGRModel(model, policy=ExcessLossRows(settings), min_tokens_ratio=0.25, warmup_steps=0)
            picked = []
            for b, r in zip(batches, refs):
                ids = torch.tensor([x for x, _ in b])
                picked += [b[i][1] for i in cggr_model.select_rows(ids, ids, None, r).indices.tolist()]
            share = sum(s == "python_doc" for s in picked) / len(picked)
            print(f"{name}: target share of the selected rows {share:.2f} ({len(picked)} rows)", flush=True)
        picked = []
        for b, r in zip(batches, refs):
            ids = torch.tensor([x for x, _ in b])
            logits = model(input_ids=ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1),
                                                    reduction="none").view(len(b), -1)
            picked += [b[i][1] for i in torch.topk((nll - r).mean(1), len(b) // 4).indices.tolist()]
        share = sum(s == "python_doc" for s in picked) / len(picked)
        print(f"full model's excess (all {model.config.num_hidden_layers} blocks, every position): target share "
              f"{share:.2f}")


if __name__ == "__main__":
    main()
