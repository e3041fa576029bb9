"""Token statistics and the selective cross-entropy backward as ``torch.ops.cggr`` operators.

    torch.ops.cggr.token_stats(Tensor logits, Tensor targets, int ignore_index) -> Tensor   # [5, N] fp32
    torch.ops.cggr.selective_ce_backward(Tensor logits, Tensor targets, Tensor lse, Tensor mask,
                                         Tensor scale, Tensor? row_weight, int ignore_index) -> Tensor

CUDA tensors run the Triton kernels of ``cggr.triton_kernels``; CPU tensors run the plain-torch
implementation below (float32 math in the same order as the kernels, chunked over rows so memory stays
bounded); both have fake (meta) kernels for torch.compile / export.

Registered with the low-level ``torch.library.Library`` API (``define``, one ``impl`` per dispatch key,
``register_fake``), like ``cggr.linear_ops``, rather than ``custom_op``: the selective steps are bound by
host launch overhead on slower hosts, and ``custom_op``'s Python layer around every call (its autograd
kernel and redispatch) adds host time that the plain per-key kernels do not have (not yet measured by a
script of this repository). Nor ``triton_op``: it uses its Python body as the fake kernel and as the
decomposition that torch.compile traces, for every device, so the row-chunked CPU path would be traced
(and specialised on N) too. These kernels are single memory-bound passes with nothing for Inductor to
fuse into, so an opaque op costs nothing. Like ``custom_op``, the ops are tagged pt2_compliant.

Neither op has an autograd formula: the statistics are not differentiated (the wrappers detach their
inputs), and selective_ce_backward *is* a gradient. No autograd kernel is registered, so torch's autograd
fallback applies (as for ``cggr.linear_ops``): called directly on inputs that require grad, an op's
output gets a node that warns when backpropagated through (``custom_op`` raised there), and the CPU kernels
then run under no_grad so that, like the CUDA kernels, they record no graph of their own.
"""
from collections import namedtuple
from typing import Optional, Union

import torch

from . import _C  # noqa: F401  (loads cggr._C, which defines the cggr namespace, before the fragments below)
from .op_registry import register_ops
from .triton_kernels import launch_selective_ce_backward, launch_token_stats

__all__ = ["TokenStats", "token_stats", "selective_ce_backward"]

TokenStats = namedtuple("TokenStats", ["lse", "nll", "entropy", "p1", "p2"])
TokenStats.__doc__ = """Per-token statistics (float32, shaped like the targets).

lse: log-sum-exp of the logits; nll: lse - logit[target] (0 where target == ignore_index);
entropy: -sum p log p in nats; p1, p2: the two largest probabilities (p2 == p1 on a tie, 0 when V == 1).
"""

_LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGET_DTYPES = (torch.int64, torch.int32)
# CPU implementation: rows per chunk chosen so a chunk holds about this many logits (3 float32
# temporaries of this size are alive at once: ~50 MB).
_CPU_CHUNK_ELEMENTS = 1 << 22
# Same constants as the Triton kernel (see triton_kernels/token_stats.py for why).
_D_MIN = -200.0
_M_INIT = -3.0e38


# --------------------------------------------------------------------------------------------------
# argument checks shared by the ops and the wrappers (no host sync). Every call runs them, so each is
# one cheap expression over the attributes (the _*_ok predicates); only when it fails do the _explain_*
# functions work out which argument is wrong and raise (they are the authority: the predicates only
# decide when they need not run).
# --------------------------------------------------------------------------------------------------
_F32 = torch.float32
_BOOL = torch.bool
_Tensor = torch.Tensor


def _explain_logits_targets(logits, targets, op):
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _LOGITS_DTYPES:
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{op}: logits must be a float16/bfloat16/float32 tensor, got {got}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in _TARGET_DTYPES:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"{op}: targets must be an int64 or int32 tensor, got {got}")
    if targets.device != logits.device:
        raise ValueError(f"{op}: targets is on {targets.device} but logits is on {logits.device}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocabulary (last) dimension, "
                         f"got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} does not match logits shape "
                         f"{tuple(logits.shape)} without its last dim ({tuple(logits.shape[:-1])})")


def _explain_2d(logits, op):
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [N, V], got shape {tuple(logits.shape)}")


