"""Arguments of ``cggr bench`` and the function that runs it.

Every setting is declared once, in ``cggr.bench.settings.Settings``: a flag ``--some-name`` fills the field
``some_name`` and takes its default from there (``DEFAULTS``); flags that are not settings are listed in
``CLI_ONLY``, fields that flags do not set one to one in ``DERIVED`` (``tests/test_bench_cli.py`` checks
both ways). Importing this module needs only the standard library and the package's settings module.
"""
import argparse
import dataclasses
import os
import time

from .settings import (CLOCKS, COMPILE_MODES, DATA_PARALLEL, DTYPES, EMBEDDED_DIR, FORWARD_IMPLS, PRESET_NAMES,
                       REGIMES, Settings)

DEFAULTS = Settings()
# Flags that are not settings of a run: what to do, where the data is, how to tokenize it.
CLI_ONLY = ("report_only", "max_wall", "corpus", "tokenizer", "doc_chars", "val_frac", "test_frac", "prepare_only",
            "time_budget", "token_budget", "model")
# Settings fields that no flag sets one to one: computed in settings_from_args.
DERIVED = ("regime", "configs", "budget_kind", "budget", "eval_every", "eval_batch_size", "model_path", "device",
           "dtype", "world_size")


def add_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("what to run")
    g.add_argument("--regime", nargs="+", choices=REGIMES, default=[DEFAULTS.regime],
                   help="pretrain: from scratch on every source; finetune: stage 1 on all sources but "
                        "--finetune-source, then train on it; target: mixed pool, goal --target-source, with a "
                        "reference model (RHO-LOSS setting)")
    g.add_argument("--configs", nargs="+", default=None,
                   help="default: each regime's default list (docs/bench.md, 'Configurations'; e.g. pretrain: "
                        "standard random cggr_hardest cggr_half_hardest source_baseline row_baseline cggr_loss)")
    g.add_argument("--ratios", nargs="+", type=float, default=DEFAULTS.ratios, help="kept fraction of rows/tokens")
    g.add_argument("--seeds", nargs="+", type=int, default=DEFAULTS.seeds,
                   help="one run of every configuration per seed (data order, initialisation, random rows)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--time-budget", type=float, default=None,
                        help="training seconds per configuration (default 20 when no --token-budget); the LR "
                             "schedule runs on training time")
    budget.add_argument("--token-budget", type=float, default=None,
                        help="tokens per configuration (deterministic); the LR schedule runs on tokens")
    g.add_argument("--eval-every", type=float, default=None,
                   help="evaluation interval in the budget's unit (seconds or tokens); default budget / 10")
    g.add_argument("--init-budget", type=float, default=DEFAULTS.init_budget,
                   help="finetune stage-1 budget in the budget's unit (default: the per-configuration budget)")
    g.add_argument("--reference-budget", type=float, default=DEFAULTS.reference_budget,
                   help="target-regime reference model budget in the budget's unit (default: the budget)")
    g.add_argument("--out", default=DEFAULTS.out, help="output folder (runs/, summary.md, results.json, "
                                                      "curves.csv, val_loss_<regime>.png)")
    g.add_argument("--report-only", action="store_true", help="rewrite the reports from OUT/runs and exit")
    g.add_argument("--max-wall", type=float, default=None,
                   help="seconds this invocation may take: runs that would end later are left for the next "
                        "identical invocation (finished runs in OUT are reused), e.g. under a 10-minute job limit")

    g = p.add_argument_group("data")
    g.add_argument("--corpus", nargs="+", default=[EMBEDDED_DIR],
                   help="folders / .txt / .txt.gz files (one source per file), or one prepared .npz token file; "
                        "default: the small embedded corpus")
    g.add_argument("--tokenizer", default=None,
                   help="'bytes', a folder with vocab.json + merges.txt (GPT-2 BPE) or tokenizer.json; "
                        "default: the --model folder if given, else 'bytes'")
    g.add_argument("--cache-dir", default=DEFAULTS.cache_dir,
                   help="tokenized corpora, finetune stage-1 checkpoints and reference-model NLL")
    g.add_argument("--doc-chars", type=int, default=2000, help="minimum characters per document")
    g.add_argument("--val-frac", type=float, default=0.05, help="fraction of each source's documents for validation")
    g.add_argument("--test-frac", type=float, default=0.05, help="fraction of each source's documents for the test")
    g.add_argument("--prepare-only", action="store_true", help="tokenize, print the token file path, exit")
    g.add_argument("--finetune-source", default=DEFAULTS.finetune_source,
                   help="finetune: the source held out of stage 1 and trained on after it")
    g.add_argument("--target-source", default=DEFAULTS.target_source,
                   help="target: the goal domain (its validation loss is the headline)")
    g.add_argument("--reference-frac", type=float, default=DEFAULTS.reference_frac,
                   help="fraction of the target's training documents held out for the reference model")

    g = p.add_argument_group("model and training")
    g.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder to start from")
    g.add_argument("--model-preset", choices=sorted(PRESET_NAMES), default=DEFAULTS.model_preset,
                   help="the Llama size to train from scratch when no --model is given")
    g.add_argument("--init-checkpoint", default=DEFAULTS.init_checkpoint,
                   help="finetune: stage-1 model folder (CACHE/init/... of an earlier run, or any HF causal LM); "
                        "skips stage 1")
    g.add_argument("--reference-holdout-frac", type=float, default=DEFAULTS.reference_holdout_frac,
                   help="fraction of the reference's clean documents it never trains on; its NLL on them sets "
                        "the domain threshold of reference_filter")
    g.add_argument("--reference-preset", choices=sorted(PRESET_NAMES), default=DEFAULTS.reference_preset,
                   help="target: the size of the reference model trained on the clean target slice")
    g.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per training row (targets)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="rows per batch, before selection (every configuration sees the same batches)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--eval-rows", type=int, default=DEFAULTS.eval_rows, help="validation/test rows per source")
    g.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    g.add_argument("--warmup-frac", type=float, default=DEFAULTS.warmup_frac, help="LR warm-up, fraction of the budget")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="bf16 = autocast over float32 weights; bf16-weights = model and optimizer state in "
                        "bfloat16, no autocast (fewer kernels a step); default: bf16 on cuda, fp32 on cpu")
    g.add_argument("--router-layers", type=int, default=DEFAULTS.router_layers,
                   help="CGGRModel router depth (capped at the model's layers - 1)")
    g.add_argument("--selection-warmup-steps", type=int, default=DEFAULTS.selection_warmup_steps,
                   help="curriculum from ratio 1 down to the ratio over this many steps, for every selective "
                        "configuration (0: the ratio from the first step)")
    g.add_argument("--compile", nargs="?", const="blocks", default=DEFAULTS.compile, choices=COMPILE_MODES,
                   help="torch.compile every decoder block in place (inductor, static shapes), for every "
                        "configuration alike, graphs compiled before the clock starts (needs a fixed row "
                        "count: --selection-warmup-steps 0); blocks-cudagraphs also replays each block as a "
                        "CUDA graph (reduce-overhead). Default: eager")
    g.add_argument("--clock", choices=CLOCKS, default=DEFAULTS.clock,
                   help="step: a device synchronisation around every timed step (each step timed from an idle "
                        "GPU); span: synchronise only at evaluations, so the host issues the next step while "
                        "the GPU runs this one, as a loop that does not read its loss every step")
    g.add_argument("--data-parallel", choices=DATA_PARALLEL, default=DEFAULTS.data_parallel,
                   help="under torchrun --nproc-per-node N (each rank trains batch-size / N rows of every batch, "
                        "gradients averaged): the selective configurations choose per_rank (each among its own "
                        "rows) or global (over the whole batch, as one process would: cggr.DataParallel)")
    g.add_argument("--forward-impl", choices=FORWARD_IMPLS, default=DEFAULTS.forward_impl,
                   help="how every training of the bench runs the model (standard and selective alike): model = "
                        "its own forward (transformers checks position_ids for packed sequences on the host, a "
                        "synchronisation per call); trunk = the same modules through cggr.router.ModelTrunk "
                        "(CGGRModel forward_impl='trunk'), without it")
    g.add_argument("--untimed-warmup-steps", type=int, default=DEFAULTS.untimed_warmup_steps,
                   help="steps on a throw-away copy before each timed run")


