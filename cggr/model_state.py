"""The state_dict layout of ``CGGRModel`` (and its ``get_metrics``): exactly the wrapped model's keys plus ``cggr_step`` (0-dim int64,
the curriculum step), at any nesting depth, so that a checkpoint loads into the plain model and back.

Saving overrides ``state_dict`` (which ``nn.Module`` also calls for children). Loading goes through hooks,
because a parent's ``load_state_dict`` never calls ours: the pre-hook takes ``cggr_step`` out and maps the
model's keys onto the ``model.`` submodule; the post-hook reports keys in the saved layout.
"""
import torch

STEP_KEY = "cggr_step"


class StepStateDict:
    """Mixin for an ``nn.Module`` with a ``model`` submodule, a ``_step`` int and a ``_calls_in_step`` int;
    the subclass registers ``_load_pre_hook`` / ``_load_post_hook`` in its ``__init__``."""

    def _set_step(self, step):
        if isinstance(step, torch.Tensor):
            step = int(step.item()) if step.numel() == 1 and not step.is_floating_point() else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict: {STEP_KEY} must be an int >= 0, got {step!r}")
        self._step = step
        self._calls_in_step = 0

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The plain model's state_dict (same keys) plus ``cggr_step`` (0-dim int64)."""
        state = self.model.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            # Module versions are looked up by module path on load: also file them under "model.".
            root = prefix[:-1]
            for key in [k for k in metadata if k == root or k.startswith(prefix)]:
                rest = key[len(prefix):] if key != root else ""
                metadata[prefix + "model" + ("." + rest if rest else "")] = metadata[key]
        state[prefix + STEP_KEY] = torch.tensor(self._step, dtype=torch.int64)
        return state

    def _load_pre_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
        step = state_dict.pop(prefix + STEP_KEY, None)
        self._loading_found_step = step is not None
        if step is not None:
            self._set_step(step)
        # Every other key under the prefix is the model's (a Llama's own keys start with "model." too:
        # the rename is unconditional, and the post-hook strips exactly one "model.").
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
        self._loading_prefix = prefix

    def _load_post_hook(self, module, incompatible_keys):
        prefix = self._loading_prefix
        model_prefix = prefix + "model."
        for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
            keys[:] = [prefix + k[len(model_prefix):] if k.startswith(model_prefix) else k for k in keys]
        if not self._loading_found_step:
            # A plain model's state_dict has no step: strict loading reports it, strict=False keeps the step.
            incompatible_keys.missing_keys.append(prefix + STEP_KEY)



def step_metrics(last, step: int, curriculum_ratio: float, timer) -> dict:
    """``CGGRModel.get_metrics``: the numbers of its last forward with labels (``last``, or None)."""
    metrics = {"step": step, "curriculum_ratio": curriculum_ratio}
    if last is None:
        return metrics
    tokens_total = int(last["tokens_total"].item())
    tokens_selected = int(last["tokens_selected"].item())
    metrics.update(
        row_ratio=last["ratio"],
        sequences_selected=last["sequences_selected"],
        sequences_total=last["sequences_total"],
        tokens_selected=tokens_selected,
        tokens_total=tokens_total,
        token_ratio=tokens_selected / tokens_total if tokens_total > 0 else 0.0,
    )
    if last["confidence"] is not None:
        metrics["avg_confidence"] = float(last["confidence"].item())
    if timer is not None and timer.result is not None:
        metrics.update(timer.result)
    return metrics