def _explain_backward_extras(logits, targets, lse, mask, scale, row_weight, op):
    device = logits.device
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32:
        raise TypeError(f"{op}: lse must be a float32 tensor (row 0 of token_stats), got "
                        f"{lse.dtype if isinstance(lse, torch.Tensor) else type(lse).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    named = [("lse", lse), ("mask", mask)]
    if row_weight is not None:
        if not isinstance(row_weight, torch.Tensor) or row_weight.dtype != torch.float32:
            raise TypeError(f"{op}: row_weight must be a float32 tensor or None, got "
                            f"{row_weight.dtype if isinstance(row_weight, torch.Tensor) else type(row_weight).__name__}")
        named.append(("row_weight", row_weight))
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits is on {device}")
        if tuple(t.shape) != tuple(targets.shape):
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} does not match targets shape "
                             f"{tuple(targets.shape)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError(f"{op}: scale must be a float32 tensor holding one value")
    if scale.device != device:
        raise ValueError(f"{op}: scale is on {scale.device} but logits is on {device} (the kernel reads it "
                         f"on the device; move it there once, e.g. torch.tensor(s, device=logits.device))")


def _op_args_ok(logits, targets):
    """The operators' logits/targets conditions (both are tensors there, by the schema): 2-D logits."""
    s = logits.shape
    return (len(s) == 2 and s[1] != 0 and logits.dtype in _LOGITS_DTYPES and targets.dtype in _TARGET_DTYPES
            and targets.shape == s[:1] and targets.device == logits.device)


def _extras_ok(targets, lse, mask, scale, row_weight, device):
    r = targets.shape
    return (lse.dtype == _F32 and mask.dtype == _BOOL and scale.dtype == _F32 and lse.shape == r
            and mask.shape == r and scale.numel() == 1 and lse.device == device and mask.device == device
            and scale.device == device
            and (row_weight is None or (row_weight.dtype == _F32 and row_weight.shape == r
                                        and row_weight.device == device)))


def _check_stats_args(logits, targets, op="cggr::token_stats"):
    if not _op_args_ok(logits, targets):
        _explain_logits_targets(logits, targets, op)
        _explain_2d(logits, op)


def _check_backward_args(logits, targets, lse, mask, scale, row_weight, op="cggr::selective_ce_backward"):
    s, r, d = logits.shape, targets.shape, logits.device
    # _op_args_ok and _extras_ok in one expression (this runs once per backward call)
    if not (len(s) == 2 and s[1] != 0 and r == s[:1] and logits.dtype in _LOGITS_DTYPES
            and targets.dtype in _TARGET_DTYPES and lse.dtype == _F32 and mask.dtype == _BOOL
            and scale.dtype == _F32 and lse.shape == r and mask.shape == r and scale.numel() == 1
            and targets.device == d and lse.device == d and mask.device == d and scale.device == d
            and (row_weight is None or (row_weight.dtype == _F32 and row_weight.shape == r
                                        and row_weight.device == d))):
        _explain_logits_targets(logits, targets, op)
        _explain_2d(logits, op)
        _explain_backward_extras(logits, targets, lse, mask, scale, row_weight, op)


def _check_logits_targets(logits, targets, op):
    """The wrappers' logits/targets conditions: any arguments, logits of any rank >= 1."""
    if isinstance(logits, _Tensor) and isinstance(targets, _Tensor):
        s = logits.shape
        if (len(s) >= 1 and s[-1] != 0 and logits.dtype in _LOGITS_DTYPES and targets.dtype in _TARGET_DTYPES
                and targets.shape == s[:-1] and targets.device == logits.device):
            return
    _explain_logits_targets(logits, targets, op)


def _check_backward_extras(logits, targets, lse, mask, scale, row_weight, op):
    """The wrapper's conditions on the other arguments (after _check_logits_targets; scale is a tensor)."""
    if (isinstance(lse, _Tensor) and isinstance(mask, _Tensor) and isinstance(scale, _Tensor)
            and (row_weight is None or isinstance(row_weight, _Tensor))
            and _extras_ok(targets, lse, mask, scale, row_weight, logits.device)):
        return
    _explain_backward_extras(logits, targets, lse, mask, scale, row_weight, op)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------------
