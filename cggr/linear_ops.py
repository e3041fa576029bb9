"""The in-place building blocks of the fused linear selective cross-entropy as ``torch.ops.cggr`` operators.

    torch.ops.cggr.softcap_(Tensor(a!) x, float softcap) -> ()
    torch.ops.cggr.linear_ce_grad_(Tensor(a!) x, Tensor lse, Tensor targets, Tensor coef, int v0,
                                   float? softcap) -> ()
    torch.ops.cggr.addmm_f32_(Tensor(a!) acc, Tensor a, Tensor b, bool accumulate) -> ()

``softcap_`` and ``linear_ce_grad_``: CUDA tensors run the Triton kernels of ``triton_kernels/linear_ce.py``;
CPU tensors run the plain-torch implementation below (float32 math, the same formulas and roundings).
``addmm_f32_``: CUDA runs cuBLAS with float32 output from half/bf16 inputs (``out_dtype``, which ATen
has only on CUDA); CPU upcasts the inputs to float32. All three have fake (meta) kernels for
torch.compile / export (under which the mutation is functionalised like any ``Tensor(a!)`` op).

They write into their first argument and return nothing (the schema declares the mutation): a
functional version would allocate a second chunk of logits (softcap_, linear_ce_grad_) or a second
[S, H] float32 buffer per vocabulary slice (addmm_f32_), which is exactly what ``cggr.linear``'s
memory bound excludes.

Registered with the low-level ``torch.library.Library`` API (``define``, one ``impl`` per dispatch key,
``register_fake``) rather than ``custom_op`` as in ``cggr.stats_ops``: ``cggr.linear`` calls them once
per forward chunk and twice per backward vocabulary slice, and ``custom_op``'s Python layer (autograd
and mutation handling around every call) adds a host cost per call that the plain per-key kernels do
not have. No autograd kernel is registered (torch's autograd fallback applies):
they are not differentiable, and ``cggr.linear`` calls them under no_grad or inside its own backward.
"""
import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads cggr._C, which defines the cggr namespace, before the fragments below)
from .op_registry import register_ops
from .triton_kernels import launch_linear_ce_grad_, launch_softcap_