def run(args, parser: argparse.ArgumentParser) -> int:
    from .report import write_reports

    def log(msg):
        print(msg, flush=True)

    started = time.monotonic()  # --max-wall counts from here: data preparation included
    if args.report_only:
        for name, path in write_reports(args.out, log).items():
            log(f"report: {name}: {path}")
        return 0
    from .parallel import barrier, init_from_env

    process_group = init_from_env(_default_device(args))  # torchrun: several processes (else None)
    leader = process_group is None or process_group.rank == 0
    if not leader:
        log = _silent
        barrier(process_group)  # rank 0 prepares (and caches) the corpus first
    settings, corpus = settings_from_args(args, parser, log)
    if leader:
        barrier(process_group)
    if settings is None:  # --prepare-only
        return 0
    from .runner import Bench

    deadline = None if args.max_wall is None else started + args.max_wall
    left = 0
    for regime in args.regime:
        s = settings(regime)
        bench = Bench(s, corpus, log, process_group)
        log(f"== {regime}: {len(list(bench.plan()))} runs, {len(bench.train_rows)} training rows of "
            f"{s.seq_len + 1} tokens, model {bench.model_source.describe()}, settings {bench.hash}")
        written, regime_left = bench.run_all(deadline)
        left += regime_left
        if written and leader:
            for name, path in write_reports(args.out, log).items():
                log(f"report: {name}: {path}")
    log(f"{'INCOMPLETE: ' + str(left) + ' runs left (same command again to continue)' if left else 'done'} "
        f"in {time.monotonic() - started:.0f} s")
    return 0


