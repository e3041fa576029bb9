"""Truncated router: the model's own first ``num_layers`` blocks + final norm + LM head (the logit lens).

``create_truncated_router(model, num_layers=4)`` returns a ``TruncatedRouter`` that scores tokens with a
shallow copy-free view of the model: embeddings (+ position embeddings or rotary as the family needs),
blocks ``0 .. num_layers-1``, the final norm and the LM head. Every tensor is the model's own tensor:
nothing is copied or initialised, and the router registers no parameters, buffers or submodules, so the
wrapped model's parameter count and ``state_dict`` keys are unchanged. The model is held by an adapter
(``cggr.router_adapters``: a plain Python object, not an ``nn.Module``), which is what keeps ``nn.Module``
from registering the model's modules a second time under the router.

The router returns the hidden states after the final norm ``[B, T, H]`` with the LM-head weight (and
bias), so difficulty can be scored chunk by chunk through ``cggr.linear.token_stats_from_hidden``
without materialising ``[B, T, V]`` logits. Where the model's ``ForCausalLM`` forward scales its logits
(Granite ``/ logits_scaling``, Cohere ``* logit_scale``) the scale is folded into ``hidden``; where it
soft-caps them (Gemma 2 ``final_logit_softcapping``) the cap comes as ``RouterOutput.softcap`` (pass it
as ``softcap=`` to ``cggr.linear``), and ``router.logits`` applies it.

Supported: any Hugging Face decoder-only causal LM built from a token embedding, a list of decoder layers,
a final norm and an ``nn.Linear`` LM head (``cggr.router_adapters`` says where it looks and which hooks
the families need). Verified on tiny configs (``ROUTER_ARCHITECTURES``): Llama, Mistral, Qwen2, Qwen3,
GPT-2, GPT-NeoX, Gemma, Gemma 2, Gemma 3, Phi, Phi-3, OLMo 2, Granite, GraniteMoE, Cohere, OPT, Falcon
(rotary and ALiBi), Mixtral, Qwen2-MoE, Qwen3-MoE, Starcoder2; a PEFT wrapper runs its adapted layers
(found through ``get_base_model()``). A model of another shape raises a ``TypeError`` naming what is missing.

``ModelTrunk(model)`` runs the same adapter at full depth: the whole model's hidden states without the
model's forward (``CGGRModel(forward_impl='trunk')``). It refuses the models whose logits are not
``head(hidden)`` or whose labels loss is more than ``loss_function`` (a soft cap, an MoE auxiliary loss
with ``output_router_logits=True``, OPT's LayerDrop). ``SUPPORTED_ARCHITECTURES`` lists the classes for
which both ModelTrunk and ``lm_head(base_model(...))`` (the fused loss) are the model's own logits.

The layer calls follow the installed transformers' model forward (``create_causal_mask`` /
``create_sliding_window_causal_mask``, ``rotary_emb(hidden, position_ids)``, keyword calls of the decoder
layers); the mask helpers' keyword names changed across transformers 5.x releases (``past_key_values``
-> ``cache``, ``cache_position`` dropped), so they are called through ``_MaskCall``, which reads the
installed signature once, when the router is built. The adapters read no tensor on the host; the model's
own modules may (transformers' eager MoE expert loop, the mask helpers given an ``attention_mask``).
"""
import contextlib
from typing import NamedTuple, Optional

import torch
from torch import nn

from .router_adapters import build_adapter, verified_architectures


class RouterOutput(NamedTuple):
    hidden: torch.Tensor            # [B, T, H] after the final norm (and a folded logit scale), model/autocast dtype
    weight: torch.Tensor            # [V, H] the LM head's weight (the model's tensor)
    bias: Optional[torch.Tensor]    # [V] or None
    softcap: Optional[float] = None  # the model's final logit soft cap c (logits = c * tanh(logits / c)), or None


# Classes verified for the router (tests/test_router_families.py).
ROUTER_ARCHITECTURES = verified_architectures()
# Classes for which ModelTrunk and the fused loss are exact: lm_head(base_model(...)) is the model's logits.
SUPPORTED_ARCHITECTURES = verified_architectures(exact_head=True)


