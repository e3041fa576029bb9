"""Truncated router: the model's own first ``num_layers`` blocks + final norm + LM head (the logit lens).

``create_truncated_router(model, num_layers=4)`` returns a ``TruncatedRouter`` that scores tokens with a
shallow copy-free view of the model: embeddings (+ position embeddings or rotary as the family needs),
blocks ``0 .. num_layers-1``, the final norm and the LM head. Every tensor is the model's own tensor:
nothing is copied or initialised, and the router registers no parameters, buffers or submodules, so the
wrapped model's parameter count and ``state_dict`` keys are unchanged. The model is held by a small
per-family adapter (a plain Python object, not an ``nn.Module``), which is what keeps ``nn.Module``
from registering the model's modules a second time under the router.

The router returns the hidden states after the final norm ``[B, T, H]`` with the LM-head weight (and
bias), so difficulty can be scored chunk by chunk through ``cggr.linear.token_stats_from_hidden``
without materialising ``[B, T, V]`` logits.

Supported families (one adapter each):

- HF Llama family: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM`` (SmolLM is Llama)
- ``GPT2LMHeadModel``
- ``GPTNeoXForCausalLM``

Any other class raises a ``TypeError`` naming it. ``ModelTrunk(model)`` runs the same adapters at full
depth: the whole model's hidden states without the model's forward (``CGGRModel(forward_impl='trunk')``).

The layer calls follow the installed transformers' model forward (``create_causal_mask`` /
``create_sliding_window_causal_mask``, ``rotary_emb(hidden, position_ids)``, keyword calls of the decoder
layers); the mask helpers' keyword names changed across transformers 5.x releases (``past_key_values``
-> ``cache``, ``cache_position`` dropped), so they are called through ``_MaskCall``, which reads the
installed signature once, when the router is built.
"""
import contextlib
import inspect
from typing import NamedTuple, Optional

import torch
from torch import nn


class RouterOutput(NamedTuple):
    hidden: torch.Tensor            # [B, T, H] after the final norm, in the model's (or autocast) dtype
    weight: torch.Tensor            # [V, H] the LM head's weight (the model's tensor)
    bias: Optional[torch.Tensor]    # [V] or None


class _MaskCall:
    """A transformers mask helper for a cache-free full-sequence forward, whatever its 5.x keyword names.

    The signature is read once here, on the host: the call itself (traced by torch.compile when the
    router is compiled) is then a plain keyword call.
    """

    def __init__(self, fn):
        params = frozenset(inspect.signature(fn).parameters)
        self.fn = fn
        self.embeds_name = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
        self.cache_names = tuple(name for name in ("cache", "past_key_values") if name in params)
        # Older 5.x releases take the absolute positions of the queries in the cache; without a cache
        # they are simply 0 .. T-1.
        self.needs_cache_position = "cache_position" in params
        self.takes_position_ids = "position_ids" in params

    def __call__(self, config, inputs_embeds, attention_mask, position_ids):
        kwargs = {"config": config, "attention_mask": attention_mask, self.embeds_name: inputs_embeds}
        for name in self.cache_names:
            kwargs[name] = None
        if self.needs_cache_position:
            kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        if self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        return self.fn(**kwargs)


def _mask_calls():
    from transformers import masking_utils

    return {"full_attention": _MaskCall(masking_utils.create_causal_mask),
            "sliding_attention": _MaskCall(masking_utils.create_sliding_window_causal_mask)}


# The mask helpers get the CALLER's position_ids (None when not given): with position_ids and no
# attention_mask, transformers looks for packed sequences and reads the answer on the host (a sync per
# call); default positions 0 .. T-1 can never be packed, so None gives the same mask without that sync.
def _default_position_ids(inputs_embeds):
    # What the models' forwards do without a cache: 0 .. T-1, broadcast over the batch.
    return torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)


