"""How ``CGGRModel`` runs a step: compilation, the loss path, the trained rows' forward, timing.

None of these change which rows are trained (the policy decides that); ``token_ratio < 1`` additionally
keeps only the hardest tokens of the trained rows (``loss_impl='fused'``).
"""
import dataclasses
from typing import Optional, Union

from .policies import short_repr
from .schedule import check_ratio

COMPILE_SCOPES = ("router", "model", "all", "blocks", "blocks-cudagraphs")
BLOCK_SCOPES = ("blocks", "blocks-cudagraphs")
LOSS_IMPLS = ("model", "fused")
FORWARD_IMPLS = ("model", "trunk")


@dataclasses.dataclass(frozen=True, repr=False)
class StepOptions:
    """``compile``: False, True (= 'all'), 'router' (the router trunk), 'model' (the trained rows' forward),
    'all', 'blocks' or 'blocks-cudagraphs'; ``compile_options`` go to ``torch.compile``. The row count is
    fixed per ratio, so shapes are static once the curriculum reaches its floor.

    **The fast step on CUDA is ``compile='blocks-cudagraphs'``**: every decoder block of the model is compiled
    in place (``cggr.compile_blocks``: one graph per shape shared by all blocks, so the first step compiles a
    handful of graphs) and replayed as a CUDA graph, for the router, the trained rows and evaluation alike:
    one launch per block, so a slow host keeps the GPU busy. Its contract: CUDA inputs; static shapes (one
    graph set per row count: use ``warmup_steps=0`` or expect a compilation per new count during the
    warm-up); each call overwrites the previous call's block outputs, so one forward, then its backward,
    per call (gradient accumulation over micro-batches is fine; keep ``.clone()`` of any hidden state you
    hold across calls). The model's blocks stay compiled after training. 'blocks' compiles the same way
    without CUDA graphs (any device). Both raise Dynamo's recompile limit to at least 64 for the process and
    make reaching it an error instead of a silent eager fallback (``cggr.compile_blocks``).

    ``loss_impl``: 'model' (the model's own ``labels=`` loss, exactly Hugging Face's) or 'fused' (the base
    model + ``cggr.linear.fused_linear_selective_ce``: LM head and cross entropy without [k, T, V] logits;
    router families only). ``token_ratio``: with 'fused', train only the hardest ``ceil(token_ratio * n)``
    valid tokens of the selected rows (the policy's token scoring on the full model's statistics).
    ``loss_chunk_size``: ``chunk_size`` of the fused path (None: ``cggr.linear``'s default).

    ``forward_impl``: 'model' (the model's own forward) or 'trunk' (the same modules in the same order
    through ``cggr.router.ModelTrunk``, whose mask is built without ``position_ids``, so that a step with
    ``attention_mask=None`` issues no host synchronisation; router families only; extra inputs limited to
    ``position_ids``, ``token_type_ids`` and ``num_items_in_batch``).

    ``collect_timing``: measure ``router_time_share`` (router + selection time over the step's time up to
    ``CGGRModel.step()``); costs one synchronisation in ``step()``.
    """
    compile: Union[bool, str] = False
    compile_options: Optional[dict] = None
    loss_impl: str = "model"
    token_ratio: float = 1.0
    loss_chunk_size: Optional[int] = None
    forward_impl: str = "model"
    collect_timing: bool = False

    def __post_init__(self):
        if self.compile is not False and self.compile is not True and self.compile not in COMPILE_SCOPES:
            raise ValueError(f"StepOptions.compile must be False, True or one of {COMPILE_SCOPES}, got {self.compile!r}")
        if self.compile_options is not None and not isinstance(self.compile_options, dict):
            raise TypeError(f"StepOptions.compile_options must be a dict or None, got {type(self.compile_options).__name__}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"StepOptions.loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.forward_impl not in FORWARD_IMPLS:
            raise ValueError(f"StepOptions.forward_impl must be one of {FORWARD_IMPLS}, got {self.forward_impl!r}")
        check_ratio("StepOptions.token_ratio", self.token_ratio)
        if self.token_ratio < 1.0 and self.loss_impl != "fused":
            raise ValueError("StepOptions.token_ratio < 1 trains only the hardest tokens of the selected rows "
                             "through cggr.linear: it needs loss_impl='fused'")
        if self.loss_chunk_size is not None and (isinstance(self.loss_chunk_size, bool)
                                                 or not isinstance(self.loss_chunk_size, int)
                                                 or self.loss_chunk_size < 1):
            raise ValueError(f"StepOptions.loss_chunk_size must be None or an int >= 1, got {self.loss_chunk_size!r}")

    def __repr__(self):
        return short_repr(self)

    @property
    def compile_scope(self):
        """False or one of ``COMPILE_SCOPES`` (True means 'all')."""
        return "all" if self.compile is True else self.compile
