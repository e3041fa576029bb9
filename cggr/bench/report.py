"""Reports from the run files of an output folder: markdown table, JSON, CSV of the curves, PNG plots.

Metrics (per regime; "headline" = the regime's primary validation loss: the mean over sources for
``pretrain``, the held-out source for ``finetune``, the target domain for ``target``):
- ``val``, ``test``: headline loss of the final model (test is evaluated once, at the end of each run;
  settings are meant to be chosen on validation only).
- ``time to std``, ``tokens to std``: training seconds / tokens until the headline validation loss first
  reaches the final headline loss of the ``standard`` run of the same seed, linearly interpolated between
  evaluations (so its resolution is ``--eval-every``); ``speed-up`` is the standard run's training time
  over that time. Runs that never reach it count in "reached n/N" and not in the mean.
- ``tok/s``: tokens drawn from the data per training second; ``step ms``: mean training time per step.
- ``mix val`` (pretrain): the per-source validation losses weighted by each source's share of the
  training rows, i.e. the loss on the data's own mix (the headline weighs every source the same, so a
  policy that shifts training towards small, hard sources looks better on it than on the mix);
  ``mix: time to std``: time to std measured on that loss.
- ``others val`` (finetune, target): mean validation loss of the sources other than the headline's
  (forgetting, or what the target focus costs elsewhere).
Every number is a mean over seeds, ``± sd`` the sample standard deviation when there are several; a row
from one seed says ``(1 seed)`` after its configuration (its numbers carry no spread).
"""
import contextlib
import csv
import json
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from .. import _deps


RUN_KEYS = ("regime", "config", "ratio", "seed", "settings_hash", "curve", "final_val")


def read_run_file(path: str) -> dict:
    """One run file, or a ValueError naming it when it is not one (corrupt, foreign, or from another version)."""
    try:
        with open(path) as f:
            run = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a cggr bench run file ({error}); delete it to run that configuration "
                         "again") from None
    missing = [key for key in RUN_KEYS if not isinstance(run, dict) or key not in run]
    if missing:
        raise ValueError(f"{path}: not a cggr bench run file (no {', '.join(missing)}); delete it to run that "
                         "configuration again")
    return run


def load_runs(out: str) -> List[dict]:
    runs_dir = os.path.join(out, "runs")
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"{runs_dir}: no runs (run `cggr bench --out {out}` first)")
    runs = [read_run_file(os.path.join(runs_dir, name)) for name in sorted(os.listdir(runs_dir))
            if name.endswith(".json")]
    if not runs:
        raise FileNotFoundError(f"{runs_dir}: no run files")
    return runs


def headline(val: Dict[str, float], primary: Optional[str]) -> float:
    return float(np.mean(list(val.values()))) if primary is None else val[primary]


def mix_loss(val: Dict[str, float], share: Optional[Dict[str, float]]) -> Optional[float]:
    """Validation loss weighted by the training mix (None for runs recorded without the shares)."""
    if not share:
        return None
    return float(sum(share[s] * val[s] for s in share) / sum(share.values()))


def others_loss(val: Dict[str, float], primary: Optional[str]) -> Optional[float]:
    others = [v for s, v in val.items() if s != primary]
    return float(np.mean(others)) if primary is not None and others else None


