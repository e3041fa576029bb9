"""Elementwise kernels of the fused linear selective cross-entropy (``cggr.linear``), in place on a
chunk of logits so that no second [rows, cols] buffer is ever allocated.

``launch_softcap_``: x <- softcap * tanh(x / softcap), computed in float32, rounded once to x's dtype.

``launch_linear_ce_grad_``: the cross-entropy gradient of a vocabulary SLICE of the logits, columns
[v0, v0 + cols) of the full vocabulary, written over the slice:

    z = x                                   (or round(softcap * tanh(x / softcap)) with a soft cap,
                                             rounded to x's dtype exactly as the forward rounded it)
    g = (exp(z - lse[r]) - [v0 + j == target[r]]) * coef[r]
    g *= 1 - tanh(x / softcap)^2            (with a soft cap: chain rule through the cap)
    rows with coef[r] == 0 are written as exact zeros (never exp(...) * 0, which is NaN for inf logits)

The row's log-sum-exp comes from the forward pass, so a slice needs nothing from the rest of its row:
this is what lets the backward tile the vocabulary instead of the tokens (see cggr/linear.py).
coef carries the whole per-row factor (upstream gradient / normaliser * row weight), so the slice
can go straight into the two backward matmuls.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(y):
    # tanh without libdevice (runs under TRITON_INTERPRET too). 1 - 2 / (exp(2y) + 1) cancels for small
    # |y| (relative error ~ 1e-7 / |y|), so small arguments use the odd Taylor series, whose first
    # omitted term (62/2835 y^9) is below 3e-11 for |y| < 0.125.
    big = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
    y2 = y * y
    small = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(y) < 0.125, small, big)


@triton.jit
def _softcap_kernel(x_ptr, n_cols, stride_row, softcap, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    ptrs = x_ptr + row.to(tl.int64) * stride_row + cols
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    z = softcap * _tanh(x / softcap)
    tl.store(ptrs, z.to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_ce_grad_kernel(
    x_ptr, lse_ptr, targets_ptr, coef_ptr, n_cols, stride_row, v0, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    ptrs = x_ptr + row.to(tl.int64) * stride_row + cols
    coef = tl.load(coef_ptr + row)
    if coef == 0.0:
        # inactive row (unselected padding, ignored target, zero upstream gradient): exact zeros,
        # without reading the logits
        tl.store(ptrs, tl.zeros([BLOCK], x_ptr.dtype.element_ty), mask=ok)
    else:
        lse = tl.load(lse_ptr + row)
        tgt = tl.load(targets_ptr + row).to(tl.int64)
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            th = _tanh(x / softcap)
            # the forward computed its statistics on the capped logits rounded to the storage dtype
            z = (softcap * th).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            z = x
        p = tl.exp(z - lse)
        g = tl.where(cols.to(tl.int64) + v0 == tgt, p - 1.0, p)
        if HAS_SOFTCAP:
            g = g * (1.0 - th * th)
        tl.store(ptrs, (g * coef).to(x_ptr.dtype.element_ty), mask=ok)


def _check(x, op):
    if not (x.device.type == "cuda" or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        raise RuntimeError(f"{op}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                           f"got a tensor on {x.device}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{op}: x must be 2-D with a contiguous last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def _config(n_cols, dtype):
    # Memory-bound passes: a program moves BLOCK elements; 2048 bf16 (4 KB) per program with 4 warps keeps
    # 16-byte vector accesses and enough programs in flight for any realistic slice width.
    block = min(2048 if dtype.itemsize == 2 else 1024, triton.next_power_of_2(n_cols))
    return block, 4 if block >= 1024 else 2


def launch_softcap_(x, softcap, check=True):
    """In place: x [R, C] (unit last stride) <- softcap * tanh(x / softcap). Returns x.

    check=False skips the checks, for callers that have already made them (``cggr.linear_ops``).
    """
    if check:
        _check(x, "launch_softcap_")
    R, C = x.shape
    if R == 0 or C == 0:
        return x
    block, warps = _config(C, x.dtype)
    _softcap_kernel[(R, triton.cdiv(C, block))](x, C, x.stride(0), float(softcap), BLOCK=block, num_warps=warps)
    return x


def launch_linear_ce_grad_(x, lse, targets, coef, v0, softcap=None, check=True):
    """In place over a vocabulary slice x [R, C] (columns v0 .. v0 + C of the full vocabulary).

    lse, coef: [R] float32 contiguous; targets: [R] int64/int32 contiguous (any value outside the slice,
    ignore_index included, simply matches no column). Returns x. check=False skips the checks, for
    callers that have already made them (``cggr.linear_ops``).
    """
    if check:
        _check(x, "launch_linear_ce_grad_")
    R, C = x.shape
    if check:
        for name, t in (("lse", lse), ("coef", coef), ("targets", targets)):
            if t.shape != (R,) or not t.is_contiguous():
                raise ValueError(f"launch_linear_ce_grad_: {name} must be contiguous of shape ({R},), "
                                 f"got {tuple(t.shape)}")
        if lse.dtype != torch.float32 or coef.dtype != torch.float32:
            raise TypeError("launch_linear_ce_grad_: lse and coef must be float32")
    if R == 0 or C == 0:
        return x
    block, warps = _config(C, x.dtype)
    _linear_ce_grad_kernel[(R, triton.cdiv(C, block))](
        x, lse, targets, coef, C, x.stride(0), int(v0), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, BLOCK=block, num_warps=warps)
    return x
