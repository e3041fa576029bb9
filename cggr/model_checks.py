"""Checks of ``CGGRModel``'s inputs, done on the host before any work: the wrapped model, a row
selection, the curriculum arguments."""
import torch
from torch import nn

from .distributed import fsdp_original_class
from .schedule import SCHEDULES, RatioSchedule


def model_class_name(model) -> str:
    """The model's class name; for a module FSDP2 has sharded (class ``FSDP<Name>``), the original's."""
    return fsdp_original_class(model).__name__


def check_causal_lm(model):
    """``model`` must be a Hugging Face causal LM (its forward takes ``input_ids`` and ``labels`` and returns
    ``.loss`` / ``.logits`` for next-token prediction): a class of transformers' causal-LM mapping, or any
    class named ``*ForCausalLM`` (remote code, PEFT wrappers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Hugging Face causal LM (an nn.Module), got {type(model).__name__}")
    name = model_class_name(model)
    if name.endswith("ForCausalLM"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return
    config = getattr(model, "config", None)
    what = ("it has no Hugging Face config" if config is None
            else f"its class is not a causal LM of transformers (model_type {getattr(config, 'model_type', None)!r})")
    raise TypeError(f"model must be a Hugging Face causal LM (e.g. LlamaForCausalLM, GPT2LMHeadModel): got {name}, "
                    f"and {what}. CGGRModel trains next-token prediction on the selected rows through the "
                    "model's own labels= loss")


def check_fused_head(model, loss_impl: str):
    """``loss_impl='fused'`` multiplies the hidden states by the LM head's weight itself: an adapted head
    (PEFT's LoRA on lm_head wraps the Linear, kept as ``base_layer``) would have its adapter ignored."""
    if loss_impl != "fused" or not hasattr(model, "get_output_embeddings"):
        return
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "base_layer", None), nn.Module):
        raise ValueError("StepOptions(loss_impl='fused') does not support an adapted LM head: get_output_embeddings() "
                         f"is a {type(head).__module__}.{type(head).__qualname__} (an adapter on lm_head), and the "
                         "fused loss reads lm_head.weight directly, so the adapter would be ignored. Leave lm_head "
                         "out of the adapter (LoraConfig(target_modules=...) without 'lm_head'), or use "
                         "StepOptions(loss_impl='model')")


def check_selection(selection, batch_size, device):
    """Host-only checks of a ``RowSelection`` (from a policy or the caller), naming what is wrong."""
    idx, weight = selection.indices, selection.row_weight
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64 or idx.device != device
            or not 1 <= idx.shape[0] <= batch_size):
        what = (f"{tuple(idx.shape)} {idx.dtype} on {idx.device}" if isinstance(idx, torch.Tensor)
                else type(idx).__name__)
        raise ValueError(f"rows: RowSelection.indices must be a 1-D int64 tensor of 1 to {batch_size} batch "
                         f"positions on {device}, got {what}")
    if weight is not None and (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(idx.shape)):
        raise ValueError(f"rows: RowSelection.row_weight must be None or a tensor of shape {tuple(idx.shape)}, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")


def ratio_schedule(schedule, min_tokens_ratio, warmup_steps, defaults_given):
    if isinstance(schedule, RatioSchedule):
        if not defaults_given:
            raise ValueError("pass the ratio and warm-up either as min_tokens_ratio= / warmup_steps= or inside "
                             "schedule=RatioSchedule(...), not both")
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a cggr.RatioSchedule, got {schedule!r}")
    return RatioSchedule(min_tokens_ratio, warmup_steps, schedule, dynamic_threshold=False)


def check_select_inputs(policy, input_ids, labels, attention_mask, reference_nll):
    """``CGGRModel.select_rows``'s argument checks (shapes, and a reference NLL exactly when the policy uses one)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [B, T] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} to match input_ids, "
                         f"got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected a 2-D mask of shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if reference_nll is None and policy.needs_reference_nll:
        raise ValueError(f"reference_nll: {policy!r} ranks rows by a reference model's NLL; pass "
                         "reference_nll=[B, T-1] (cggr.reference.ReferenceModel computes it)")
    if reference_nll is not None and not policy.needs_reference_nll:
        raise ValueError(f"reference_nll was given, but {policy!r} does not use it; pass "
                         "policy=cggr.ExcessLossRows() to train on the rows with the highest excess loss "
                         "(the measured default with a reference), or drop reference_nll")
    B, T = input_ids.shape
    if reference_nll is not None and (not isinstance(reference_nll, torch.Tensor)
                                      or tuple(reference_nll.shape) != (B, T - 1)):
        raise ValueError(f"reference_nll: expected a tensor of shape {(B, T - 1)} (one value per shifted "
                         f"target), got {tuple(reference_nll.shape) if isinstance(reference_nll, torch.Tensor) else type(reference_nll).__name__}")
