"""Models of the benchmark: Llama-architecture presets built from scratch, or a local Hugging Face checkpoint.

Presets (all with tied input/output embeddings; vocabulary = tokenizer size rounded up to a multiple of 64):
- ``tiny``: hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 192: CPU smoke runs and tests.
- ``small``: hidden 256, 4 layers, 4 heads (2 KV heads), intermediate 768: reference models on a GPU.
- ``smollm-135m``: the SmolLM-135M shape: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads.
"""
import contextlib
import copy
import os

import torch

from .. import compile_blocks
from ..compile_blocks import begin_graph_step, compiled_graph_count, decoder_blocks  # noqa: F401 (the bench's names)
from .settings import COMPILE_MODES


@contextlib.contextmanager
def quiet_transformers():
    """No per-shard progress bars while a checkpoint is read or written (the bench has its own progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    # the reference-model size of the issues' regime-3 measurement (384 wide, 6 layers)
    "medium": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=2),
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3),
}


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    return -(-vocab_size // multiple) * multiple


def build_preset(preset: str, vocab_size: int, max_len: int, seed: int, eot_id: int):
    """A freshly initialised model; the same (preset, vocab, seed) always gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {preset!r}")
    config = LlamaConfig(vocab_size=padded_vocab(vocab_size), max_position_embeddings=max(2048, max_len),
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
                         use_cache=False, **PRESETS[preset])
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_checkpoint(path: str):
    """A local Hugging Face causal-LM folder (``save_pretrained`` output), loaded in float32 for training."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model checkpoint {path} is not a folder")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.config.use_cache = False
    return model


class ModelSource:
    """Produces the initial model of every run: a preset (seeded init) or a checkpoint folder."""

    def __init__(self, preset: str = "tiny", checkpoint: str = None, vocab_size: int = 0, max_len: int = 0,
                 eot_id: int = 0):
        self.preset, self.checkpoint = preset, checkpoint
        self.vocab_size, self.max_len, self.eot_id = vocab_size, max_len, eot_id
        self._loaded = None  # a checkpoint is read from disk once, then copied per run

    def describe(self) -> str:
        return f"checkpoint {self.checkpoint}" if self.checkpoint else f"preset {self.preset}"

    def make(self, seed: int, device: str):
        if self.checkpoint:
            if self._loaded is None:
                self._loaded = load_checkpoint(self.checkpoint)
            model = copy.deepcopy(self._loaded)
        else:
            model = build_preset(self.preset, self.vocab_size, self.max_len, seed, self.eot_id)
        return model.to(device).train()


def compile_decoder_blocks(model, mode: str = "blocks", **options):
    """``cggr.compile_blocks.compile_decoder_blocks`` by the bench's ``--compile`` name: 'blocks' (static
    shapes) or 'blocks-cudagraphs' (also CUDA graphs; callers mark each training step and evaluation batch
    with ``begin_graph_step``)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    compile_blocks.compile_decoder_blocks(model, cuda_graphs=mode == "blocks-cudagraphs", **options)


def check_vocab(model, vocab_size: int):
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(f"the model's embedding has {rows} rows but the tokenizer has {vocab_size} tokens: "
                         "use the tokenizer the model was trained with (--tokenizer)")
