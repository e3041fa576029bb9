"""The three regimes: which rows train, which rows evaluate, and what is prepared once per seed.

- ``pretrain``: from the initial model (a preset from scratch, or ``--model``) on the train split of
  every source; the headline metric is the mean validation loss over sources (each source weighs the same).
- ``finetune``: stage 1 trains the initial model with the ``standard`` recipe on every source but
  ``--finetune-source`` (its own budget, ``--init-budget``), saved under ``CACHE/init/``; or
  ``--init-checkpoint`` names such a folder from an earlier run (any Hugging Face causal-LM folder). Every configuration then starts from
  that checkpoint and trains on the held-out source's train split for as many passes as its budget
  allows; the headline metric is the held-out source's validation loss (the others show forgetting).
- ``target``: the goal is one domain (``--target-source``). A fixed ``--reference-frac`` of that
  domain's training documents is held out as a clean slice; a small reference model
  (``--reference-preset``) is trained on it with the standard recipe, and its per-token NLL over the
  whole training pool (every other source plus the rest of the target domain) is computed once (the
  RHO-LOSS / Rho-1 setting; rows get the mean). Configurations train on the pool; the headline metric
  is the target domain's validation loss.

Every run writes ``OUT/runs/<regime>__<config>__r<ratio>__s<seed>.json`` as soon as it ends; a later
invocation with the same ``--out`` and the same settings reuses finished runs, and one with the same
``--cache-dir`` and settings reuses the stage-1 checkpoint (``CACHE/init/<settings>-s<seed>``) and the
reference NLL (``CACHE/reference/``), so a long benchmark can be split over several commands. Those two
live in the cache folder, not in OUT, because they are large (a 135M-parameter checkpoint is 0.5 GB). Settings that
differ from the runs already in ``OUT`` are an error, never silently mixed.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .parallel import agree, barrier, local_device
from . import data as D
from .configs import StepContext, get_config, router_depth
from .report import read_run_file
from .settings import DTYPES, REGIMES, Settings, settings_hash  # noqa: F401  (Settings: the runner's input)
from .models import ModelSource, build_preset, check_vocab, load_checkpoint, quiet_transformers
from .train import Budget, Evaluator, OptimConfig, token_nll, train
from ..experimental import otsu_threshold
from ..reference import domain_threshold





def autocast_for(device: torch.device, dtype: str):
    if dtype in ("fp32", "bf16-weights"):
        return contextlib.nullcontext
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")


def weights_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16-weights" else torch.float32


@contextlib.contextmanager
def cache_lock(path: str):
    """Exclusive lock on ``path + '.lock'``: benchmark processes sharing ``--cache-dir`` (one per GPU, say)
    then train a seed's stage-1 checkpoint or reference model once; the others wait and reuse it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_name(regime, config, ratio, seed) -> str:
    return f"{regime}__{config}__r{'full' if ratio is None else f'{ratio:g}'}__s{seed}"