class _Adapter:
    """Per-family access to the shared modules. Plain object on purpose: see the module docstring."""

    family = ""

    def __init__(self, model, num_layers):
        self.model = model
        self.num_layers = num_layers
        self.mask_calls = _mask_calls()

    def depth(self):
        raise NotImplementedError

    def modules(self):
        """Every module the router runs (for train/eval toggling and tensor-sharing checks)."""
        raise NotImplementedError

    def head(self):
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{type(self.model).__name__}: expected an nn.Linear LM head from "
                            f"get_output_embeddings(), got {type(head).__name__}")
        return head

    def trunk(self, input_ids, attention_mask, position_ids, token_type_ids):
        raise NotImplementedError


class _LlamaFamilyAdapter(_Adapter):
    """LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM: ``model.model.*``."""

    family = "llama"

    def __init__(self, model, num_layers):
        super().__init__(model, num_layers)
        self.base = model.model
        self.config = self.base.config
        self.layer_kinds = self._layer_kinds()
        self.mask_kinds = sorted(set(self.layer_kinds))

    def _layer_kinds(self):
        # Mirror each model forward's mask choice: Qwen2/Qwen3 read config.layer_types per layer;
        # Mistral uses the sliding-window mask for every layer when config.sliding_window is set;
        # Llama is always full causal.
        name = type(self.model).__name__
        n = self.num_layers
        if name.startswith("Qwen"):
            return list(self.config.layer_types[:n])
        if name.startswith("Mistral") and getattr(self.config, "sliding_window", None) is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def depth(self):
        return len(self.base.layers)

    def modules(self):
        return [self.base.embed_tokens, self.base.rotary_emb, *self.base.layers[: self.num_layers],
                self.base.norm, self.head()]

    def trunk(self, input_ids, attention_mask, position_ids, token_type_ids):
        if token_type_ids is not None:
            raise ValueError(f"{type(self.model).__name__} takes no token_type_ids")
        hidden = self.base.embed_tokens(input_ids)
        masks = {kind: self.mask_calls[kind](self.config, hidden, attention_mask, position_ids)
                 for kind in self.mask_kinds}
        if position_ids is None:
            position_ids = _default_position_ids(hidden)
        position_embeddings = self.base.rotary_emb(hidden, position_ids)
        for layer, kind in zip(self.base.layers[: self.num_layers], self.layer_kinds):
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return self.base.norm(hidden)


class _GPT2Adapter(_Adapter):
    """GPT2LMHeadModel: ``model.transformer.{wte, wpe, h, ln_f}``."""

    family = "gpt2"

    def __init__(self, model, num_layers):
        super().__init__(model, num_layers)
        self.base = model.transformer
        self.config = self.base.config

    def depth(self):
        return len(self.base.h)

    def modules(self):
        return [self.base.wte, self.base.wpe, self.base.drop, *self.base.h[: self.num_layers], self.base.ln_f,
                self.head()]

    def trunk(self, input_ids, attention_mask, position_ids, token_type_ids):
        inputs_embeds = self.base.wte(input_ids)
        mask = self.mask_calls["full_attention"](self.config, inputs_embeds, attention_mask, position_ids)
        if position_ids is None:
            position_ids = _default_position_ids(inputs_embeds)
        # Same order as GPT2Model.forward: token + position embeddings, then (optional) token types.
        hidden = inputs_embeds + self.base.wpe(position_ids)
        if token_type_ids is not None:
            hidden = hidden + self.base.wte(token_type_ids)
        hidden = self.base.drop(hidden)  # a no-op in eval mode (scoring), as in the model's forward in training
        for block in self.base.h[: self.num_layers]:
            hidden = block(hidden, attention_mask=mask, position_ids=position_ids)
        return self.base.ln_f(hidden)