def _silent(msg):
    pass


def _default_device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def settings_from_args(args, parser, log):
    import torch

    from . import data as D
    from .configs import RENAMED, default_configs
    from .tokenizer import load_tokenizer

    # user errors first, one line each, naming the flag: before any work, and before any output is written
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun (cggr.bench.parallel)
    if args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size}: torchrun started {world_size} processes, and every rank "
                     f"trains an equal share of each batch: use a multiple of {world_size}")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: no such folder (a local Hugging Face causal-LM folder is expected)")
    for path in args.corpus:
        if not os.path.exists(path):
            parser.error(f"--corpus {path}: no such file or folder")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here (torch {torch.__version__}); use "
                     "--device cpu")
    for name in ("time_budget", "token_budget"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    tokenizer_spec = args.tokenizer or (args.model if args.model else "bytes")
    if len(args.corpus) == 1 and args.corpus[0].endswith(".npz"):
        if args.tokenizer:
            parser.error("--tokenizer does not apply to a prepared .npz token file (it records its tokenizer)")
        corpus = D.load_token_file(args.corpus[0])
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
        corpus = D.prepare_corpus(args.corpus, tokenizer, args.cache_dir, args.doc_chars, args.val_frac,
                                  args.test_frac, log=log)
    if args.prepare_only:
        print(corpus.path)
        return None, corpus
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if args.compile == "blocks-cudagraphs" and not device.startswith("cuda"):
        parser.error(f"--compile blocks-cudagraphs replays CUDA graphs: it needs a CUDA device, got --device "
                     f"{device} (use --compile blocks)")
    kind = "tokens" if args.token_budget is not None else "time"
    amount = args.token_budget if args.token_budget is not None else (args.time_budget or 20.0)
    for name, value in (("--eval-every", args.eval_every), ("--init-budget", args.init_budget),
                        ("--reference-budget", args.reference_budget)):
        if value is not None and value <= 0:
            parser.error(f"{name} must be > 0")
    if args.compile and args.selection_warmup_steps:
        parser.error("--compile compiles one graph per row count: the selection curriculum "
                     "(--selection-warmup-steps > 0) would change it every step, compiling inside the clock")
    if not 0 < args.reference_holdout_frac < 1:
        parser.error(f"--reference-holdout-frac must be in (0, 1), got {args.reference_holdout_frac}")
    if not all(0 < r <= 1 for r in args.ratios):
        parser.error("--ratios must be in (0, 1]")

    derived = dict(configs=args.configs, budget_kind=kind, budget=amount, eval_every=args.eval_every or amount / 10,
                   eval_batch_size=args.eval_batch_size or args.batch_size, model_path=args.model, device=device,
                   dtype=dtype, world_size=world_size)
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name not in DERIVED}

    def settings(regime):
        # earlier rounds' names run under today's (RENAMED), so their run files are the same configuration's
        configs = [RENAMED.get(name, name) for name in args.configs] if args.configs else default_configs(regime)
        return Settings(regime=regime, **shared, **{**derived, "configs": list(dict.fromkeys(configs))})
    return settings, corpus