class TruncatedRouter(nn.Module):
    """Logit lens at depth ``num_layers`` of ``model``, sharing every tensor with it.

    ``router(input_ids, attention_mask=None, position_ids=None, token_type_ids=None) -> RouterOutput``.
    Padding follows ``attention_mask`` (1 = token, 0 = pad; left or right) exactly as the model's forward
    does; ``position_ids`` default to 0 .. T-1 like the model's.

    Scoring is a measurement, not training: while ``deterministic`` (default) the router runs the shared
    modules in eval mode (no dropout, no gradient checkpointing) and restores each module's flag after,
    so the model's own forward is unaffected. The caller chooses the grad mode (``CGGRModel`` runs it
    under ``torch.no_grad``).
    """

    def __init__(self, model, num_layers: int = 4, deterministic: bool = True):
        super().__init__()
        name = type(model).__name__
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"num_layers must be an int, got {num_layers!r}")
        adapter = build_adapter(model, num_layers, "create_truncated_router")
        depth = adapter.depth()
        if not 1 <= num_layers < depth:
            raise ValueError(f"num_layers must be >= 1 and < the model's depth ({depth} blocks in {name}), "
                             f"got {num_layers}")
        if not deterministic and adapter.training_problem():
            raise ValueError(f"create_truncated_router(deterministic=False): {name}: {adapter.training_problem()}")
        # Plain attribute (adapter is not an nn.Module): nothing of the model is registered here.
        self.adapter = adapter
        self.num_layers = num_layers
        self.deterministic = bool(deterministic)

    @property
    def model(self):
        return self.adapter.model

    @property
    def family(self):
        """The model's ``config.model_type`` (the hooks ``cggr.router_adapters.FAMILIES`` applies)."""
        return self.adapter.family

    @property
    def logit_softcap(self) -> Optional[float]:
        """The model's final logit soft cap (Gemma 2), or None: score ``c * tanh(head(hidden) / c)``."""
        return self.adapter.softcap

    def shared_modules(self):
        return list(self.adapter.modules())

    @contextlib.contextmanager
    def scoring_mode(self):
        """Eval mode on the shared modules for the duration (when ``deterministic``), flags restored after."""
        if not (self.deterministic and self.adapter.model.training):
            yield
            return
        saved = [(m, m.training) for root in self.adapter.modules() for m in root.modules()]
        for m, _ in saved:
            m.training = False
        try:
            yield
        finally:
            for m, flag in saved:
                m.training = flag

    def trunk(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None):
        """Hidden states after the final norm (and a folded logit scale), [B, T, H]. No mode switching
        (``forward`` adds it), so that ``CGGRModel`` can ``torch.compile`` exactly this function."""
        return self.adapter.trunk(input_ids, attention_mask, position_ids, token_type_ids)

    def head_params(self):
        head = self.adapter.head()
        return head.weight, head.bias

    def forward(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None) -> RouterOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
        with self.scoring_mode():
            hidden = self.trunk(input_ids, attention_mask, position_ids, token_type_ids)
        return RouterOutput(hidden, *self.head_params(), self.adapter.softcap)

    def logits(self, input_ids, **kwargs):
        """Full [B, T, V] logits of the logit lens, soft cap included (tests, inspection; training uses the
        chunked path)."""
        out = self(input_ids, **kwargs)
        logits = nn.functional.linear(out.hidden, out.weight, out.bias)
        if out.softcap is not None:
            logits = torch.tanh(logits / out.softcap) * out.softcap
        return logits

    def extra_repr(self):
        return f"{type(self.model).__name__}, num_layers={self.num_layers}, deterministic={self.deterministic}"


class ModelTrunk:
    """The whole model's hidden states after the final norm, through the router's adapter at full depth.

    ``trunk(input_ids, attention_mask=None, position_ids=None, token_type_ids=None) -> [B, T, H]``: the
    model's own modules in the order of its forward (embedding dropout and the blocks follow their
    train/eval mode, as there), so that ``lm_head(trunk(...))`` is the model's logits. The difference is
    the mask call: it gets the caller's ``position_ids`` (None by default) where the model's forward
    passes 0 .. T-1, which in transformers 5.x makes the mask helper check for packed sequences and read
    the answer on the host. Without ``attention_mask`` this trunk therefore issues no host
    synchronisation. ``CGGRModel(forward_impl='trunk')`` trains through it.

    Where the model's forward scales its logits linearly (Granite, Cohere) the scale is folded into the
    returned hidden states. A model whose logits or loss are more than that (a final logit soft cap, an MoE
    load-balancing loss with ``output_router_logits=True``, OPT's LayerDrop) raises a ``TypeError`` here;
    ``create_truncated_router`` still works for it.
    """

    def __init__(self, model):
        depth = build_adapter(model, 1, "ModelTrunk").depth()
        self.adapter = build_adapter(model, depth, "ModelTrunk")
        problem = self.adapter.trunk_problem()
        if problem:
            raise TypeError(f"ModelTrunk: {type(model).__name__}: {problem}; use the model's own forward "
                            "(StepOptions(forward_impl='model'))")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None):
        return self.adapter.trunk(input_ids, attention_mask, position_ids, token_type_ids)

    def head(self):
        """The model's LM head (an ``nn.Linear``)."""
        return self.adapter.head()

    def labels_loss(self, logits, labels, **loss_kwargs):
        """The model's own ``labels=`` loss on ``logits``: ``model.loss_function`` as the supported
        families' forwards call it (HF ForCausalLMLoss: float32, shifted); ``loss_kwargs`` such as
        ``num_items_in_batch`` go to it."""
        model = self.adapter.model
        return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **loss_kwargs)


def create_truncated_router(model, num_layers: int = 4, deterministic: bool = True) -> TruncatedRouter:
    """Router over ``model``'s first ``num_layers`` blocks, final norm and LM head (shared tensors)."""
    return TruncatedRouter(model, num_layers=num_layers, deterministic=deterministic)