class _GPTNeoXAdapter(_Adapter):
    """GPTNeoXForCausalLM: ``model.gpt_neox.{embed_in, rotary_emb, layers, final_layer_norm}``."""

    family = "gpt_neox"

    def __init__(self, model, num_layers):
        super().__init__(model, num_layers)
        self.base = model.gpt_neox
        self.config = self.base.config

    def depth(self):
        return len(self.base.layers)

    def modules(self):
        return [self.base.embed_in, self.base.emb_dropout, self.base.rotary_emb,
                *self.base.layers[: self.num_layers], self.base.final_layer_norm, self.head()]

    def trunk(self, input_ids, attention_mask, position_ids, token_type_ids):
        if token_type_ids is not None:
            raise ValueError(f"{type(self.model).__name__} takes no token_type_ids")
        inputs_embeds = self.base.embed_in(input_ids)
        mask = self.mask_calls["full_attention"](self.config, inputs_embeds, attention_mask, position_ids)
        if position_ids is None:
            position_ids = _default_position_ids(inputs_embeds)
        hidden = self.base.emb_dropout(inputs_embeds)  # a no-op in eval mode, as in the model's forward
        position_embeddings = self.base.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.base.layers[: self.num_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return self.base.final_layer_norm(hidden)


# Exact class names (not isinstance): a subclass may change the forward in ways the adapter would not see.
_ADAPTERS = {
    "LlamaForCausalLM": _LlamaFamilyAdapter,
    "MistralForCausalLM": _LlamaFamilyAdapter,
    "Qwen2ForCausalLM": _LlamaFamilyAdapter,
    "Qwen3ForCausalLM": _LlamaFamilyAdapter,
    "GPT2LMHeadModel": _GPT2Adapter,
    "GPTNeoXForCausalLM": _GPTNeoXAdapter,
}
SUPPORTED_ARCHITECTURES = tuple(_ADAPTERS)


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
        adapter_cls = _adapter_class(model, "create_truncated_router")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"num_layers must be an int, got {num_layers!r}")
        adapter = adapter_cls(model, num_layers)
        depth = adapter.depth()
        if not 1 <= num_layers < depth:
            raise ValueError(f"num_layers must be >= 1 and < the model's depth ({depth} blocks in {name}), "
                             f"got {num_layers}")
        # Plain attribute (adapter is not an nn.Module): nothing of the model is registered here.
        self.adapter = adapter
        self.num_layers = num_layers
        self.deterministic = bool(deterministic)

    @property
    def model(self):
        return self.adapter.model

    @property
    def family(self):
        return self.adapter.family

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
        """Hidden states after the final norm, [B, T, H]. No mode switching (``forward`` adds it), so that
        ``CGGRModel`` can ``torch.compile`` exactly this function."""
        return self.adapter.trunk(input_ids, attention_mask, position_ids, token_type_ids)

    def head_params(self):
        head = self.adapter.head()
        return head.weight, head.bias

    def forward(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None) -> RouterOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, T], got shape {tuple(input_ids.shape)}")
        with self.scoring_mode():
            hidden = self.trunk(input_ids, attention_mask, position_ids, token_type_ids)
        return RouterOutput(hidden, *self.head_params())

    def logits(self, input_ids, **kwargs):
        """Full [B, T, V] logits of the logit lens (tests, inspection; training uses the chunked path)."""
        out = self(input_ids, **kwargs)
        return nn.functional.linear(out.hidden, out.weight, out.bias)

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
    """

    def __init__(self, model):
        adapter_cls = _adapter_class(model, "ModelTrunk")
        depth = adapter_cls(model, 1).depth()
        self.adapter = adapter_cls(model, depth)

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


def _adapter_class(model, caller):
    adapter_cls = _ADAPTERS.get(type(model).__name__)
    if adapter_cls is None:
        raise TypeError(f"{caller}: unsupported architecture {type(model).__name__}; looked for one of "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (exact class name)")
    return adapter_cls


def create_truncated_router(model, num_layers: int = 4, deterministic: bool = True) -> TruncatedRouter:
    """Router over ``model``'s first ``num_layers`` blocks, final norm and LM head (shared tensors)."""
    return TruncatedRouter(model, num_layers=num_layers, deterministic=deterministic)