# CPU implementations (float32 math, same formulas as the kernels)
# --------------------------------------------------------------------------------------------------
def _rows_per_chunk(V):
    return max(1, _CPU_CHUNK_ELEMENTS // max(V, 1))


def _token_stats_cpu(logits, targets, ignore_index):
    N, V = logits.shape
    out = torch.empty((5, N), dtype=torch.float32, device=logits.device)
    step = _rows_per_chunk(V)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        x = logits[r0:r1].float()
        m = x.amax(dim=1).clamp_min(_M_INIT)
        d = (x - m[:, None]).clamp_min_(_D_MIN)
        e = torch.exp(d)
        s = e.sum(dim=1)
        t = e.mul_(d).sum(dim=1)
        del d, e
        log_s = torch.log(s)
        lse = m + log_s
        out[0, r0:r1] = lse
        out[2, r0:r1] = log_s - t / s
        top = torch.topk(x, min(2, V), dim=1, sorted=True).values
        out[3, r0:r1] = torch.exp((top[:, 0] - m) - log_s)
        out[4, r0:r1] = torch.exp((top[:, 1] - m) - log_s) if V > 1 else 0.0
        tgt = targets[r0:r1].long()
        ignored = tgt == ignore_index
        in_range = (tgt >= 0) & (tgt < V)
        x_t = x.gather(1, torch.where(in_range, tgt, 0)[:, None]).squeeze(1)
        nll = torch.where(in_range, (m - x_t) + log_s, float("nan"))
        out[1, r0:r1] = torch.where(ignored, 0.0, nll)
    return out


def _selective_ce_backward_cpu(logits, targets, lse, mask, scale, row_weight, ignore_index):
    N, V = logits.shape
    grad = torch.zeros((N, V), dtype=logits.dtype, device=logits.device)
    selected = torch.nonzero(mask & (targets != ignore_index)).squeeze(1)
    coef_all = scale.reshape(()).float()
    step = _rows_per_chunk(V)
    for i0 in range(0, selected.numel(), step):
        rows = selected[i0:i0 + step]
        x = logits.index_select(0, rows).float()
        p = torch.exp(x - lse.index_select(0, rows)[:, None])
        tgt = targets.index_select(0, rows).long()
        in_range = (tgt >= 0) & (tgt < V)
        onehot = torch.zeros_like(p).scatter_(1, torch.where(in_range, tgt, 0)[:, None],
                                              in_range[:, None].float())
        coef = coef_all.expand(rows.numel())
        if row_weight is not None:
            coef = coef * row_weight.index_select(0, rows)
        coef = torch.where(in_range, coef, float("nan"))
        grad.index_copy_(0, rows, ((p - onehot) * coef[:, None]).to(logits.dtype))
    return grad


# --------------------------------------------------------------------------------------------------
# operators: one kernel per dispatch key (CPU, CUDA) and a fake kernel, each checking its arguments
# --------------------------------------------------------------------------------------------------
def _token_stats_cpu_kernel(logits, targets, ignore_index):
    _check_stats_args(logits, targets)
    logits = _last_dim_contiguous(logits)
    if logits.requires_grad:  # not differentiable: record no graph (see the module docstring)
        with torch.no_grad():
            return _token_stats_cpu(logits, targets, ignore_index)
    return _token_stats_cpu(logits, targets, ignore_index)


def _token_stats_cuda_kernel(logits, targets, ignore_index):
    _check_stats_args(logits, targets)
    return launch_token_stats(_last_dim_contiguous(logits), targets.contiguous(), ignore_index,
                              check=False)  # checked above


def _token_stats_fake(logits, targets, ignore_index):
    _check_stats_args(logits, targets)
    return logits.new_empty((5, logits.shape[0]), dtype=torch.float32)


def _selective_ce_backward_cpu_kernel(logits, targets, lse, mask, scale, row_weight, ignore_index):
    _check_backward_args(logits, targets, lse, mask, scale, row_weight)
    if (logits.requires_grad or lse.requires_grad or scale.requires_grad
            or (row_weight is not None and row_weight.requires_grad)):  # not differentiable: record no graph
        with torch.no_grad():
            return _selective_ce_backward_cpu(logits, targets, lse, mask, scale, row_weight, ignore_index)
    return _selective_ce_backward_cpu(logits, targets, lse, mask, scale, row_weight, ignore_index)


def _selective_ce_backward_cuda_kernel(logits, targets, lse, mask, scale, row_weight, ignore_index):
    _check_backward_args(logits, targets, lse, mask, scale, row_weight)
    # scale: the kernel reads its one value through the pointer, whatever its shape
    return launch_selective_ce_backward(
        _last_dim_contiguous(logits), targets.contiguous(), lse, mask.contiguous(), scale,
        None if row_weight is None else row_weight.contiguous(), ignore_index, check=False)  # checked above


def _selective_ce_backward_fake(logits, targets, lse, mask, scale, row_weight, ignore_index):
    _check_backward_args(logits, targets, lse, mask, scale, row_weight)
    return torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)


_SCHEMAS = {
    "token_stats": ("(Tensor logits, Tensor targets, int ignore_index) -> Tensor",
                    _token_stats_cpu_kernel, _token_stats_cuda_kernel, _token_stats_fake),
    "selective_ce_backward": ("(Tensor logits, Tensor targets, Tensor lse, Tensor mask, Tensor scale, "
                              "Tensor? row_weight, int ignore_index) -> Tensor",
                              _selective_ce_backward_cpu_kernel, _selective_ce_backward_cuda_kernel,
                              _selective_ce_backward_fake),
}

