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


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The repeated blocks of a Hugging Face causal LM (``layers`` of Llama-style models, ``h`` of GPT-2)."""
    base = getattr(model, "base_model", None)
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    raise TypeError(f"{type(model).__name__}: no decoder blocks found (looked for base_model.layers and "
                    "base_model.h as a non-empty nn.ModuleList)")


_graph_trees_in_use = False


def compile_decoder_blocks(model, mode: str = "blocks", **options):
    """``torch.compile`` every decoder block in place (``nn.Module.compile``), static shapes.

    In place, so that everything that calls the blocks runs them compiled: the training forward, the
    CGGRModel router (it calls the model's own first blocks) and evaluation. Blocks of one shape share one
    graph per (shape, grad mode, caller's keywords): a 30-block model compiles a handful of graphs, not 30.
    What stays eager around them (embedding, final norm, LM head, loss, optimizer) is the same for every
    configuration. Static shapes (``dynamic=False``): each row count is its own graph, so a configuration
    must keep one row count (no selection curriculum) to compile outside the clock only.

    ``mode='blocks-cudagraphs'`` also replays each block's kernels as a CUDA graph (inductor's
    ``reduce-overhead``): one launch per block instead of dozens, for hosts too slow to keep a small
    step's GPU busy. Callers then mark each training step and evaluation batch (``begin_graph_step``).
    """
    import torch._dynamo

    global _graph_trees_in_use
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "blocks-cudagraphs":
        options.setdefault("mode", "reduce-overhead")
        _graph_trees_in_use = True
    # Past the recompile limit Dynamo would quietly run the block eagerly: fail instead. Every block of
    # every model in the process shares one code object, hence one limit: a reference model, a trained
    # model, grad and no-grad callers and a few row counts are about 8 graphs already; 64 leaves room.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options.setdefault("dynamic", False)
    for block in decoder_blocks(model):
        block.compile(**options)


def begin_graph_step():
    """A training step or evaluation batch begins: with CUDA-graphed blocks, the previous step's graph
    outputs may now be overwritten (``torch.compiler.cudagraph_mark_step_begin``); otherwise nothing."""
    if _graph_trees_in_use:
        torch.compiler.cudagraph_mark_step_begin()


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (its own statistics counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_vocab(model, vocab_size: int):
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(f"the model's embedding has {rows} rows but the tokenizer has {vocab_size} tokens: "
                         "use the tokenizer the model was trained with (--tokenizer)")