__all__ = ["softcap_", "linear_ce_grad_", "addmm_f32_"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGET_DTYPES = (torch.int64, torch.int32)


# --------------------------------------------------------------------------------------------------
# argument checks shared by every kernel of an op (no host sync). The kernels run once per chunk or
# vocabulary slice, so each check is one cheap expression over the attributes; only when it fails do
# the _explain_* functions work out which argument is wrong and raise.
# --------------------------------------------------------------------------------------------------
_F32 = torch.float32


def _dtype_name(x):
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _softcap_ok(softcap, optional):
    if softcap is None:
        return optional
    return not isinstance(softcap, bool) and isinstance(softcap, (int, float)) and 0.0 < softcap < math.inf


def _explain_x(x, op):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a float16/bfloat16/float32 tensor, got {_dtype_name(x)}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{op}: x must be 2-D with a unit-stride last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def _explain_softcap(softcap, op, optional):
    if not _softcap_ok(softcap, optional):
        raise ValueError(f"{op}: softcap must be a positive finite number{' or None' if optional else ''}, "
                         f"got {softcap!r}")


def _x_ok(x):
    s = x.shape
    return len(s) == 2 and x.dtype in _FLOAT_DTYPES and (s[1] <= 1 or x.stride(1) == 1)


def _check_softcap_args(x, softcap, op):
    if not (_x_ok(x) and _softcap_ok(softcap, False)):
        _explain_x(x, op)
        _explain_softcap(softcap, op, optional=False)


def _check_ce_grad(x, lse, targets, coef, v0, softcap, op):
    if _x_ok(x) and lse.dtype == _F32 and coef.dtype == _F32 and targets.dtype in _TARGET_DTYPES:
        d, r = x.device, (x.shape[0],)
        if (lse.device == d and targets.device == d and coef.device == d and lse.shape == r
                and targets.shape == r and coef.shape == r and lse.is_contiguous()
                and targets.is_contiguous() and coef.is_contiguous()
                and not isinstance(v0, bool) and isinstance(v0, int) and v0 >= 0 and _softcap_ok(softcap, True)):
            return
    _explain_x(x, op)
    R = x.shape[0]
    for name, t, dtypes, what in (("lse", lse, (_F32,), "float32"),
                                  ("targets", targets, _TARGET_DTYPES, "int64 or int32"),
                                  ("coef", coef, (_F32,), "float32")):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must be a {what} tensor, got {_dtype_name(t)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if tuple(t.shape) != (R,) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous of shape ({R},) (one value per row of x), "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")
    if isinstance(v0, bool) or not isinstance(v0, int) or v0 < 0:
        raise ValueError(f"{op}: v0 must be an int >= 0 (x's first vocabulary column), got {v0!r}")
    _explain_softcap(softcap, op, optional=True)


def _check_addmm(acc, a, b, op):
    if acc.dtype == _F32 and a.dtype in _FLOAT_DTYPES and b.dtype == a.dtype:
        sa, sb, d = a.shape, b.shape, acc.device
        if (len(sa) == 2 and len(sb) == 2 and sa[1] == sb[0] and acc.shape == (sa[0], sb[1])
                and a.device == d and b.device == d):
            return
    if not isinstance(acc, torch.Tensor) or acc.dtype != _F32:
        raise TypeError(f"{op}: acc must be a float32 tensor, got {_dtype_name(acc)}")
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a float16/bfloat16/float32 tensor, got {_dtype_name(t)}")
        if t.device != acc.device:
            raise ValueError(f"{op}: {name} is on {t.device} but acc is on {acc.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: a and b must have one dtype, got {a.dtype} and {b.dtype}")
    raise ValueError(f"{op}: need acc [M, N], a [M, K], b [K, N]; got acc {tuple(acc.shape)}, "
                     f"a {tuple(a.shape)}, b {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------------
# CPU implementations (float32 math, the same formulas and roundings as the kernels)
# --------------------------------------------------------------------------------------------------
def _softcap_cpu(x, softcap):
    x.copy_(torch.tanh(x.float() / softcap) * softcap)


def _linear_ce_grad_cpu(x, lse, targets, coef, v0, softcap):
    z = x.float()
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = (th * softcap).to(x.dtype).float()  # the forward's statistics saw the capped logits rounded
    g = torch.exp(z - lse[:, None])
    cols = torch.arange(v0, v0 + x.shape[1], device=x.device)
    g -= (cols[None, :] == targets[:, None].long()).float()
    if softcap is not None:
        g *= 1.0 - th * th
    # inactive rows (coef == 0) are exact zeros, never exp(...) * 0 (NaN for infinite logits)
    x.copy_(torch.where((coef != 0)[:, None], g * coef[:, None], 0.0))


def _addmm_f32_cpu(acc, a, b, accumulate):
    if a.dtype != torch.float32:
        a, b = a.float(), b.float()  # ATen's CPU matmul has no float32 output for half inputs
    if accumulate:
        acc.addmm_(a, b)
    else:
        torch.mm(a, b, out=acc)


def _addmm_f32_cuda_impl(acc, a, b, accumulate):
    if a.dtype == torch.float32:
        if accumulate:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
    elif accumulate:
        # cuBLAS: half/bf16 inputs, float32 C and D, in place: no [M, N] temporary and no rounding of the
        # running sum to the half type
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)


# --------------------------------------------------------------------------------------------------
# operators: one kernel per dispatch key (CPU, CUDA) and a fake kernel, each checking its arguments
# --------------------------------------------------------------------------------------------------
def _softcap_cpu_kernel(x, softcap):
    _check_softcap_args(x, softcap, "cggr::softcap_")
    _softcap_cpu(x, softcap)


def _softcap_cuda_kernel(x, softcap):
    _check_softcap_args(x, softcap, "cggr::softcap_")
    launch_softcap_(x, softcap, check=False)  # checked above


def _softcap_fake(x, softcap):
    _check_softcap_args(x, softcap, "cggr::softcap_")


def _linear_ce_grad_cpu_kernel(x, lse, targets, coef, v0, softcap):
    _check_ce_grad(x, lse, targets, coef, v0, softcap, "cggr::linear_ce_grad_")
    _linear_ce_grad_cpu(x, lse, targets, coef, v0, softcap)


def _linear_ce_grad_cuda_kernel(x, lse, targets, coef, v0, softcap):
    _check_ce_grad(x, lse, targets, coef, v0, softcap, "cggr::linear_ce_grad_")
    launch_linear_ce_grad_(x, lse, targets, coef, v0, softcap, check=False)  # checked above


def _linear_ce_grad_fake(x, lse, targets, coef, v0, softcap):
    _check_ce_grad(x, lse, targets, coef, v0, softcap, "cggr::linear_ce_grad_")


def _addmm_f32_cpu_kernel(acc, a, b, accumulate):
    _check_addmm(acc, a, b, "cggr::addmm_f32_")
    _addmm_f32_cpu(acc, a, b, accumulate)


def _addmm_f32_cuda_kernel(acc, a, b, accumulate):
    _check_addmm(acc, a, b, "cggr::addmm_f32_")
    _addmm_f32_cuda_impl(acc, a, b, accumulate)


def _addmm_f32_fake(acc, a, b, accumulate):
    _check_addmm(acc, a, b, "cggr::addmm_f32_")


_SCHEMAS = {
    "softcap_": ("(Tensor(a!) x, float softcap) -> ()",
                 _softcap_cpu_kernel, _softcap_cuda_kernel, _softcap_fake),
    "linear_ce_grad_": ("(Tensor(a!) x, Tensor lse, Tensor targets, Tensor coef, int v0, float? softcap) -> ()",
                        _linear_ce_grad_cpu_kernel, _linear_ce_grad_cuda_kernel, _linear_ce_grad_fake),
    "addmm_f32_": ("(Tensor(a!) acc, Tensor a, Tensor b, bool accumulate) -> ()",
                   _addmm_f32_cpu_kernel, _addmm_f32_cuda_kernel, _addmm_f32_fake),
}

_lib = register_ops(_SCHEMAS)  # kept alive for the life of the process
_SOFTCAP_OP = torch.ops.cggr.softcap_.default
_LINEAR_CE_GRAD_OP = torch.ops.cggr.linear_ce_grad_.default
_ADDMM_F32_OP = torch.ops.cggr.addmm_f32_.default


# --------------------------------------------------------------------------------------------------
# Python wrappers (return the tensor written, for chaining)
# --------------------------------------------------------------------------------------------------
def softcap_(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """In place: x [R, C] (float16/bfloat16/float32, unit last-dim stride) <- softcap * tanh(x / softcap),
    computed in float32 and rounded once to x's dtype. softcap: a positive finite number. Returns x.
    No host sync."""
    _SOFTCAP_OP(x, float(softcap))
    return x


def linear_ce_grad_(x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, v0: int,
                    softcap: Optional[float] = None) -> torch.Tensor:
    """In place over a vocabulary slice x [R, C] of logits (columns v0 .. v0 + C of the full vocabulary):

        z = x, or round_to_x_dtype(softcap * tanh(x / softcap)) with a soft cap
        x <- (exp(z - lse[r]) - [v0 + j == targets[r]]) * coef[r]    (* (1 - tanh(x / softcap)^2))

    rows with coef[r] == 0 are written as exact zeros without reading x. lse, coef: [R] float32
    contiguous on x's device; targets: [R] int64/int32 contiguous (a value outside the slice, ignore_index
    included, matches no column). Math in float32, one rounding to x's dtype. Returns x. No host sync.
    """
    _LINEAR_CE_GRAD_OP(x, lse, targets, coef, int(v0), None if softcap is None else float(softcap))
    return x


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """In place: acc [M, N] float32 <- a @ b (accumulate=False) or acc + a @ b (accumulate=True).

    a [M, K], b [K, N]: one dtype among float16/bfloat16/float32, on acc's device. The product is
    accumulated and stored in float32 (no rounding to the half type). Returns acc. No host sync.
    """
    _ADDMM_F32_OP(acc, a, b, bool(accumulate))
    return acc
