"""Regional compilation: ``torch.compile`` each decoder block in place, optionally as CUDA graphs.

Why per block: the blocks of a decoder share one code object and (with Dynamo's inlined module
parameters) one graph per (input shape, grad mode), so a 30-block model compiles a handful of graphs
instead of one whole-model graph, and whoever calls the blocks (the training forward, the router, which runs
the model's own first blocks, and evaluation) runs them compiled. With ``cuda_graphs=True`` inductor's
``reduce-overhead`` mode replays each block as one CUDA graph: one launch per block instead of dozens, the
step a slow host can keep up with. Graph outputs are then overwritten by the next replay: a new training step
or evaluation batch is announced with ``begin_graph_step()`` (``CGGRModel`` does it at every call).

Gradient accumulation: autograd installs a parameter's first gradient as ``.grad`` without a copy, and with
CUDA graphs that gradient is graph memory, which the next micro-batch's backward replay overwrites before
adding to it (pytorch/pytorch#169545: an error, or in older versions wrong gradients). So
``begin_graph_step()`` first replaces every gradient still held in graph memory by a copy: one copy per
parameter per accumulation window, nothing when the gradients were cleared (no accumulation).
"""
import weakref

import torch
from torch import nn

from .router_adapters import DecoderAdapter, _unwrapped

# Every block of every model in the process shares one code object, hence one recompile limit: a reference
# model, a trained model, grad and no-grad callers and a few row counts are about 8 graphs already.
RECOMPILE_LIMIT = 64

_graph_trees_in_use = False
# the parameters of CUDA-graphed blocks (weakly: a model that goes away takes them with it)
_graphed_parameters: "weakref.WeakValueDictionary[int, nn.Parameter]" = weakref.WeakValueDictionary()


def decoder_blocks(model: nn.Module, caller: str = "compile_decoder_blocks") -> nn.ModuleList:
    """The repeated decoder blocks of a Hugging Face causal LM (a PEFT wrapper's adapted blocks included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    _, _, layers = DecoderAdapter._find_layers(_unwrapped(model), caller, type(model).__name__)
    return layers


def compile_decoder_blocks(model: nn.Module, cuda_graphs: bool = False, **options) -> int:
    """Compile every decoder block of ``model`` in place (``nn.Module.compile``); returns how many.

    ``options`` go to ``torch.compile``; ``dynamic`` defaults to False (static shapes: each row count is its
    own graph, the fastest kernels; keep one row count, e.g. ``warmup_steps=0``, to compile only at the
    start). ``cuda_graphs=True`` sets ``mode='reduce-overhead'`` (CUDA graphs; CUDA tensors only); callers
    that run the blocks outside ``CGGRModel`` call ``begin_graph_step()`` before each step. Past the
    recompile limit Dynamo would quietly run a block eagerly: it raises instead.
    """
    import torch._dynamo

    global _graph_trees_in_use
    if cuda_graphs:
        if options.get("mode", "reduce-overhead") != "reduce-overhead":
            raise ValueError(f"cuda_graphs=True compiles with mode='reduce-overhead', got compile option "
                             f"mode={options['mode']!r}")
        options["mode"] = "reduce-overhead"
        _graph_trees_in_use = True
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options.setdefault("dynamic", False)
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(**options)
        if cuda_graphs:
            for parameter in block.parameters():
                _graphed_parameters[id(parameter)] = parameter
    return len(blocks)


def own_accumulated_gradients() -> int:
    """Replace each gradient of a CUDA-graphed block's parameter that may still be graph memory (autograd
    installed it without a copy) by a copy, so that the next replay cannot overwrite it while it is
    accumulating; returns how many were copied. A copy is marked and kept until the gradient is cleared."""
    copied = 0
    for parameter in list(_graphed_parameters.values()):
        grad = parameter.grad
        if grad is not None and not getattr(grad, "_cggr_owned", False):
            grad = grad.clone()
            grad._cggr_owned = True
            parameter.grad = grad
            copied += 1
    return copied


def begin_graph_step():
    """A training step or evaluation batch begins: with CUDA-graphed blocks, the previous step's graph
    outputs may now be overwritten (``torch.compiler.cudagraph_mark_step_begin``); otherwise nothing."""
    if _graph_trees_in_use:
        own_accumulated_gradients()
        torch.compiler.cudagraph_mark_step_begin()


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (its own statistics counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def begin_graph_call(device: torch.device, caller: str):
    """``CGGRModel`` with ``StepOptions(compile='blocks-cudagraphs')``: a call begins (``begin_graph_step``),
    on a CUDA device (inductor would otherwise skip the graphs and run the blocks without them)."""
    if device.type != "cuda":
        raise ValueError(f"{caller}: StepOptions(compile='blocks-cudagraphs') replays CUDA graphs, so input_ids "
                         f"must be on a CUDA device, got {device}; use compile='blocks' on other devices")
    own_accumulated_gradients()
    torch.compiler.cudagraph_mark_step_begin()
