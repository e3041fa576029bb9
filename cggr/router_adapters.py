"""How ``cggr.router`` drives a Hugging Face decoder-only model: one generic adapter, small per-family hooks.

A model is supported when it is built from a token embedding, a list of decoder layers, a final norm and
an LM head (``nn.Linear``), found at the usual places (``BASE_PATHS`` x ``LAYER_NAMES`` / ``NORM_NAMES`` /
``EMBED_NAMES``). ``DecoderAdapter.trunk`` then does what the installed transformers' model forwards do
(read from ``models/<family>/modeling_<family>.py`` of transformers 5.x): embed, build the attention mask(s)
with ``masking_utils``, rotary position embeddings from the base's own ``rotary_emb``, call the model's own
decoder-layer modules with keyword arguments, final norm. What a family's forward does beyond that is a
hook, declared in ``FAMILIES`` (keyed by ``config.model_type``):

- ``masks``: which mask each layer gets: ``'full'`` (causal), ``'sliding_window'`` (one mask for every
  layer, sliding when ``config.sliding_window`` is set: Mistral, Mixtral, Phi-3, ...) or ``'layer_types'``
  (``config.layer_types[i]``: Qwen2/3, Qwen2-MoE, Gemma 2/3, ...).
- ``dropout``: the base's dropout module applied to the embeddings before the layers (GPT-2, GPT-NeoX, Phi).
- ``hooks``: an adapter subclass, for GPT-2 (learned positions, token types), OPT (positions from the
  attention mask, ``project_in``/``project_out``, optional final norm), Falcon (ALiBi folded into the mask)
  and Granite / Cohere (embedding multiplier, logit scaling).

Logit transforms of the ``ForCausalLM`` forward: a linear one (Granite ``logits / logits_scaling``, Cohere
``logits * logit_scale``) is folded into the returned hidden states, so ``head(hidden)`` stays the model's
logits; a soft cap (Gemma 2 ``final_logit_softcapping``) cannot be, and is reported as ``softcap``.

A model type not in ``FAMILIES`` runs the generic path when its shape matches and nothing in it asks for
more: its mask rule is read from its base model's forward source, and it is refused (naming the reason)
when its decoder holds modules the path would not run, or its config sets a known extra (multipliers,
logit scales, ALiBi). Gemma-style embedding scaling lives in the embedding module and needs no hook.

Nothing here reads a tensor on the host: every branch is on the config, module structure or shapes.
"""
import importlib
import inspect
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

BASE_PATHS = ("model", "model.decoder", "transformer", "gpt_neox")
LAYER_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")
# Config entries that change a forward outside the layers: a model type without a hook for them is refused.
_EXTRA_CONFIG = ("embedding_multiplier", "logits_scaling", "logit_scale", "scale_emb", "dim_model_base",
                 "embedding_scale", "output_multiplier", "lm_head_multiplier", "alibi", "use_alibi")


class _MaskCall:
    """A transformers mask helper for a cache-free full-sequence forward, whatever its 5.x keyword names.

    The signature is read once here, on the host: the call itself (traced by torch.compile when the
    router is compiled) is then a plain keyword call.
    """

    def __init__(self, fn):
        params = frozenset(inspect.signature(fn).parameters)
        self.fn = fn
        self.params = params
        self.embeds_name = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
        self.cache_names = tuple(name for name in ("cache", "past_key_values") if name in params)
        # Older 5.x releases take the absolute positions of the queries in the cache; without a cache
        # they are simply 0 .. T-1.
        self.needs_cache_position = "cache_position" in params
        self.takes_position_ids = "position_ids" in params

    def __call__(self, config, inputs_embeds, attention_mask, position_ids, **extra):
        kwargs = {"config": config, "attention_mask": attention_mask, self.embeds_name: inputs_embeds}
        for name in self.cache_names:
            kwargs[name] = None
        if self.needs_cache_position:
            kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        if self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        kwargs.update((k, v) for k, v in extra.items() if k in self.params)
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


def _attr(root, path):
    for name in path.split(".") if path else ():
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def _unwrapped(model):
    """The transformers model under a PEFT wrapper (``get_base_model()``): its layers hold the adapters."""
    get = getattr(model, "get_base_model", None)
    inner = get() if callable(get) else None
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def _path(base_path, name):
    return ".".join(("model", base_path, name) if base_path else ("model", name))