_lib = register_ops(_SCHEMAS, tags=(torch.Tag.pt2_compliant_tag,))  # kept alive for the life of the process
_TOKEN_STATS_OP = torch.ops.cggr.token_stats.default
_SELECTIVE_CE_BACKWARD_OP = torch.ops.cggr.selective_ce_backward.default


# --------------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------------
def _flatten_logits(logits, op):
    if logits.dim() not in (2, 3):
        raise ValueError(f"{op}: logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    # reshape is a view whenever the leading dims can be merged; only the last dim must be unit-stride
    return _last_dim_contiguous(logits.reshape(-1, logits.shape[-1]))


def _validate_targets(targets_flat, V, ignore_index, shape, op):
    """Raise ValueError naming the first target outside [0, V) that is not ignore_index (one host sync)."""
    if targets_flat.numel() == 0:
        return
    bad = (targets_flat != ignore_index) & ((targets_flat < 0) | (targets_flat >= V))
    first = torch.argmax(bad.to(torch.uint8))  # argmax returns the first maximal index
    any_bad, pos, value = torch.stack([bad[first].long(), first, targets_flat[first].long()]).tolist()
    if any_bad:
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), tuple(shape)))
        raise ValueError(f"{op}: targets{list(where)} = {value} is outside [0, {V}) and is not "
                         f"ignore_index ({ignore_index})")


def token_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                validate_targets: bool = True) -> TokenStats:
    """Per-token lse, nll, entropy, top-1 and top-2 probability in one pass over the logits.

    logits: [N, V] or [B, T, V], float16/bfloat16/float32, any strides (the leading dims are merged
    without a copy when their strides allow; a non-unit last-dim stride costs one contiguous copy).
    targets: int64/int32, shaped like logits without the last dim.
    Returns a TokenStats of float32 tensors shaped like targets (views into one [5, N] tensor).
    Not differentiable: the logits are detached.

    validate_targets=True checks that every target is in [0, V) or equals ignore_index and raises a
    ValueError naming the first bad one; this costs one host synchronisation. With False nothing is
    checked: an out-of-range target is never read and its nll is NaN.
    """
    op = "cggr.ops.token_stats"
    _check_logits_targets(logits, targets, op)
    V = logits.shape[-1]
    flat = _flatten_logits(logits.detach(), op)
    targets_flat = targets.reshape(-1)
    if validate_targets:
        _validate_targets(targets_flat, V, ignore_index, targets.shape, op)
    stats = _TOKEN_STATS_OP(flat, targets_flat, int(ignore_index))
    return TokenStats(*stats.view((5,) + tuple(targets.shape)).unbind(0))  # 5 views, one call


def selective_ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor,
                          scale: Union[torch.Tensor, float], row_weight: Optional[torch.Tensor] = None,
                          ignore_index: int = -100) -> torch.Tensor:
    """Gradient of sum_{selected n} row_weight[n] * nll[n] * scale with respect to the logits.

    grad[n] = (softmax(logits[n]) - onehot(targets[n])) * scale * row_weight[n] for rows with mask[n] and
    targets[n] != ignore_index, exactly 0 elsewhere (unselected rows are written, never read).
    logits: [N, V] or [B, T, V]; targets, lse (TokenStats.lse), mask (bool) and row_weight (float32 or
    None) shaped like logits without the last dim. scale: 0-dim float32 tensor on logits' device (no host
    sync); a Python number or a CPU tensor is copied to the device (a host-to-device copy per call).
    Returns a contiguous tensor of logits' shape and dtype. Targets are not validated here (token_stats
    does that); a selected row with an out-of-range target gets NaN.
    """
    op = "cggr.ops.selective_ce_backward"
    _check_logits_targets(logits, targets, op)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=logits.device)
    elif scale.numel() != 1:
        raise ValueError(f"{op}: scale must hold one value, got shape {tuple(scale.shape)}")
    else:
        scale = scale.detach().to(device=logits.device, dtype=torch.float32).reshape(())
    _check_backward_extras(logits, targets, lse, mask, scale, row_weight, op)
    flat = _flatten_logits(logits.detach(), op)
    grad = _SELECTIVE_CE_BACKWARD_OP(
        flat, targets.reshape(-1), lse.detach().reshape(-1), mask.reshape(-1), scale,
        None if row_weight is None else row_weight.detach().reshape(-1), int(ignore_index))
    return grad.view(logits.shape)
