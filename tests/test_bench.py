"""cggr bench: data preparation, data order, every configuration of every regime end to end, reports.

End-to-end runs use the tiny preset, 16-token rows, batches of 4 and a token budget of two steps, so
they are deterministic and fast on a CPU; the whole benchmark runs once per module (fixture ``bench_out``).
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from cggr.bench import data as D
from cggr.bench import report
from cggr.bench.configs import CONFIGS, default_configs
from cggr.bench.tokenizer import ByteTokenizer, load_tokenizer
from cggr.cli import main

TINY = ["--seq-len", "16", "--batch-size", "4", "--token-budget", "128", "--eval-every", "64",
        "--eval-rows", "2", "--untimed-warmup-steps", "1", "--router-layers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return D.prepare_corpus([D.EMBEDDED_DIR], ByteTokenizer(), cache_dir, log=lambda m: None)


def _documents(tokens, eot):
    """Documents of a token stream (each ends with the end-of-text id), as byte strings."""
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


# -- data -----------------------------------------------------------------------------------------
def test_split_documents_cuts_at_paragraphs_and_fortune_separators():
    text = "".join(f"para {i} line a\npara {i} line b\n\n" for i in range(20))
    docs = D.split_documents(text, doc_chars=100)
    assert all(d.rstrip("\n").endswith("line b") for d in docs)  # never inside a paragraph
    assert "".join(d.replace("\n", "") for d in docs) == text.replace("\n", "")
    fortunes = "".join(f"fortune {i}\n%\n" for i in range(30))
    docs = D.split_documents(fortunes, doc_chars=40)
    assert len(docs) > 3 and all(not d.startswith("%") for d in docs)
    assert sum(d.count("fortune") for d in docs) == 30
    # one gloss per line, no boundary at all: cut at lines once a document passes 2 * doc_chars
    glosses = "".join(f"gloss number {i}\n" for i in range(200))
    docs = D.split_documents(glosses, doc_chars=100)
    assert len(docs) > 10 and all(len(d) < 2 * 100 + 40 for d in docs)


def test_splits_share_no_document_and_cover_the_corpus(corpus):
    assert corpus.sources == ["fortunes", "python_doc", "shakespeare", "wordnet_glosses"]
    for source in corpus.sources:
        text = D.read_text(os.path.join(D.EMBEDDED_DIR, source + ".txt.gz"))
        expected = D.split_documents(text, 2000)
        per_split = {sp: _documents(corpus.stream(source, sp), corpus.eot_id) for sp in D.SPLITS}
        assert all(len(per_split[sp]) >= 1 for sp in D.SPLITS)
        assert sum(len(v) for v in per_split.values()) == len(expected)
        sets = {sp: set(v) for sp, v in per_split.items()}
        assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
        assert sorted(b for v in per_split.values() for b in v) == sorted(d.encode() for d in expected)
        # document offsets point at document starts
        starts = corpus.doc_starts[(source, "train")]
        assert len(starts) == len(per_split["train"]) and starts[0] == 0


def test_token_cache_is_reused_and_keyed_by_settings(corpus, cache_dir):
    messages = []
    again = D.prepare_corpus([D.EMBEDDED_DIR], ByteTokenizer(), cache_dir, log=messages.append)
    assert again.path == corpus.path and messages == [f"tokens: cached {corpus.path}"]
    for key in corpus.tokens:
        np.testing.assert_array_equal(again.tokens[key], corpus.tokens[key])
    other = D.prepare_corpus([D.EMBEDDED_DIR], ByteTokenizer(), cache_dir, doc_chars=3000, log=lambda m: None)
    assert other.path != corpus.path


def test_rows_stay_within_one_source_and_split(corpus):
    rows = D.build_rows(corpus, "train", corpus.sources, 17)
    assert rows.rows.shape[1] == 17 and len(rows) == len(rows.source_ids)
    start = 0
    for i, source in enumerate(corpus.sources):
        stream = corpus.stream(source, "train")
        n = len(stream) // 17
        np.testing.assert_array_equal(rows.rows[start:start + n].reshape(-1), stream[:n * 17])
        assert (rows.source_ids[start:start + n] == i).all()
        start += n
    assert start == len(rows)


def test_reference_slice_and_pool_are_disjoint_documents(corpus):
    ref, pool = D.split_documents_of_stream(corpus, "python_doc", "train", 0.5)
    eot = corpus.eot_id
    ref_docs, pool_docs = set(_documents(ref, eot)), set(_documents(pool, eot))
    assert ref_docs and pool_docs and not ref_docs & pool_docs
    assert len(ref) + len(pool) == len(corpus.stream("python_doc", "train"))
    # the reference's own slice, cut again: training documents and held-out ones, disjoint, same union
    train, held = D.split_reference_slice(corpus, "python_doc", 0.5, 0.25)
    train_docs, held_docs = set(_documents(train, eot)), set(_documents(held, eot))
    assert train_docs and held_docs and not train_docs & held_docs
    assert train_docs | held_docs == ref_docs and len(train) + len(held) == len(ref)


def test_batch_order_is_a_function_of_the_seed():
    def first(seed, n=12):
        order = D.batch_order(40, 8, seed)
        return [next(order) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    # each pass draws every row at most once (the partial last batch is dropped)
    assert len(np.unique(np.concatenate(a[:5]))) == 40
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(D.batch_order(3, 8, 0))


def test_bpe_tokenizer_folder(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eot_id == tok.token_to_id("<|endoftext|>")
    ids = loaded.encode_batch(["the lazy fox"])[0]
    assert tok.decode(ids.tolist()) == "the lazy fox"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


# -- reports --------------------------------------------------------------------------------------
def test_trained_row_sources_counts_every_kind_of_selection():
    from cggr.bench.configs import Batch
    from cggr.bench.train import TrainedRowSources

    sources = ["a", "b", "c"]
    rows = D.RowSet(np.zeros((6, 3), dtype=np.int64), np.array([0, 1, 1, 2, 2, 2]), sources)
    counter = TrainedRowSources(rows, "cpu")

    def batch(idx):
        idx = np.asarray(idx)
        return Batch(torch.zeros(len(idx), 3, dtype=torch.int64), torch.from_numpy(idx), rows.source_ids[idx], idx)

    counter.add(batch([0, 3, 4]), None)                     # every row: a, c, c
    counter.add(batch([1, 5, 2]), np.array([0, 2]))         # host positions: b, b
    counter.add(batch([5, 0, 1]), torch.tensor([1, 1, 2]))  # device positions, a repeat: a, a, b
    assert counter.share() == {"a": 3 / 8, "b": 3 / 8, "c": 2 / 8}


def test_time_to_reach_interpolates_between_evaluations():
    curve = [{"time": 0.0, "tokens": 0, "val": {"a": 4.0}}, {"time": 10.0, "tokens": 100, "val": {"a": 3.0}},
             {"time": 20.0, "tokens": 200, "val": {"a": 2.0}}]
    assert report.time_to_reach(curve, None, 2.5) == (15.0, 150.0)
    assert report.time_to_reach(curve, "a", 4.0) == (0.0, 0)
    assert report.time_to_reach(curve, None, 1.0) is None


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_out(tmp_path_factory, cache_dir):
    """Every configuration of every regime, one seed, ratio 0.5; pretrain standard/random with two seeds."""
    out = str(tmp_path_factory.mktemp("bench"))
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared CI machine
    assert main(["bench", "--regime", "finetune", "target", "--ratios", "0.5", "--seeds", "0",
                 "--out", out, "--cache-dir", cache_dir] + TINY) == 0
    assert main(["bench", "--regime", "pretrain", "--ratios", "0.5", "--seeds", "0", "1",
                 "--configs", "standard", "random", "cggr_hardest", "cggr_half_hardest", "cggr_loss",
                 "source_baseline", "row_baseline",
                 "--out", out, "--cache-dir", cache_dir] + TINY) == 0
    return out


def _runs(out):
    return report.load_runs(out)


def test_every_configuration_of_every_regime_ran(bench_out, cache_dir):
    runs = _runs(bench_out)
    done = {(r["regime"], r["config"]) for r in runs}
    for regime in ("pretrain", "finetune", "target"):
        for config in default_configs(regime):
            assert (regime, config) in done
    # in no default list: cggr_importance (test_a_configuration_of_no_default_list_runs_when_named) and
    # confidence_gate (tests/test_bench_gate.py)
    assert set(CONFIGS) - {"cggr_importance", "confidence_gate"} == {c for _, c in done}
    for r in runs:
        assert r["steps"] == 2 and r["tokens"] == 128 and not r["diverged"]
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == 2
        assert set(r["final_val"]) == set(r["test"]) == {"fortunes", "python_doc", "shakespeare", "wordnet_glosses"}
        assert all(np.isfinite(v) for v in r["final_val"].values())
        assert (r["ratio"] is None) == (r["config"] == "standard")  # (confidence_gate, no ratio, is not run here)
    # selective configurations trained on fewer rows: their numbers come from the libraries' metrics
    hardest = next(r for r in runs if r["config"] == "cggr_hardest" and r["regime"] == "pretrain")
    assert hardest["curve"][-1]["selection"]["sequences_selected"] == 2
    finetune = next(r for r in runs if r["regime"] == "finetune")
    assert finetune["primary"] == "python_doc" and os.path.isdir(finetune["init_checkpoint"])
    assert finetune["init_checkpoint"].startswith(cache_dir)  # large artefacts stay out of OUT
    target = next(r for r in runs if r["regime"] == "target")
    assert target["primary"] == "python_doc" and target["reference"]["preset"] == "tiny"
    ref = target["reference"]
    assert ref["heldout_rows"] >= 1 and "heldout_row_nll" not in ref  # the values stay in the cache
    assert set(ref["thresholds"]) == set(ref["domain_filter"]) == {"heldout", "heldout99", "otsu"}
    assert ref["thresholds"]["heldout"] <= ref["thresholds"]["heldout99"]
    for name, report_ in ref["domain_filter"].items():
        assert report_["threshold"] == ref["thresholds"][name]
        assert 0 <= report_["precision"] <= 1 and 0 <= report_["target_recall"] <= 1


def test_runs_record_the_sources_of_their_trained_rows(bench_out):
    runs = _runs(bench_out)
    for r in runs:
        share = r["trained_rows_source_share"]
        assert set(share) == set(r["final_val"]) and sum(share.values()) == pytest.approx(1.0)
    target = {(r["config"], r["seed"]): r for r in runs if r["regime"] == "target"}
    finetune = [r for r in runs if r["regime"] == "finetune"]
    assert all(r["trained_rows_source_share"]["python_doc"] == 1.0 for r in finetune)
    # the oracle trains on target rows first: never a smaller target share than the batches it drew from
    assert (target[("oracle", 0)]["trained_rows_source_share"]["python_doc"]
            >= target[("standard", 0)]["trained_rows_source_share"]["python_doc"])
    summary = report.summarize(runs)
    oracle = next(row for row in summary["target"] if row["config"] == "oracle")
    assert oracle["trained_primary_share"] == target[("oracle", 0)]["trained_rows_source_share"]["python_doc"]


def test_a_configuration_of_no_default_list_runs_when_named(tmp_path, cache_dir):
    """cggr_importance lost in every measured regime: in no default list, but still runnable by name in the
    regimes it was measured in, so that its published numbers stay reproducible (BENCHMARKS.md)."""
    assert all("cggr_importance" not in default_configs(regime) for regime in ("pretrain", "finetune", "target"))
    out = tmp_path / "out"
    assert main(["bench", "--regime", "pretrain", "--configs", "cggr_importance", "--ratios", "0.5", "--seeds", "0",
                 "--out", str(out), "--cache-dir", cache_dir] + TINY) == 0
    run = _runs(str(out))[0]
    assert run["config"] == "cggr_importance" and run["steps"] == 2 and not run["diverged"]
    assert run["curve"][-1]["selection"]["sequences_selected"] == 2


def test_same_seed_same_run(bench_out, tmp_path, cache_dir):
    """Token budgets are deterministic: a second invocation reproduces the standard run exactly."""
    out = str(tmp_path / "again")
    assert main(["bench", "--regime", "pretrain", "--configs", "standard", "--seeds", "1", "--out", out,
                 "--cache-dir", cache_dir] + TINY) == 0
    first = next(r for r in _runs(bench_out) if r["regime"] == "pretrain" and r["config"] == "standard" and r["seed"] == 1)
    second = _runs(out)[0]
    assert [p["val"] for p in first["curve"]] == [p["val"] for p in second["curve"]]
    other_seed = next(r for r in _runs(bench_out) if r["regime"] == "pretrain" and r["config"] == "standard" and r["seed"] == 0)
    assert other_seed["final_val"] != first["final_val"]


def test_reports_written(bench_out):
    table = open(os.path.join(bench_out, "summary.md")).read()
    for regime in ("pretrain", "finetune", "target"):
        assert f"## {regime}" in table
    assert "| excess | 0.5 |" in table and "± " in table  # two pretrain seeds give a spread
    assert "| excess (1 seed) | 0.5 |" in table  # one target seed: marked, no spread
    assert "| standard | - | " in table.split("## pretrain")[1].split("## ")[0]  # two seeds: no mark
    results = json.load(open(os.path.join(bench_out, "results.json")))
    pretrain = {(r["config"], r["ratio"]): r for r in results["summary"]["pretrain"]}
    assert pretrain[("standard", None)]["seeds"] == [0, 1] and pretrain[("standard", None)]["speedup"] == 1.0
    lines = open(os.path.join(bench_out, "curves.csv")).read().splitlines()
    assert lines[0].startswith("regime,config,ratio,seed,step,time_s,tokens")
    assert len(lines) == 1 + sum(len(r["curve"]) for r in _runs(bench_out))
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    for regime in ("pretrain", "finetune", "target"):
        assert os.path.exists(os.path.join(bench_out, f"val_loss_{regime}.png")) == has_mpl


def test_rerun_reuses_finished_runs_and_refuses_other_settings(bench_out, cache_dir, capsys):
    assert main(["bench", "--regime", "pretrain", "--configs", "standard", "--seeds", "0", "--out", bench_out,
                 "--cache-dir", cache_dir] + TINY) == 0
    assert "pretrain__standard__rfull__s0.json: done earlier, reused" in capsys.readouterr().out
    changed = [a if a != "128" else "192" for a in TINY]  # another token budget
    with pytest.raises(ValueError, match="other settings"):
        main(["bench", "--regime", "pretrain", "--configs", "standard", "--out", bench_out,
              "--cache-dir", cache_dir] + changed)


def test_user_checkpoint_and_prepared_token_file(tmp_path, corpus, cache_dir, capsys):
    from cggr.bench.models import build_preset

    model_dir = str(tmp_path / "model")
    build_preset("tiny", corpus.vocab_size, 64, seed=3, eot_id=corpus.eot_id).save_pretrained(model_dir)
    out = str(tmp_path / "out")
    assert main(["bench", "--regime", "pretrain", "--configs", "standard", "cggr_hardest", "--ratios", "0.5",
                 "--model", model_dir, "--corpus", corpus.path, "--out", out, "--cache-dir", cache_dir] + TINY) == 0
    runs = _runs(out)
    assert {r["config"] for r in runs} == {"standard", "cggr_hardest"}
    assert runs[0]["settings"]["model_path"] == model_dir
    # both start from the checkpoint: the same first evaluation
    assert runs[0]["curve"][0]["val"] == runs[1]["curve"][0]["val"]
    assert "model checkpoint" in capsys.readouterr().out


def test_prepare_only_prints_the_token_file(cache_dir, corpus, capsys):
    assert main(["bench", "--prepare-only", "--cache-dir", cache_dir]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == corpus.path


def test_time_budget_and_max_wall(tmp_path, cache_dir, capsys):
    timed = [a for a in TINY if a not in ("--token-budget", "128", "--eval-every", "64")]
    out = str(tmp_path / "timed")
    args = ["bench", "--configs", "standard", "random", "--ratios", "0.5", "--out", out, "--cache-dir", cache_dir,
            "--eval-every", "0.25"] + timed
    # a 60-second budget cannot fit in 5 seconds: nothing starts, the command says what is left
    assert main(args + ["--time-budget", "60", "--max-wall", "5"]) == 0
    assert "INCOMPLETE: 2 runs left" in capsys.readouterr().out
    assert not os.listdir(os.path.join(out, "runs"))
    assert main(args + ["--time-budget", "0.5"]) == 0
    runs = _runs(out)
    assert len(runs) == 2
    for r in runs:
        assert r["settings"]["budget_kind"] == "time" and r["train_time"] >= 0.5
        assert len(r["curve"]) >= 2 and r["curve"][-1]["time"] == r["train_time"]


def test_span_clock_trains_exactly_what_the_step_clock_trains(tmp_path, cache_dir):
    """--clock span changes only where the clock is read: with a token budget both clocks train the same
    steps to the same losses and sources; with a time budget the span clock's times are exact at every
    evaluation and the budget is spent."""
    outs = {}
    for clock in ("step", "span"):
        outs[clock] = str(tmp_path / clock)
        assert main(["bench", "--configs", "standard", "random", "cggr_hardest", "--ratios", "0.5", "--clock", clock,
                     "--out", outs[clock], "--cache-dir", cache_dir] + TINY) == 0
    step_runs, span_runs = ({(r["config"], r["ratio"]): r for r in _runs(outs[c])} for c in ("step", "span"))
    assert step_runs.keys() == span_runs.keys()
    for key, a in step_runs.items():
        b = span_runs[key]
        assert [p["val"] for p in a["curve"]] == [p["val"] for p in b["curve"]]
        assert a["steps"] == b["steps"] and a["trained_rows_source_share"] == b["trained_rows_source_share"]
        assert "clock" not in a["settings"] and b["settings"]["clock"] == "span"
        assert a["settings_hash"] != b["settings_hash"]
    assert "--clock span" in open(os.path.join(outs["span"], "summary.md")).read()

    timed = [a for a in TINY if a not in ("--token-budget", "128", "--eval-every", "64")]
    out = str(tmp_path / "span_timed")
    assert main(["bench", "--configs", "random", "--ratios", "0.5", "--clock", "span", "--time-budget", "0.5",
                 "--eval-every", "0.1", "--out", out, "--cache-dir", cache_dir] + timed) == 0
    run = _runs(out)[0]
    times = [p["time"] for p in run["curve"]]
    assert run["train_time"] >= 0.5 and times == sorted(times) and len(times) >= 3
    assert times[-1] == run["train_time"] and run["curve"][-1]["step"] == run["steps"]


def test_forward_impl_trunk_trains_what_the_model_forward_trains(tmp_path, cache_dir):
    """--forward-impl trunk runs the same modules and loss without the model's forward: with a token budget
    every configuration kind (whole batch, host-chosen rows: the oracle, CGGRModel with and without a router,
    CGGRLoss) trains the same steps to the same losses; the setting is part of the settings hash and named in
    the report."""
    outs = {}
    for impl in ("model", "trunk"):
        outs[impl] = str(tmp_path / impl)
        assert main(["bench", "--regime", "target", "--configs", "standard", "oracle", "random", "cggr_hardest",
                     "cggr_loss", "--ratios", "0.5", "--forward-impl", impl, "--out", outs[impl],
                     "--cache-dir", cache_dir] + TINY) == 0
    model_runs, trunk_runs = ({(r["config"], r["ratio"]): r for r in _runs(outs[i])} for i in ("model", "trunk"))
    assert model_runs.keys() == trunk_runs.keys() and len(model_runs) == 5
    for key, a in model_runs.items():
        b = trunk_runs[key]
        assert a["steps"] == b["steps"], key
        for point_a, point_b in zip(a["curve"], b["curve"], strict=True):
            assert point_b["val"] == pytest.approx(point_a["val"], rel=1e-4), key
        assert "forward_impl" not in a["settings"] and b["settings"]["forward_impl"] == "trunk"
        assert a["settings_hash"] != b["settings_hash"]
    assert "--forward-impl trunk" in open(os.path.join(outs["trunk"], "summary.md")).read()


def test_train_rejects_an_unknown_clock():
    from cggr.bench.train import train

    with pytest.raises(ValueError, match=r"clock must be one of \('step', 'span'\), got 'wall'"):
        train(None, None, None, None, None, None, None, None, 4, "cpu", None, clock="wall")