class DecoderAdapter:
    """The model's own modules, run in the order of its forward. A plain object (not an ``nn.Module``), so
    that the router holding it registers nothing of the model a second time."""

    extra_children = ()  # modules of the base a hook runs (besides embedding, layers, norm, rotary, dropout)
    norm_optional = False

    def __init__(self, model, num_layers, caller, family):
        self.model = model
        self.num_layers = num_layers
        self.family = family.name
        self.caller = caller
        name = type(model).__name__
        self.base, self.base_path, self.layers = self._find_layers(_unwrapped(model), caller, name)
        self.config = getattr(self.base, "config", model.config)
        self.embed_tokens = self._find_embedding(caller, name)
        self.norm = self._find(NORM_NAMES)
        if self.norm is None and not self.norm_optional:
            raise TypeError(f"{caller}: unsupported architecture {name}: no final norm found at "
                            + " / ".join(_path(self.base_path, n) for n in NORM_NAMES))
        self.rotary = getattr(self.base, "rotary_emb", None)
        self.rotary_per_kind = self.rotary is not None and "layer_type" in inspect.signature(
            self.rotary.forward).parameters
        self.dropout = getattr(self.base, family.dropout) if family.dropout else None
        self._check_children(caller, name, family)
        self._check_layer_call(caller, name)
        self.mask_calls = _mask_calls()
        self.layer_kinds = self._layer_kinds(family.masks)
        self.mask_kinds = sorted(set(self.layer_kinds))
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.head()  # an nn.Linear LM head, checked at construction
        if getattr(model.config, "use_bidirectional_attention", False):
            raise TypeError(f"{caller}: {name} is configured with use_bidirectional_attention=True: not a causal LM")

    # -- structure ------------------------------------------------------------------------------------
    @staticmethod
    def _find_layers(model, caller, name):
        paths = list(BASE_PATHS)
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and prefix not in paths:
            paths.insert(0, prefix)
        paths.append("")  # a base model itself (then without an LM head)
        for path in paths:
            base = _attr(model, path)
            if not isinstance(base, nn.Module):
                continue
            for layer_name in LAYER_NAMES:
                layers = getattr(base, layer_name, None)
                if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                    return base, path, layers
        tried = " / ".join(_path(p, n) for p in paths for n in LAYER_NAMES)
        raise TypeError(f"{caller}: unsupported architecture {name}: no list of decoder layers (nn.ModuleList) "
                        f"found at {tried}")

    def _find(self, names):
        for n in names:
            module = getattr(self.base, n, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def _find_embedding(self, caller, name):
        found = self._find(EMBED_NAMES)
        if isinstance(found, nn.Embedding):
            return found
        raise TypeError(f"{caller}: unsupported architecture {name}: no token embedding (nn.Embedding) found at "
                        + " / ".join(_path(self.base_path, n) for n in EMBED_NAMES))

    def _check_children(self, caller, name, family):
        known = {id(m) for m in (self.embed_tokens, self.layers, self.norm, self.rotary, self.dropout) if m is not None}
        unknown = [n for n, child in self.base.named_children()
                   if id(child) not in known and n not in self.extra_children]
        if unknown:
            raise TypeError(f"{caller}: unsupported architecture {name}: its decoder {type(self.base).__name__} "
                            f"holds modules the router would not run ({', '.join(unknown)}); model type "
                            f"{family.name!r} has no hook for them")

    def _check_layer_call(self, caller, name):
        params = inspect.signature(self.layers[0].forward).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        names = {p.name for p in params}
        wanted = {"attention_mask", "position_ids"} | ({"position_embeddings"} if self.rotary is not None else set())
        missing = sorted(wanted - names)
        if missing:
            raise TypeError(f"{caller}: unsupported architecture {name}: its decoder layer "
                            f"{type(self.layers[0]).__name__} takes no {', '.join(missing)}")

    def _layer_kinds(self, rule):
        n, config = self.num_layers, self.config
        if rule == "layer_types":
            return list(config.layer_types[:n])
        if rule == "sliding_window" and getattr(config, "sliding_window", None) is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def depth(self):
        return len(self.layers)

    def modules(self):
        """Every module the router runs (for train/eval toggling and tensor-sharing checks)."""
        before = [self.embed_tokens, *self._extra_modules("before"), self.dropout, self.rotary]
        after = [self.norm, *self._extra_modules("after"), self.head()]
        return [m for m in (*before, *self.layers[: self.num_layers], *after) if m is not None]

    def _extra_modules(self, where):
        return []

    def head(self):
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            kind = type(head)
            raise TypeError(f"{type(self.model).__name__}: expected an nn.Linear LM head from "
                            f"get_output_embeddings(), got {kind.__module__}.{kind.__qualname__} (an adapter "
                            "on the LM head, e.g. LoRA, is not a plain nn.Linear)")
        return head

    def trunk_problem(self):
        """Why the whole model's forward is not ``head(trunk(...))`` plus the labels loss (None when it is)."""
        if self.softcap is not None:
            return (f"final_logit_softcapping={self.softcap}: the model's logits are soft-capped after the LM head, "
                    "so head(hidden) is not its logits (the router reports the cap as RouterOutput.softcap)")
        if getattr(self.model.config, "output_router_logits", False):
            return ("output_router_logits=True: the model's labels loss adds the MoE load-balancing loss "
                    "(router_aux_loss_coef), which ModelTrunk does not compute")
        return None

    def training_problem(self):
        """Why the router cannot follow the model's forward in training mode (None when it can)."""
        return None

    # -- the forward ------------------------------------------------------------------------------------
    def embed(self, input_ids, token_type_ids):
        if token_type_ids is not None:
            raise ValueError(f"{type(self.model).__name__} takes no token_type_ids")
        return self.embed_tokens(input_ids)

    def prepare(self, hidden, attention_mask, position_ids, token_type_ids):
        """-> (hidden, {kind: mask}, position_ids, extra layer kwargs), as the model's forward."""
        masks = {kind: self.mask_calls[kind](self.config, hidden, attention_mask, position_ids)
                 for kind in self.mask_kinds}
        if position_ids is None:
            position_ids = _default_position_ids(hidden)
        if self.dropout is not None:
            hidden = self.dropout(hidden)  # a no-op in eval mode (scoring), as in the model's forward in training
        return hidden, masks, position_ids, {}

    def finish(self, hidden):
        return self.norm(hidden)

    def trunk(self, input_ids, attention_mask, position_ids, token_type_ids):
        hidden = self.embed(input_ids, token_type_ids)
        hidden, masks, position_ids, extra = self.prepare(hidden, attention_mask, position_ids, token_type_ids)
        rope = None
        if self.rotary_per_kind:  # Gemma 3: one rotary embedding per attention type
            rope = {kind: self.rotary(hidden, position_ids, kind) for kind in self.mask_kinds}
        elif self.rotary is not None:
            shared = self.rotary(hidden, position_ids=position_ids)
            rope = dict.fromkeys(self.mask_kinds, shared)
        for layer, kind in zip(self.layers[: self.num_layers], self.layer_kinds):
            if rope is not None:
                extra["position_embeddings"] = rope[kind]
            out = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, **extra)
            hidden = out[0] if isinstance(out, tuple) else out  # Falcon's layers return (hidden, attentions)
        return self.finish(hidden)