def time_to_reach(curve: List[dict], primary: Optional[str], target: float, share: Optional[Dict[str, float]] = None):
    """(seconds, tokens) when the headline val loss (with ``share``: the mix loss) first reaches ``target``,
    interpolated; None if never."""
    prev = None
    for point in curve:
        loss = headline(point["val"], primary) if share is None else mix_loss(point["val"], share)
        if loss <= target:
            if prev is None or not math.isfinite(prev[0]):
                return point["time"], point["tokens"]
            frac = (prev[0] - target) / (prev[0] - loss) if prev[0] > loss else 1.0
            return (prev[1] + frac * (point["time"] - prev[1]), prev[2] + frac * (point["tokens"] - prev[2]))
        prev = (loss, point["time"], point["tokens"])
    return None


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(runs: List[dict]) -> Dict[str, List[dict]]:
    by_regime = defaultdict(list)
    for r in runs:
        by_regime[r["regime"]].append(r)
    summary = {}
    for regime, rs in by_regime.items():
        hashes = {r["settings_hash"] for r in rs}
        if len(hashes) > 1:
            raise ValueError(f"regime {regime}: runs with different settings {sorted(hashes)} in one folder")
        standard = {r["seed"]: r for r in rs if r["config"] == "standard"}
        groups = defaultdict(list)
        for r in rs:
            groups[(r["config"], r["ratio"])].append(r)
        rows = []
        for (config, ratio), group in groups.items():
            per_seed = []
            for r in sorted(group, key=lambda r: r["seed"]):
                item = {"seed": r["seed"], "val": headline(r["final_val"], r["primary"]),
                        "test": headline(r["test"], r["primary"]), "tokens_per_s": r["tokens_per_s"],
                        "step_time_ms": r["step_time_ms"], "val_per_source": r["final_val"],
                        "diverged": r["diverged"], "time_to_std": None, "tokens_to_std": None, "speedup": None,
                        "mix_val": mix_loss(r["final_val"], r.get("train_source_share")),
                        "others_val": others_loss(r["final_val"], r["primary"]), "mix_time_to_std": None,
                        # share of the trained rows from the headline source (runs before it was recorded: None)
                        "trained_primary_share": (r.get("trained_rows_source_share") or {}).get(r["primary"])}
                std = standard.get(r["seed"])
                share = r.get("train_source_share")
                if std is not None and not r["diverged"] and share and r["primary"] is None:
                    reached = time_to_reach(r["curve"], None, mix_loss(std["final_val"], share), share)
                    item["mix_time_to_std"] = None if reached is None else reached[0]
                if std is not None and not r["diverged"]:
                    reached = time_to_reach(r["curve"], r["primary"], headline(std["final_val"], std["primary"]))
                    if reached is not None:
                        item["time_to_std"], item["tokens_to_std"] = reached
                        if reached[0] > 0:
                            item["speedup"] = std["train_time"] / reached[0]
                per_seed.append(item)
            row = {"config": config, "ratio": ratio, "seeds": [p["seed"] for p in per_seed],
                   "reached": sum(p["time_to_std"] is not None for p in per_seed),
                   "has_standard": all(p["seed"] in standard for p in per_seed),
                   "diverged": sum(p["diverged"] for p in per_seed), "per_seed": per_seed}
            for key in ("val", "test", "time_to_std", "tokens_to_std", "speedup", "tokens_per_s", "step_time_ms",
                        "mix_val", "others_val", "mix_time_to_std", "trained_primary_share"):
                row[key], row[key + "_sd"] = _mean_sd([p[key] for p in per_seed])
            sources = sorted(per_seed[0]["val_per_source"])
            row["val_per_source"] = {s: _mean_sd([p["val_per_source"][s] for p in per_seed])[0] for s in sources}
            rows.append(row)
        rows.sort(key=lambda x: (x["config"] != "standard", x["config"], x["ratio"] or 0))
        summary[regime] = rows
    return summary


def _ratio(ratio):
    return "-" if ratio is None else f"{ratio:g}"


def _fmt(mean, sd=None, digits=3, scale=1.0):
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def _percent(share):
    return "-" if share is None else f"{100 * share:.1f} %"


def compile_note(mode) -> str:
    if not mode:
        return ""
    return ", compiled blocks" if mode in (True, "blocks") else f", compiled blocks ({mode})"


def clock_note(clock) -> str:
    return ", timed per span between evaluations (--clock span)" if clock == "span" else ""


def forward_note(forward_impl) -> str:
    return ", the model run through ModelTrunk (--forward-impl trunk)" if forward_impl == "trunk" else ""


def markdown(summary: Dict[str, List[dict]], runs: List[dict]) -> str:
    lines = []
    for regime, rows in summary.items():
        first = next(r for r in runs if r["regime"] == regime)
        primary = first["primary"] or "mean over sources"
        st = first["settings"]
        pretrain = first["primary"] is None  # pretrain shows the data-mix view, the others the other sources
        extra_key = "mix_val" if pretrain else "others_val"
        extra_name = "mix val | mix: time to std (s)" if pretrain else f"others val | trained rows from {primary}"
        lines += [f"## {regime}", "",
                  f"Headline: validation loss of **{primary}**. Model {st.get('model_path') or st['model_preset']}, "
                  f"seq {st['seq_len']}, batch {st['batch_size']}, {st['budget_kind']} budget {st['budget']:g} "
                  f"{'s' if st['budget_kind'] == 'time' else 'tokens'} per configuration, lr {st['lr']:g}, "
                  f"{st['dtype']}{compile_note(st.get('compile'))}{clock_note(st.get('clock'))}{forward_note(st.get('forward_impl'))} on {first['device']}.", "",
                  "| config | ratio | val | test | time to std (s) | tokens to std (M) | reached | speed-up | "
                  f"tok/s | step ms | {extra_name} |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            n = len(r["seeds"])
            reached = f"{r['reached']}/{n}" if r["has_standard"] else "no std run"
            if r["diverged"]:
                reached += f" ({r['diverged']} diverged)"
            lines.append(
                f"| {r['config']}{' (1 seed)' if n == 1 else ''} | {_ratio(r['ratio'])} | "
                f"{_fmt(r['val'], r['val_sd'])} | {_fmt(r['test'], r['test_sd'])} | "
                f"{_fmt(r['time_to_std'], r['time_to_std_sd'], 1)} | "
                f"{_fmt(r['tokens_to_std'], r['tokens_to_std_sd'], 2, 1e-6)} | {reached} | "
                f"{_fmt(r['speedup'], r['speedup_sd'], 2)} | {_fmt(r['tokens_per_s'], None, 0)} | "
                f"{_fmt(r['step_time_ms'], None, 1)} | {_fmt(r[extra_key], r[extra_key + '_sd'])} |"
                + (f" {_fmt(r['mix_time_to_std'], r['mix_time_to_std_sd'], 1)} |" if pretrain
                   else f" {_percent(r['trained_primary_share'])} |"))
        sources = sorted(rows[0]["val_per_source"])
        lines += ["", "Final validation loss per source:", "",
                  "| config | ratio | " + " | ".join(sources) + " |", "|---|---|" + "---|" * len(sources)]
        for r in rows:
            lines.append(f"| {r['config']} | {_ratio(r['ratio'])} | "
                         + " | ".join(_fmt(r["val_per_source"][s]) for s in sources) + " |")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Write ``path`` whole or not at all: into a temporary file beside it, renamed over it at the end (a
    killed run leaves the previous report, never half of one)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(runs: List[dict], path: str):
    sources = sorted({s for r in runs for s in r["final_val"]})
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["regime", "config", "ratio", "seed", "step", "time_s", "tokens", "lr", "train_loss",
                    "val_headline", "val_mean"] + [f"val_{s}" for s in sources])
        for r in runs:
            for p in r["curve"]:
                w.writerow([r["regime"], r["config"], "" if r["ratio"] is None else r["ratio"], r["seed"], p["step"],
                            f"{p['time']:.4f}", p["tokens"], f"{p['lr']:.6g}", f"{p['train_loss']:.6g}",
                            f"{headline(p['val'], r['primary']):.6g}", f"{p['val_mean']:.6g}"]
                           + [f"{p['val'][s]:.6g}" if s in p["val"] else "" for s in sources])


