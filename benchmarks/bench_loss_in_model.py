"""Where the LM-head loss sits in a real training step: SmolLM-135M forward + backward with each loss path.

    python -m benchmarks.bench_loss_in_model --out OUT_DIR [--batch 32] [--seq 1024] [--profile]

Paths (same model, same batch, bf16, SDPA; no optimizer step, so only the loss path differs):
  hf            model(input_ids, labels=labels).loss (Hugging Face: full logits, its cross entropy)
  eager_ce      decoder, then F.cross_entropy(hidden @ W.T) on all tokens
  cggr_linear@R decoder, then CGGRLoss(scoring='combined', selection='topk', min_tokens_ratio=R,
                dynamic_threshold=False, validate_targets=False).forward_linear(hidden, W, targets): the
                token-level fused path ('combined': CGGRLoss's default when the published numbers were taken)
--profile prints the ten CUDA kernels that take the most time in cggr_linear@0.25.
Prints a markdown table and writes OUT_DIR/loss_in_model.json.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_model_step import smollm_config  # noqa: E402
from cggr import CGGRLoss  # noqa: E402


def median_ms(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_loss_in_model needs a CUDA GPU")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(smollm_config(tiny=False)).to("cuda", torch.bfloat16).train()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")

    def hf():
        model(input_ids=ids, labels=ids).loss.backward()

    def eager_ce():
        hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
        logits = hidden @ head.weight.T
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).backward()

    def cggr_linear(ratio):
        crit = CGGRLoss(scoring="combined", selection="topk", min_tokens_ratio=ratio, warmup_steps=0,
                        dynamic_threshold=False, validate_targets=False)

        def run():
            hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
            crit.forward_linear(hidden, head.weight, ids[:, 1:]).backward()
        return run

    def decoder_only():
        decoder(input_ids=ids).last_hidden_state.float().square().mean().backward()

    paths = {"hf": hf, "eager_ce (fp32 upcast)": eager_ce, "decoder only (no LM head)": decoder_only}
    for r in args.ratios:
        paths[f"cggr_linear@{r}"] = cggr_linear(r)
    results = {}
    for name, fn in paths.items():
        results[name] = median_ms(fn, args.steps)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(f"[bench_loss_in_model] {name}: {results[name]:.2f} ms", file=sys.stderr)
    base = results["hf"]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} x {args.seq}, "
          f"forward + backward, median of {args.steps}\n")
    print("| loss path | fwd+bwd ms | vs hf |\n|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")
    if args.profile:
        fn = cggr_linear(0.25)
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss_in_model.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                   "seq": args.seq, "ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