class _GPT2Hooks(DecoderAdapter):
    """GPT-2: learned positions ``wpe`` and token types (through ``wte``) added before the dropout ``drop``."""

    extra_children = ("wpe",)

    def embed(self, input_ids, token_type_ids):
        return self.embed_tokens(input_ids)

    def _extra_modules(self, where):
        return [self.base.wpe] if where == "before" else []

    def prepare(self, hidden, attention_mask, position_ids, token_type_ids):
        mask = self.mask_calls["full_attention"](self.config, hidden, attention_mask, position_ids)
        if position_ids is None:
            position_ids = _default_position_ids(hidden)
        # Same order as GPT2Model.forward: token + position embeddings, then (optional) token types.
        hidden = hidden + self.base.wpe(position_ids)
        if token_type_ids is not None:
            hidden = hidden + self.embed_tokens(token_type_ids)
        return self.dropout(hidden), {"full_attention": mask}, position_ids, {}


class _OPTHooks(DecoderAdapter):
    """OPT: positions from the attention mask (``embed_positions``, offset 2), ``project_in`` / ``project_out``
    around the layers, the final norm only with ``do_layer_norm_before`` (OPT-350m has none), no
    ``position_ids`` to the mask helper (as OPTDecoder.forward). LayerDrop is not reproduced."""

    extra_children = ("embed_positions", "project_in", "project_out")
    norm_optional = True

    def _extra_modules(self, where):
        mods = [self.base.embed_positions, self.base.project_in] if where == "before" else [self.base.project_out]
        return [m for m in mods if m is not None]

    def training_problem(self):
        layerdrop = getattr(self.config, "layerdrop", 0.0)
        if layerdrop > 0:
            return (f"layerdrop={layerdrop}: OPT's forward skips layers at random in training, deciding on the host "
                    "per layer; the router and ModelTrunk run every layer")
        return None

    def trunk_problem(self):
        return super().trunk_problem() or self.training_problem()

    def prepare(self, hidden, attention_mask, position_ids, token_type_ids):
        position_mask = attention_mask
        if position_mask is None:
            position_mask = torch.ones(hidden.shape[0], hidden.shape[1], device=hidden.device)
        if position_ids is None:
            position_ids = (torch.cumsum(position_mask, dim=1) * position_mask - 1).long()
        mask = self.mask_calls["full_attention"](self.config, hidden, attention_mask, None)
        pos_embeds = self.base.embed_positions(position_mask, 0, position_ids=position_ids)
        if self.base.project_in is not None:
            hidden = self.base.project_in(hidden)
        return hidden + pos_embeds.to(hidden.device), {"full_attention": mask}, position_ids, {}

    def finish(self, hidden):
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.base.project_out is not None:
            hidden = self.base.project_out(hidden)
        return hidden