def plot(runs: List[dict], out: str, log=print) -> List[str]:
    # matplotlib is optional (the `bench` extra): without it, said once per process (cggr.cli may have
    # said it already, before the runs), however many reports are written
    if not _deps.note_missing("matplotlib", "bench", "cggr bench", "the report has no plot (its table, JSON "
                              "and CSV are written)", log=log):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for regime in sorted({r["regime"] for r in runs}):
        rs = [r for r in runs if r["regime"] == regime]
        keys = sorted({(r["config"], r["ratio"]) for r in rs}, key=lambda k: (k[0] != "standard", k[0], k[1] or 0))
        # 10 colours x 4 line styles: up to 40 configurations stay distinguishable
        colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(keys)}
        styles = {k: ("-", "--", "-.", ":")[(i // 10) % 4] for i, k in enumerate(keys)}
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
        for r in rs:
            key = (r["config"], r["ratio"])
            label = r["config"] + ("" if r["ratio"] is None else f" r={r['ratio']:g}")
            ys = [headline(p["val"], r["primary"]) for p in r["curve"]]
            first = r["seed"] == min(x["seed"] for x in rs if (x["config"], x["ratio"]) == key)
            style = dict(color=colors[key], lw=2.0 if r["config"] == "standard" else 1.3,
                         ls=styles[key], label=label if first else None)
            axes[0].plot([p["time"] for p in r["curve"]], ys, **style)
            axes[1].plot([p["tokens"] / 1e6 for p in r["curve"]], ys, **style)
        std_finals = [headline(r["final_val"], r["primary"]) for r in rs if r["config"] == "standard"]
        if std_finals:  # the level every configuration is timed to reach
            for ax in axes:
                ax.axhline(float(np.mean(std_finals)), color="gray", ls=":", lw=1)
        primary = rs[0]["primary"] or "mean over sources"
        axes[0].set_xlabel("training time (s, evaluation excluded)")
        axes[1].set_xlabel("tokens drawn from the data (M)")
        axes[0].set_ylabel(f"validation loss ({primary})")
        for ax in axes:
            ax.grid(alpha=0.3)
        finals = [headline(p["val"], r["primary"]) for r in rs for p in r["curve"][len(r["curve"]) // 4:]]
        if finals:  # the first evaluations (random init) would squash the interesting part of the plot
            low, high = min(finals), max(finals)
            axes[0].set_ylim(low - 0.05 * (high - low + 1e-6), high + 0.05 * (high - low + 1e-6))
        # the legend outside the data: beside the right axes
        axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.suptitle(f"cggr bench: {regime} (one line per seed)")
        fig.tight_layout()
        path = os.path.join(out, f"val_loss_{regime}.png")
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=110, format="png", bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def remove_stale_temporaries(folder: str):
    """Delete ``NAME.tmpPID`` files (``atomic_open``) of processes that are gone: what a killed report
    writer leaves behind. A live process's temporary (another writer) is left alone."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        match = re.search(r"\.tmp(\d+)$", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            os.remove(os.path.join(folder, name))
        except PermissionError:  # alive, another user's
            pass


def write_reports(out: str, log=print) -> Dict[str, str]:
    remove_stale_temporaries(out)
    runs = load_runs(out)
    summary = summarize(runs)
    paths = {"table": os.path.join(out, "summary.md"), "json": os.path.join(out, "results.json"),
             "csv": os.path.join(out, "curves.csv")}
    with atomic_open(paths["table"], "w") as f:
        f.write("# cggr bench results\n\n" + markdown(summary, runs))
    with atomic_open(paths["json"], "w") as f:
        json.dump({"summary": summary, "runs": runs}, f, indent=1)
    write_csv(runs, paths["csv"])
    for i, p in enumerate(plot(runs, out, log)):
        paths[f"plot{i}"] = p
    return paths
