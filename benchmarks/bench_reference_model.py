"""``cggr.ReferenceModel``'s per-token NLL against what it did until 2026-12-06: the model's whole forward per
chunk of rows (7 forwards of 5 rows at 32 x 512, vocabulary 49152), and the cross entropy on ``[B, V, T]``
logits (class dimension in the middle, which CUDA computes with its spatial log-softmax). Now: the layers
once over the batch, the LM head and a flattened cross entropy per chunk.

    python -m benchmarks.bench_reference_model [--batch 32] [--seq 512] [--steps 10] [--device cuda]

The reference: a randomly initialised model of the SmolLM-135M architecture (``bench_model_step.smollm_config``,
vocabulary 49152), float32 parameters under bf16 autocast (CUDA), as ``examples/continued_pretraining.py``
runs it. Also timed: the model's plain forward (what the reference costs at least). Median and p10/p90 of
``--steps`` calls after 2 untimed ones, device events on CUDA. Both variants' outputs are compared (max
absolute difference printed).
"""
import argparse
import statistics

import torch
from torch import nn

import cggr
from cggr import reference as reference_module

from .bench_model_step import smollm_config


def transposed_nll(model, input_ids):
    """The former computation: one chunk of rows, logits transposed to [B, V, T-1]."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")


def flattened_nll(model, input_ids):
    """The forward per chunk of rows, the cross entropy flattened to [B * (T-1), V]."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                       reduction="none").view(targets.shape)


def timed(fn, steps, device):
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[0], q[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    import transformers as tf

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(smollm_config(tiny=False)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    reference = cggr.ReferenceModel(model)
    step = max(1, reference_module.LOGITS_CHUNK_BYTES // (args.seq * model.config.vocab_size * 4))

    def per_chunk(nll):
        return lambda: torch.cat([nll(model, ids[i:i + step]) for i in range(0, args.batch, step)])

    old = per_chunk(transposed_nll)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    with torch.no_grad(), autocast:
        diff = float((old() - reference(ids)).abs().max())
        for name, fn in (("ReferenceModel: layers once, head + flattened CE per chunk", lambda: reference(ids)),
                         ("the same, token_stride=8 (what ExcessLossRows() reads)",
                          lambda: reference(ids, token_stride=8)),
                         ("forward per chunk, flattened CE", per_chunk(flattened_nll)),
                         ("forward per chunk, [B, V, T] CE (until 2026-12-06)", old),
                         ("plain forward of the batch (logits only)", lambda: model(input_ids=ids).logits)):
            rows.append((name, *timed(fn, args.steps, device)))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"reference NLL of {args.batch} x {args.seq} tokens, SmolLM-135M shape, {dev}, chunks of {step} rows; "
          f"max |difference| {diff:.2e}")
    print("| computation | median ms | p10-p90 ms |\n|---|---|---|")
    for name, med, lo, hi in rows:
        print(f"| {name} | {med:.1f} | {lo:.1f}-{hi:.1f} |")


if __name__ == "__main__":
    main()