class _FalconHooks(DecoderAdapter):
    """Falcon: with ``config.alibi`` the ALiBi bias (from the attention mask) is folded into an always
    materialised mask and passed to every layer; rotary otherwise (both as FalconModel.forward)."""

    def __init__(self, model, num_layers, caller, family):
        super().__init__(model, num_layers, caller, family)
        # the model's own ALiBi builder, looked up once (not inside the traced forward)
        self.build_alibi = importlib.import_module(type(self.base).__module__).build_alibi_tensor

    def prepare(self, hidden, attention_mask, position_ids, token_type_ids):
        batch_size, seq_length = hidden.shape[:2]
        alibi = None
        if self.base.use_alibi:
            mask = (torch.ones((batch_size, seq_length), device=hidden.device, dtype=torch.long)
                    if attention_mask is None else attention_mask)
            alibi = self.build_alibi(mask, self.base.num_heads, dtype=hidden.dtype)
        causal_mask = self.mask_calls["full_attention"](self.config, hidden, attention_mask, position_ids,
                                                        allow_is_causal_skip=False)
        if position_ids is None:
            position_ids = _default_position_ids(hidden)
        if alibi is not None and causal_mask is not None and causal_mask.ndim == 4:
            min_dtype = torch.finfo(hidden.dtype).min
            if causal_mask.dtype == torch.bool:
                causal_mask = torch.where(causal_mask, torch.full((), 0.0, device=causal_mask.device,
                                                                  dtype=hidden.dtype), min_dtype)
            alibi = alibi.reshape(batch_size, -1, *alibi.shape[1:])
            causal_mask = torch.masked_fill(alibi / math.sqrt(self.config.hidden_size // self.base.num_heads),
                                            causal_mask < -1, min_dtype)
        return hidden, {"full_attention": causal_mask}, position_ids, {"alibi": alibi}


class _ScaledHooks(DecoderAdapter):
    """Granite (``embedding_multiplier`` on the embeddings, ``logits / logits_scaling``) and Cohere
    (``logits * logit_scale``): the logit scale is folded into the hidden states after the final norm, so
    ``head(hidden)`` is the model's logits (the LM head has no bias in these families)."""

    def __init__(self, model, num_layers, caller, family):
        super().__init__(model, num_layers, caller, family)
        config = model.config
        self.embedding_multiplier = getattr(config, "embedding_multiplier", None)
        self.logits_scaling = getattr(config, "logits_scaling", None)
        self.logit_scale = getattr(config, "logit_scale", None)
        if self.head().bias is not None:
            raise TypeError(f"{caller}: {type(model).__name__}: a logit scale cannot be folded past an LM head bias")

    def embed(self, input_ids, token_type_ids):
        hidden = super().embed(input_ids, token_type_ids)
        return hidden * self.embedding_multiplier if self.embedding_multiplier is not None else hidden

    def finish(self, hidden):
        hidden = self.norm(hidden)
        if self.logits_scaling is not None:
            hidden = hidden / self.logits_scaling
        if self.logit_scale is not None:
            hidden = hidden * self.logit_scale
        return hidden


class Family(NamedTuple):
    name: str
    masks: str = "full"             # 'full' | 'sliding_window' | 'layer_types' (see the module docstring)
    dropout: Optional[str] = None   # the base's embedding dropout, applied before the layers
    hooks: type = DecoderAdapter
    causal_lm: str = ""             # the ForCausalLM class name the family was verified with


def _f(name, causal_lm, masks="full", dropout=None, hooks=DecoderAdapter):
    return Family(name, masks, dropout, hooks, causal_lm)


# Verified on tiny configs (tests/test_router_families.py): a k-block router's logits equal those of the same
# weights built with k blocks.
FAMILIES = {f.name: f for f in (
    _f("llama", "LlamaForCausalLM"),
    _f("mistral", "MistralForCausalLM", "sliding_window"),
    _f("qwen2", "Qwen2ForCausalLM", "layer_types"),
    _f("qwen3", "Qwen3ForCausalLM", "layer_types"),
    _f("gpt2", "GPT2LMHeadModel", dropout="drop", hooks=_GPT2Hooks),
    _f("gpt_neox", "GPTNeoXForCausalLM", dropout="emb_dropout"),
    _f("gemma", "GemmaForCausalLM"),
    _f("gemma2", "Gemma2ForCausalLM", "layer_types"),
    _f("gemma3_text", "Gemma3ForCausalLM", "layer_types"),
    _f("phi3", "Phi3ForCausalLM", "sliding_window"),
    _f("phi", "PhiForCausalLM", dropout="embed_dropout"),
    _f("olmo2", "Olmo2ForCausalLM"),
    _f("granite", "GraniteForCausalLM", hooks=_ScaledHooks),
    _f("granitemoe", "GraniteMoeForCausalLM", hooks=_ScaledHooks),
    _f("cohere", "CohereForCausalLM", hooks=_ScaledHooks),
    _f("opt", "OPTForCausalLM", hooks=_OPTHooks),
    _f("falcon", "FalconForCausalLM", hooks=_FalconHooks),
    _f("mixtral", "MixtralForCausalLM", "sliding_window"),
    _f("qwen2_moe", "Qwen2MoeForCausalLM", "layer_types"),
    _f("qwen3_moe", "Qwen3MoeForCausalLM", "sliding_window"),
    _f("starcoder2", "Starcoder2ForCausalLM", "sliding_window"),
)}


def _generic_family(model, caller, name, model_type):
    """A model type without an entry: the generic path, its mask rule read from the base model's forward."""
    config = model.config
    for key in _EXTRA_CONFIG:
        value = getattr(config, key, None)
        if value not in (None, False, 1, 1.0):
            raise TypeError(f"{caller}: unsupported architecture {name}: model type {model_type!r} has no hook and "
                            f"its config sets {key}={value!r}, which its forward applies outside the decoder layers")
    layer_types = getattr(config, "layer_types", None) is not None
    base = next((b for b in (_attr(_unwrapped(model), p) for p in BASE_PATHS) if isinstance(b, nn.Module)), None)
    try:
        source = inspect.getsource(type(base).forward) if base is not None else ""
    except (OSError, TypeError):
        source = ""
    if not source:  # no source to read: the config's own description
        masks = "layer_types" if layer_types else "sliding_window"
    elif layer_types and ("layer_types" in source or "attention_type" in source):
        masks = "layer_types"
    else:
        masks = "sliding_window" if "create_sliding_window_causal_mask" in source else "full"
    if (model_type, masks) not in _WARNED_GENERIC:
        _WARNED_GENERIC.add((model_type, masks))
        warnings.warn(f"{caller}: {name} (model type {model_type!r}) is not among the verified families "
                      f"(cggr.router.ROUTER_ARCHITECTURES); it runs through the generic adapter with the "
                      f"'{masks}' attention-mask rule read from its forward. Check a k-block router's logits "
                      "against the same weights built with k blocks before trusting its scores", stacklevel=3)
    return Family(model_type or "generic", masks)


_WARNED_GENERIC = set()  # (model type, mask rule) pairs already warned about, once per process


def family_of(model, caller):
    name = type(model).__name__
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{caller}: unsupported architecture {name}: not a Hugging Face causal LM (no config / "
                        "get_output_embeddings)")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{caller}: unsupported architecture {name}: an encoder-decoder model, not decoder-only")
    model_type = getattr(config, "model_type", "")
    return FAMILIES.get(model_type) or _generic_family(model, caller, name, model_type)


def build_adapter(model, num_layers, caller):
    family = family_of(model, caller)
    return family.hooks(model, num_layers, caller, family)


def verified_architectures(exact_head=False):
    """Class names verified on tiny configs; with ``exact_head``, only those whose ``ForCausalLM`` forward is
    ``lm_head(base_model(...))`` (no logit scale or soft cap) plus ``loss_function``."""
    scaled = {"gemma2", "gemma3_text", "granite", "granitemoe", "cohere"}
    return tuple(f.causal_lm for f in FAMILIES.values() if not (exact_head and f.name in scaled))
