"""One training step of SmolLM-135M (architecture only, random weights): standard vs CGGRModel.

    python benchmarks/bench_model_step.py --out OUT_DIR [--batch 32] [--seq 1024] [--steps 20]
        [--ratios 0.25 0.5] [--variants standard cggr random v050] [--compile none all]
        [--loss-impl model fused] [--router-layers 4] [--router-chunk-size ROWS] [--compile-mode MODE]
        [--dynamic-threshold] [--device cuda] [--tiny]

Model: LlamaConfig(hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
embeddings, max_position_embeddings 2048), SDPA attention, bf16 parameters, built from the config (no
download), the same initial weights for every variant. Optimizer: torch.optim.AdamW(fused=True).
A step = forward + backward + optimizer.step() + zero_grad (+ cggr.step()). Batches: uniform random
token ids (labels = input_ids), a few pre-generated ones cycled.

Variants (each ratio in --ratios, each compile scope in --compile, each loss_impl in --loss-impl):
  standard        model(input_ids, labels=labels).loss (compile: torch.compile(model) for model/all)
  cggr@R          cggr.CGGRModel(policy=HardestRows(scoring, RouterSettings(layers=--router-layers,
                  chunk_size=--router-chunk-size)), schedule=RatioSchedule(R, 0, dynamic_threshold=False unless
                  --dynamic-threshold), step_options=StepOptions(compile, loss_impl, ...)): ceil(R * B) rows
  excess@R        CGGRModel(policy=ExcessLossRows()): the default with a reference (1-block router scoring
                  every 8th position, excess loss against a fixed random reference NLL)
  random@R        CGGRModel(policy=RandomRows()): the same ceil(R * B) rows drawn uniformly, no router:
                  the cost of the row split alone
  v050@R          cggr==0.5.0's CGGRModel (create_truncated_router(model, num_layers=4),
                  warmup_steps=0, dynamic_threshold=True) when benchmarks.comparators can load it; its
                  own row count (reported) follows its dynamic threshold
Compile scopes: none, router, model, all (torch.compile of the router trunk / the trained forward), blocks and
blocks-cudagraphs (StepOptions(compile=...): every decoder block compiled in place, with CUDA graphs; the
standard step then runs the same compiled blocks). Dynamo is reset before each variant.
Timing: CUDA events around each step after --warmup steps (compiled variants: compilation happens in the
warm-up; its time is reported as first_step_s), median (and p10/p90) of --steps steps. Router share: a
few extra steps of a second CGGRModel over the same model and optimizer with
StepOptions(collect_timing=True) (after --compile-warmup untimed steps when compiled): (router + selection)
/ (forward start .. step()).
Peak memory: torch.cuda.max_memory_allocated() over the timed steps (weights and optimizer state
included). tokens/s: batch tokens (B * T) per second of step time. If the standard step at the requested
batch runs out of memory, every variant runs at half the batch (reported).

Prints a markdown table and writes OUT_DIR/model_step.json. --tiny (with --device cpu) is a smoke test
of this script on a 2-layer model.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers as tf

# run as a script (python benchmarks/bench_model_step.py): the repository root holds `benchmarks` and `cggr`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.comparators import load_cggr_v050  # noqa: E402
from cggr import (CGGRModel, ExcessLossRows, HardestRows, RandomRows, RatioSchedule, RouterSettings,  # noqa: E402
                  StepOptions)
from cggr.compile_blocks import begin_graph_step, compile_decoder_blocks  # noqa: E402
from cggr.options import BLOCK_SCOPES  # noqa: E402
from cggr.rows import rows_for_ratio  # noqa: E402

GOAL_VS_STANDARD = 2.5
GOAL_VS_V050 = 1.5


def smollm_config(tiny: bool):
    if tiny:
        return tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    # use_cache=False: a training step, no KV cache built in any variant
    return tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                          attn_implementation="sdpa", use_cache=False)


class Timer:
    """Per-step wall time on the device: CUDA events (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pairs = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pairs.append((start, ev))
        else:
            self.pairs.append((start, time.perf_counter()))

    def times_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [(b - a) * 1e3 for a, b in self.pairs]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_model(config, init_state, device, dtype):
    with torch.device(device):
        model = tf.LlamaForCausalLM(config)
    model.to(dtype)
    model.load_state_dict(init_state)
    model.train()
    return model


def cggr_wrapper(model, spec, args, collect_timing=False):
    """CGGRModel of a cggr / random variant (module docstring)."""
    kind, ratio, scope, loss_impl = spec["kind"], spec["ratio"], spec["compile"], spec["loss_impl"]
    if kind == "excess":  # the default with a reference: 1-block router, every 8th position
        policy = ExcessLossRows()
    elif kind == "cggr":
        policy = HardestRows(scoring=args.scoring,
                             router=RouterSettings(layers=args.router_layers, chunk_size=args.router_chunk_size))
    else:
        policy = RandomRows()
    schedule = RatioSchedule(ratio, 0, dynamic_threshold=args.dynamic_threshold and kind == "cggr")
    if collect_timing and scope in BLOCK_SCOPES:
        scope = "none"  # the blocks are compiled in place already: a second compilation would only re-trace
    options = StepOptions(compile=False if scope == "none" else scope, compile_options=args.compile_options,
                          loss_impl=loss_impl, token_ratio=args.token_ratio if loss_impl == "fused" else 1.0,
                          loss_chunk_size=args.loss_chunk_size, collect_timing=collect_timing)
    return CGGRModel(model, policy=policy, schedule=schedule, step_options=options)


def cggr_step_fn(wrapper, opt, reference=None):
    kwargs = {} if reference is None else {"reference_nll": reference}

    def step(ids, labels):
        begin_graph_step()  # CGGRModel marks its own calls; this covers the timing wrapper built with compile off
        loss = wrapper(ids, labels=labels, **kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wrapper.step()
        return loss
    return step


def build_variant(spec, config, init_state, args, device, dtype, v050):
    """Returns (step_fn, cggr_wrapper_or_None, model, info)."""
    model = fresh_model(config, init_state, device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    kind, ratio, scope = spec["kind"], spec["ratio"], spec["compile"]
    info = {}
    wrapper = None
    if kind == "standard":
        fwd = torch.compile(model, **args.compile_options) if scope in ("model", "all") else model
        if scope in BLOCK_SCOPES:
            compile_decoder_blocks(model, cuda_graphs=scope == "blocks-cudagraphs", **args.compile_options)

        def step(ids, labels):
            begin_graph_step()
            loss = fwd(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    elif kind in ("cggr", "random", "excess"):
        wrapper = cggr_wrapper(model, spec, args)
        step = cggr_step_fn(wrapper, opt, reference_for(spec, args, device))
    elif kind == "v050":
        wrapper = v050.CGGRModel(model, router=v050.create_truncated_router(model, num_layers=args.router_layers),
                                 min_tokens_ratio=ratio, warmup_steps=0, dynamic_threshold=True)
        has_step = callable(getattr(wrapper, "step", None))
        info["v050_step_called"] = has_step

        def step(ids, labels):
            loss = wrapper(ids, labels=labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if has_step:
                wrapper.step()
            return loss
    else:
        raise ValueError(f"unknown variant kind {kind!r}")
    return step, wrapper, model, opt, info


def reference_for(spec, args, device):
    """A fixed [B, T-1] reference NLL for the excess variant (its values do not change the step's cost)."""
    if spec["kind"] != "excess":
        return None
    g = torch.Generator(device=device).manual_seed(2)
    return 10.0 * torch.rand(spec["batch"], args.seq - 1, device=device, generator=g)


def run_variant(spec, config, init_state, batches, args, device, dtype, v050):
    torch._dynamo.reset()  # each variant compiles from scratch: first_step_s is its own compile time
    spec = dict(spec, batch=batches[0][0].shape[0])
    step, wrapper, model, opt, info = build_variant(spec, config, init_state, args, device, dtype, v050)
    B = batches[0][0].shape[0]
    warmup = args.warmup + (args.compile_warmup if spec["compile"] != "none" else 0)
    t0 = time.perf_counter()
    step(*batches[0])
    sync(device)
    first_step_s = time.perf_counter() - t0
    for i in range(1, warmup):
        step(*batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = Timer(device)
    for i in range(args.steps):
        start = timer.start()
        step(*batches[i % len(batches)])
        timer.stop(start)
    times = sorted(timer.times_ms())
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None

    row = dict(spec, batch=B, seq=batches[0][0].shape[1], first_step_s=round(first_step_s, 3),
               step_ms=statistics.median(times), p10_ms=times[int(0.1 * (len(times) - 1))],
               p90_ms=times[int(0.9 * (len(times) - 1))], peak_gb=peak_gb, **info)
    row["tokens_per_s"] = B * row["seq"] / (row["step_ms"] / 1e3)
    if spec["kind"] in ("cggr", "random", "excess"):
        m = wrapper.get_metrics()
        row["rows"] = m["sequences_selected"]
        row["tokens_trained"] = m["tokens_selected"]
        if args.router_share_steps > 0:
            # StepOptions are fixed at construction: a second wrapper with timing on, over the same model and
            # optimizer (its synchronisation in step() stays out of the timed steps above)
            timed = cggr_wrapper(model, spec, args, collect_timing=True)
            timed_step = cggr_step_fn(timed, opt, reference_for(spec, args, device))
            for i in range(args.compile_warmup if spec["compile"] != "none" else 0):
                timed_step(*batches[i % len(batches)])
            shares = []
            for i in range(args.router_share_steps):
                timed_step(*batches[i % len(batches)])
                shares.append(timed.get_metrics()["router_time_share"])
            row["router_share"] = statistics.median(shares)
            del timed, timed_step
    elif spec["kind"] == "v050":
        m = wrapper.get_metrics()
        row["rows"] = m.get("sequences_selected")
        row["tokens_trained"] = m.get("tokens_selected")
    else:
        row["rows"] = B
        row["tokens_trained"] = B * (row["seq"] - 1)
    del step, wrapper, model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def variant_specs(args, v050):
    specs = []
    for scope in args.compile:
        if "standard" in args.variants and scope in ("none", "model", "all") + BLOCK_SCOPES:
            specs.append({"kind": "standard", "ratio": 1.0, "compile": scope, "loss_impl": "model"})
    for ratio in args.ratios:
        for scope in args.compile:
            for loss_impl in args.loss_impl:
                if "cggr" in args.variants:
                    specs.append({"kind": "cggr", "ratio": ratio, "compile": scope, "loss_impl": loss_impl})
                if "excess" in args.variants:
                    specs.append({"kind": "excess", "ratio": ratio, "compile": scope, "loss_impl": loss_impl})
                if "random" in args.variants and scope != "router":
                    specs.append({"kind": "random", "ratio": ratio, "compile": scope, "loss_impl": loss_impl})
    # The comparator runs last: if it fails on this transformers/torch, our numbers are already written.
    if "v050" in args.variants and v050 is not None:
        for ratio in args.ratios:
            specs.append({"kind": "v050", "ratio": ratio, "compile": "none", "loss_impl": "model"})
    return specs


def name_of(row):
    name = row["kind"] if row["kind"] == "standard" else f"{row['kind']}@{row['ratio']}"
    extras = []
    if row["compile"] != "none":
        extras.append(f"compile={row['compile']}")
    if row["loss_impl"] != "model":
        extras.append(f"loss={row['loss_impl']}")
    return name + (f" [{', '.join(extras)}]" if extras else "")


def fmt(x, spec, unit=""):
    return "-" if x is None else format(x, spec) + unit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for model_step.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    p.add_argument("--compile-warmup", type=int, default=3, help="extra untimed steps for compiled variants")
    p.add_argument("--router-share-steps", type=int, default=5,
                   help="extra steps with StepOptions(collect_timing=True)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--variants", nargs="+", default=["standard", "cggr", "random", "v050"],
                   choices=["standard", "cggr", "random", "excess", "v050"])
    p.add_argument("--compile", nargs="+", default=["none"], choices=["none", "router", "model", "all"] + list(BLOCK_SCOPES),
                   help="compile scopes to run (each variant once per scope; standard: model/all/blocks* only); "
                        "blocks-cudagraphs is StepOptions(compile='blocks-cudagraphs'), the fast step")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--loss-impl", nargs="+", default=["model"], choices=["model", "fused"])
    p.add_argument("--token-ratio", type=float, default=1.0, help="StepOptions.token_ratio (loss-impl fused)")
    p.add_argument("--router-layers", type=int, default=4)
    p.add_argument("--router-chunk-size", type=int, default=None,
                   help="rows per router scoring chunk (RouterSettings.chunk_size)")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="chunk rows of loss-impl fused")
    p.add_argument("--scoring", default="loss", choices=["entropy", "margin", "loss", "combined"],
                   help="HardestRows(scoring=...) of the cggr variant")
    p.add_argument("--dynamic-threshold", action="store_true",
                   help="RatioSchedule(dynamic_threshold=True) for the cggr variant")
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer smoke configuration (CPU ok)")
    p.add_argument("--no-fallback", action="store_true", help="do not halve the batch on OOM")
    args = p.parse_args(argv)
    args.compile_options = {"mode": args.compile_mode} if args.compile_mode else {}

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible (use --device cpu --tiny for a smoke run)")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    config = smollm_config(args.tiny)
    if args.tiny and args.router_layers >= config.num_hidden_layers:
        args.router_layers = 2
    with torch.device(device):
        base = tf.LlamaForCausalLM(config)
    base.to(dtype)
    init_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    n_params = sum(p.numel() for p in base.parameters())
    del base
    v050 = load_cggr_v050() if "v050" in args.variants else None
    specs = variant_specs(args, v050)

    def make_batches(B):
        g = torch.Generator(device=device).manual_seed(1)
        out = []
        for _ in range(args.num_batches):
            ids = torch.randint(0, config.vocab_size, (B, args.seq), device=device, generator=g)
            out.append((ids, ids.clone()))
        return out

    batch = args.batch
    rows = []
    fallback_note = None
    i = 0
    batches = make_batches(batch)
    while i < len(specs):
        spec = specs[i]
        try:
            row = run_variant(spec, config, init_state, batches, args, device, dtype, v050)
        except torch.cuda.OutOfMemoryError:
            if args.no_fallback or rows or spec["kind"] != "standard" or batch <= 1:
                raise
            # The standard step decides the batch for every variant (same work for all of them).
            gc.collect()
            torch.cuda.empty_cache()
            fallback_note = f"standard step ran out of memory at batch {batch}; every variant uses {batch // 2}"
            print(f"[bench_model_step] {fallback_note}", file=sys.stderr)
            batch //= 2
            batches = make_batches(batch)
            continue
        rows.append(row)
        print(f"[bench_model_step] {name_of(row)}: {row['step_ms']:.2f} ms (rows {row.get('rows')})",
              file=sys.stderr, flush=True)
        write_json(args, rows, batch, fallback_note, n_params)  # partial results survive a later failure
        i += 1

    header = write_json(args, rows, batch, fallback_note, n_params)
    print(f"\n{header}")
    if fallback_note:
        print(f"note: {fallback_note}")
    print("\n| variant | rows | step ms (p10-p90) | vs standard | vs standard, same compile | vs cggr 0.5.0 "
          "| router share | tokens/s | peak GB | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r.get('rows')}/{r['batch']} | {r['step_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) "
              f"| {fmt(r['speedup_vs_standard'], '.2f', 'x')} | {fmt(r['speedup_vs_standard_same_compile'], '.2f', 'x')} "
              f"| {fmt(r['speedup_vs_v050'], '.2f', 'x')} "
              f"| {fmt(r.get('router_share'), '.1%')} | {r['tokens_per_s']:,.0f} | {fmt(r['peak_gb'], '.2f')} "
              f"| {r['first_step_s']:.1f} |")
    if v050 is None and "v050" in args.variants:
        print("\ncggr 0.5.0: not available (see benchmarks/comparators.py); no comparison")

    goals = []
    for r in rows:
        if r["kind"] in ("cggr", "excess") and r["ratio"] == 0.25 and r["speedup_vs_standard"] is not None:
            goals.append(f"{r['name']}: {fmt(r['speedup_vs_standard'], '.2f')}x vs eager standard "
                         f"(goal >= {GOAL_VS_STANDARD}x: {'met' if (r['speedup_vs_standard'] or 0) >= GOAL_VS_STANDARD else 'NOT met'})"
                         + ("" if r["speedup_vs_v050"] is None else
                            f", {r['speedup_vs_v050']:.2f}x vs cggr 0.5.0 (goal >= {GOAL_VS_V050}x: "
                            f"{'met' if r['speedup_vs_v050'] >= GOAL_VS_V050 else 'NOT met'})"))
    if goals:
        print("\n" + "\n".join(goals))

    print(f"\nwrote {os.path.join(args.out, 'model_step.json')}")


def write_json(args, rows, batch, fallback_note, n_params):
    """Fill in the derived columns of every row so far and (re)write OUT/model_step.json; returns the header."""
    standard = {r["compile"]: r for r in rows if r["kind"] == "standard"}
    eager_standard = standard.get("none")
    v050_rows = {r["ratio"]: r for r in rows if r["kind"] == "v050"}
    for r in rows:
        r["name"] = name_of(r)
        r["speedup_vs_standard"] = eager_standard["step_ms"] / r["step_ms"] if eager_standard else None
        same = standard.get(r["compile"]) or standard.get("model" if r["compile"] == "all" else None)
        r["speedup_vs_standard_same_compile"] = same["step_ms"] / r["step_ms"] if same else None
        ref = v050_rows.get(r["ratio"])
        r["speedup_vs_v050"] = ref["step_ms"] / r["step_ms"] if ref and r["kind"] == "cggr" else None
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"SmolLM-135M architecture ({n_params / 1e6:.1f}M params{', TINY' if args.tiny else ''}), bf16, "
              f"batch {batch} x {args.seq}, AdamW(fused), {device_name}, torch {torch.__version__}, "
              f"transformers {tf.__version__}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_step.json"), "w") as f:
        json.dump({"header": header, "device": device_name, "torch": torch.__version__,
                   "transformers": tf.__version__, "params": n_params, "batch": batch, "seq": args.seq,
                   "requested_batch": args.batch, "fallback": fallback_note, "args": {
                       k: v for k, v in vars(args).items() if k != "compile_options"},
                   "expected_rows": {str(r): rows_for_ratio(r, batch) for r in args.ratios},
                   "results": rows}, f, indent=1)
    return header


if __name__ == "__main__":
    main()
