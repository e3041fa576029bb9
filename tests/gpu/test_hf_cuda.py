"""CGGRTrainer on the GPU: StepOptions(compile='blocks-cudagraphs') through the Trainer (router, the Trainer's
forward on the selected rows, evaluation) gives the losses of the uncompiled Trainer.

    pytest tests/gpu/test_hf_cuda.py -q
"""
import os

import pytest
import torch
import transformers as tf

pytest.importorskip("accelerate")

from cggr import HardestRows, RouterSettings, StepOptions  # noqa: E402
from cggr.hf import CGGRConfig, CGGRTrainer  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton)",
)
V = 2048


def data(n=64, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (T,), generator=g).tolist()} for _ in range(n)]


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def run(tmp_path, options):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                               attn_implementation="sdpa"))
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                max_steps=4, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                                bf16=True, learning_rate=1e-3, lr_scheduler_type="constant", seed=0,
                                per_device_eval_batch_size=8)
    config = CGGRConfig(policy=HardestRows(router=RouterSettings(layers=1)), min_tokens_ratio=0.25, warmup_steps=0,
                        step_options=options)
    trainer = CGGRTrainer(model=model, args=args, train_dataset=data(), eval_dataset=data(16, seed=1),
                          data_collator=collate, cggr_config=config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.evaluate()["eval_loss"]


def test_cuda_graphed_blocks_through_the_trainer(tmp_path):
    torch._dynamo.reset()
    losses, eval_loss = run(tmp_path / "eager", None)
    graphed_losses, graphed_eval = run(tmp_path / "graphs", StepOptions(compile="blocks-cudagraphs"))
    assert len(graphed_losses) == len(losses) == 4
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(losses), rtol=2e-2, atol=2e-2)
    assert graphed_eval == pytest.approx(eval_loss, rel=2e-2)