class Bench:
    def __init__(self, settings: Settings, corpus: D.Corpus, log=print, process_group=None):
        """``process_group``: a ``cggr.bench.parallel.ProcessGroupInfo`` (torchrun) or None. Every rank
        runs every run; rank 0 writes the run files."""
        s = self.s = settings
        self.process_group = process_group
        self.leader = process_group is None or process_group.rank == 0
        if s.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {s.regime!r}")
        self.corpus, self.log = corpus, log
        self.device = torch.device(local_device(s.device, process_group))
        self.autocast = autocast_for(self.device, s.dtype)
        self.weights_dtype = weights_dtype(s.dtype)
        self.fields = s.key_fields(corpus.path)
        self.hash = settings_hash(self.fields)
        self.row_len = s.seq_len + 1
        self.optim = OptimConfig(lr=s.lr, warmup_frac=s.warmup_frac)
        self.budget = Budget(s.budget_kind, s.budget, s.eval_every)
        self.model_source = ModelSource(s.model_preset, s.model_path, corpus.vocab_size, self.row_len, corpus.eot_id)
        self.configs = {name: get_config(name) for name in s.configs}
        for name, c in self.configs.items():
            if s.regime not in c.regimes:
                raise ValueError(f"configuration {name!r} is not defined for regime {s.regime!r} "
                                 f"(only {c.regimes})")
        for name in (s.finetune_source if s.regime == "finetune" else None,
                     s.target_source if s.regime == "target" else None):
            if name is not None and name not in corpus.sources:
                raise ValueError(f"source {name!r} is not in the corpus ({corpus.sources})")
        self.val = Evaluator(D.eval_rows(corpus, "val", self.row_len, s.eval_rows), s.eval_batch_size,
                             self.device, self.autocast)
        self.primary = {"pretrain": None, "finetune": s.finetune_source, "target": s.target_source}[s.regime]
        self.train_rows = self._train_rows()
        self.runs_dir = os.path.join(s.out, "runs")
        os.makedirs(self.runs_dir, exist_ok=True)
        self._check_out_dir()

    # -- data of the regime ---------------------------------------------------------------------
    def _train_rows(self) -> D.RowSet:
        s, c = self.s, self.corpus
        if s.regime == "pretrain":
            return D.build_rows(c, "train", c.sources, self.row_len)
        if s.regime == "finetune":
            return D.build_rows(c, "train", [s.finetune_source], self.row_len)
        _, pool_part = D.split_documents_of_stream(c, s.target_source, "train", s.reference_frac)
        others = [n for n in c.sources if n != s.target_source]
        return D.concat_rows([D.build_rows(c, "train", others, self.row_len),
                              D.rows_from_tokens(pool_part, c.sources.index(s.target_source), c.sources,
                                                 self.row_len)])

    def train_source_share(self) -> Dict[str, float]:
        """Fraction of the training rows from each source: the data mix the report weighs losses by."""
        counts = np.bincount(self.train_rows.source_ids, minlength=len(self.corpus.sources))
        return {name: float(c) / len(self.train_rows) for name, c in zip(self.corpus.sources, counts) if c}

    def _check_out_dir(self):
        for name in sorted(os.listdir(self.runs_dir)):
            if not name.startswith(self.s.regime + "__") or not name.endswith(".json"):
                continue
            other = read_run_file(os.path.join(self.runs_dir, name))["settings_hash"]
            if other != self.hash:
                raise ValueError(f"{self.runs_dir}/{name} was run with other settings (hash {other}, now "
                                 f"{self.hash}); use another --out, or the same settings to add runs")

    # -- per-seed preparations --------------------------------------------------------------------
    def _sub_budget(self, amount: Optional[float]) -> Budget:
        amount = self.s.budget if amount is None else amount
        return Budget(self.s.budget_kind, amount, amount / 4)

    def _finetune_init(self, seed: int) -> str:
        """Path of the stage-1 checkpoint for this seed: given, saved by an earlier run, or trained now."""
        if self.s.init_checkpoint:
            return self.s.init_checkpoint
        path = os.path.join(self.s.cache_dir, "init", f"{self.hash}-s{seed}")
        with cache_lock(path):
            if os.path.exists(os.path.join(path, "config.json")):
                self.log(f"finetune: stage 1 checkpoint {path} (reused)")
                return path
            return self._train_finetune_init(seed, path)

    def _train_finetune_init(self, seed: int, path: str) -> str:
        c = self.corpus
        others = [n for n in c.sources if n != self.s.finetune_source]
        rows = D.build_rows(c, "train", others, self.row_len)
        model = self.model_source.make(seed, self.device).to(self.weights_dtype)
        check_vocab(model, c.vocab_size)
        self.log(f"finetune: stage 1, standard recipe on {others}, {self.s.budget_kind} budget "
                 f"{self._sub_budget(self.s.init_budget).amount:g}")
        result = train(model, get_config("standard").build, None, StepContext(seed, forward_impl=self.s.forward_impl),
                       rows, self.val, self._sub_budget(self.s.init_budget), self.optim, self.s.batch_size, self.device,
                       self.autocast, self.s.untimed_warmup_steps, label=f"stage1 s{seed}", log=self.log,
                       compile_blocks=self.s.compile, clock=self.s.clock)
        tmp = path + ".tmp"
        with quiet_transformers():
            model.save_pretrained(tmp)
        with open(os.path.join(tmp, "bench_stage1.json"), "w") as f:
            json.dump({"seed": seed, "sources": others, "steps": result.steps, "tokens": result.tokens,
                       "train_time": result.train_time, "val": result.final_val}, f, indent=1)
        os.replace(tmp, path)
        return path

    def _reference(self, seed: int) -> Dict:
        """Reference model on the clean target slice; its per-token NLL over the pool, computed once."""
        path = os.path.join(self.s.cache_dir, "reference", f"{self.hash}-s{seed}.npy")
        with cache_lock(path):
            info, nll = self._load_or_train_reference(seed, path)
        if nll.shape != (len(self.train_rows), self.s.seq_len):
            raise ValueError(f"{path}: reference NLL of shape {nll.shape}, expected "
                             f"{(len(self.train_rows), self.s.seq_len)}")
        info["nll"] = torch.from_numpy(nll).to(self.device)
        info["row_nll"] = nll.mean(axis=1)
        info["thresholds"] = {"heldout": domain_threshold(info["heldout_row_nll"], recall=0.95),
                              "heldout99": domain_threshold(info["heldout_row_nll"], recall=0.99),
                              "otsu": otsu_threshold(info["row_nll"])}
        info["domain_filter"] = {name: self._domain_filter_report(info["row_nll"], t)
                                 for name, t in info["thresholds"].items()}
        return info

    def _domain_filter_report(self, row_nll: np.ndarray, threshold: float) -> Dict:
        """How well a threshold of ``reference_filter`` separates the target domain in the pool (the labels
        are read here for the report only; no configuration sees these numbers)."""
        below = row_nll <= threshold
        is_target = self.train_rows.source_ids == self.corpus.sources.index(self.s.target_source)
        hits = int((below & is_target).sum())
        return {"threshold": threshold, "pool_share_below": float(below.mean()),
                "target_share_of_pool": float(is_target.mean()),
                "target_recall": hits / max(1, int(is_target.sum())), "precision": hits / max(1, int(below.sum()))}

    def _load_or_train_reference(self, seed: int, path: str):
        info_path = path[:-4] + ".json"
        if os.path.exists(path):
            self.log(f"target: reference NLL {path} (reused)")
            with open(info_path) as f:
                info = json.load(f)
            nll = np.load(path)
        else:
            c, s = self.corpus, self.s
            ref_tokens, held_tokens = D.split_reference_slice(c, s.target_source, s.reference_frac,
                                                              s.reference_holdout_frac)
            target_id = c.sources.index(s.target_source)
            rows = D.rows_from_tokens(ref_tokens, target_id, c.sources, self.row_len)
            held = D.rows_from_tokens(held_tokens, target_id, c.sources, self.row_len)
            if len(held) == 0:
                raise ValueError(f"--reference-holdout-frac {s.reference_holdout_frac}: the held-out documents of "
                                 f"{s.target_source} make no full row of {self.row_len} tokens; raise it")
            model = build_preset(s.reference_preset, c.vocab_size, self.row_len, seed, c.eot_id).to(
                self.device, self.weights_dtype)
            self.log(f"target: reference model ({s.reference_preset}) on {len(rows)} clean rows of {s.target_source}")
            result = train(model, get_config("standard").build, None, StepContext(seed, forward_impl=s.forward_impl),
                           rows, self.val, self._sub_budget(s.reference_budget), self.optim, s.batch_size, self.device,
                           self.autocast, s.untimed_warmup_steps, label=f"reference s{seed}", log=self.log,
                           compile_blocks=s.compile, clock=s.clock)
            nll = self._pool_nll(model)
            held_nll = self._rows_nll(model, held.rows).mean(axis=1)
            info = {"preset": s.reference_preset, "rows": len(rows), "steps": result.steps, "tokens": result.tokens,
                    "val": result.final_val, "pool_mean_nll": float(nll.mean()),
                    "heldout_rows": len(held), "heldout_row_nll": [float(v) for v in held_nll]}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(info_path + ".tmp", "w") as f:  # the info first: the .npy marks the pair complete
                json.dump(info, f, indent=1)
            os.replace(info_path + ".tmp", info_path)
            np.save(path[:-4] + ".tmp.npy", nll)
            os.replace(path[:-4] + ".tmp.npy", path)
        return info, nll

    def _pool_nll(self, model) -> np.ndarray:
        return self._rows_nll(model, self.train_rows.rows)

    @torch.no_grad()
    def _rows_nll(self, model, host_rows: np.ndarray) -> np.ndarray:
        """[n, seq_len] per-token NLL of ``model`` over rows of ``seq_len + 1`` tokens (host in, host out)."""
        model.eval()
        out = np.empty((len(host_rows), self.s.seq_len), dtype=np.float32)
        for i in range(0, len(host_rows), self.s.eval_batch_size):
            rows = torch.from_numpy(host_rows[i:i + self.s.eval_batch_size]).to(self.device)
            out[i:i + len(rows)] = token_nll(model, rows, self.autocast).cpu().numpy()
        return out

    # -- the runs ---------------------------------------------------------------------------------
    def plan(self):
        for seed in self.s.seeds:
            for name, c in self.configs.items():
                for ratio in (self.s.ratios if c.uses_ratio else [None]):
                    yield seed, name, ratio

    def run_all(self, deadline: Optional[float] = None):
        """Run what OUT does not hold yet, in plan order; returns (run files, number of runs left).

        With ``deadline`` (a ``time.monotonic()`` value, from ``--max-wall``) a run that would probably end
        after it is not started: it and the runs after it are left for the next identical invocation. The
        estimate is the longest run so far in this invocation, or 1.3 x the time budget + 30 s before the
        first (a token budget has no estimate: the first run always starts), plus a seed's stage-1 or
        reference training when that still has to happen.
        """
        written, plan = [], list(self.plan())
        prepared: Dict[int, dict] = {}
        longest = None
        for i, (seed, name, ratio) in enumerate(plan):
            path = os.path.join(self.runs_dir, run_name(self.s.regime, name, ratio, seed) + ".json")
            if os.path.exists(path):
                self.log(f"{os.path.basename(path)}: done earlier, reused")
                written.append(path)
                continue
            if deadline is not None:
                estimate = longest if longest is not None else self._estimate(self.s.budget)
                if seed not in prepared:
                    estimate += self._prepare_estimate(seed)
                if agree(time.monotonic() + estimate > deadline, self.process_group):
                    left = sum(not os.path.exists(os.path.join(self.runs_dir, run_name(self.s.regime, n, r, sd) + ".json"))
                               for sd, n, r in plan[i:])
                    self.log(f"{self.s.regime}: --max-wall reached: {left} runs left; run the same command again "
                             "to continue")
                    return written, left
            if seed not in prepared:
                prepared[seed] = self._prepare(seed)
            todo = [p for p in plan[i:] if not os.path.exists(
                os.path.join(self.runs_dir, run_name(self.s.regime, p[1], p[2], p[0]) + ".json"))]
            per_run = longest if longest is not None else self._estimate(self.s.budget)
            left_text = f", about {per_run * len(todo) / 60:.1f} min left for this regime" if per_run else ""
            self.log(f"{self.s.regime}: run {i + 1} of {len(plan)}: {name}"
                     f"{'' if ratio is None else f' r={ratio:g}'} seed {seed}{left_text}")
            start = time.monotonic()
            record = self._run_one(seed, name, ratio, prepared[seed])
            longest = max(longest or 0.0, time.monotonic() - start)
            if self.leader:
                with open(path + ".tmp", "w") as f:
                    json.dump(record, f, indent=1)
                os.replace(path + ".tmp", path)
            barrier(self.process_group)  # every rank sees the file before it looks for the next run's
            written.append(path)
        return written, 0

    def _estimate(self, budget: Optional[float]) -> float:
        amount = self.s.budget if budget is None else budget
        return 1.3 * amount + 30.0 if self.s.budget_kind == "time" else 0.0

    def _prepare_estimate(self, seed: int) -> float:
        if self.s.regime == "finetune" and not self.s.init_checkpoint and not os.path.exists(
                os.path.join(self.s.cache_dir, "init", f"{self.hash}-s{seed}", "config.json")):
            return self._estimate(self.s.init_budget)
        if self.s.regime == "target" and not os.path.exists(
                os.path.join(self.s.cache_dir, "reference", f"{self.hash}-s{seed}.npy")):
            return self._estimate(self.s.reference_budget) + 30.0  # + the pool NLL pass
        return 0.0

    def _prepare(self, seed: int) -> dict:
        if self.s.regime == "finetune":
            return {"init": self._finetune_init(seed)}
        if self.s.regime == "target":
            return {"reference": self._reference(seed)}
        return {}

    def _run_one(self, seed, name, ratio, prep) -> dict:
        s = self.s
        if "init" in prep:
            model = load_checkpoint(prep["init"]).to(self.device).train()
        else:
            model = self.model_source.make(seed, self.device)
        model = model.to(self.weights_dtype)
        check_vocab(model, self.corpus.vocab_size)
        ctx = StepContext(seed=seed, selection_warmup_steps=s.selection_warmup_steps,
                          router_layers=min(s.router_layers, model.config.num_hidden_layers - 1),
                          num_sources=len(self.corpus.sources), num_train_rows=len(self.train_rows),
                          forward_impl=s.forward_impl, data_parallel=s.data_parallel)
        if self.s.regime == "target":
            ctx.target_source_id = self.corpus.sources.index(s.target_source)
            ctx.reference_token_nll = prep["reference"]["nll"]
            ctx.reference_thresholds = prep["reference"]["thresholds"]
        label = f"{s.regime} {name}{'' if ratio is None else f' r={ratio:g}'} s{seed}"
        result = train(model, self.configs[name].build, ratio, ctx, self.train_rows, self.val, self.budget,
                       self.optim, s.batch_size, self.device, self.autocast, s.untimed_warmup_steps,
                       label=label, log=self.log, compile_blocks=s.compile, clock=s.clock,
                       process_group=self.process_group)
        test = Evaluator(D.eval_rows(self.corpus, "test", self.row_len, s.eval_rows), s.eval_batch_size,
                         self.device, self.autocast)(model)
        record = {
            "regime": s.regime, "config": name, "ratio": ratio, "seed": seed, "primary": self.primary,
            "settings_hash": self.hash, "settings": self.fields,
            "router_layers": router_depth(ctx, self.configs[name].max_router_layers),
            "steps": result.steps, "train_time": result.train_time, "tokens": result.tokens,
            "tokens_per_s": result.tokens / result.train_time if result.train_time > 0 else None,
            "step_time_ms": 1e3 * result.train_time / result.steps if result.steps else None,
            "host_ms_per_step": 1e3 * result.host_time / result.steps if result.steps else None,
            "graphs_compiled_in_clock": result.graphs_compiled_in_clock,
            "diverged": result.diverged, "final_val": result.final_val, "test": test, "curve": result.curve,
            "train_source_share": self.train_source_share(),
            # the sources of the rows the steps trained on (labels read for this report only)
            "trained_rows_source_share": result.trained_rows_source_share,
            "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
        }
        if "init" in prep:
            record["init_checkpoint"] = prep["init"]
        if "reference" in prep:
            record["reference"] = {k: v for k, v in prep["reference"].items()
                                   if k not in ("nll", "row_nll", "heldout_row_nll")}
        return record
