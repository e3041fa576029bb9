"""Gradient of the selective cross entropy with respect to the logits, in one kernel.

    grad[n, :] = (exp(x[n, :] - lse[n]) - onehot(target[n])) * scale * row_weight[n]
                 for rows with mask[n] and target[n] != ignore_index,
    grad[n, :] = 0 for every other row.

lse comes from the token_stats pass, so a selected row is read once and written once; an unselected
row is only written (its loads are masked off, so no logits bytes move). scale is a 0-dim float32
tensor read inside the kernel: the normaliser may be a device value without a host sync. A selected
row whose target lies outside [0, V) (and is not ignore_index) gets NaN: its loss is NaN too
(token_stats' nll), and a silent "softmax without the one-hot" gradient would hide the bad label.
The result is computed in float32 and rounded once to the logits' dtype; no [N, V] float32 temporary.
"""
import torch
import triton
import triton.language as tl

from .token_stats import _check_runnable


@triton.jit
def _selective_ce_backward_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    mask_ptr,
    scale_ptr,
    weight_ptr,
    grad_ptr,
    N,
    V,
    stride_row,
    stride_lse,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * V may exceed 2**31

    sel = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    sel = sel & (tgt != ignore_index)
    in_range = (tgt >= 0) & (tgt < V)
    coef = tl.load(scale_ptr).to(tl.float32) + tl.zeros([BLOCK_N], tl.float32)
    if HAS_WEIGHT:
        coef = coef * tl.load(weight_ptr + rows, mask=row_ok & sel, other=0.0).to(tl.float32)
    coef = tl.where(in_range, coef, float("nan"))
    lse = tl.load(lse_ptr + rows64 * stride_lse, mask=row_ok & sel, other=0.0).to(tl.float32)
    tgt32 = tl.where(in_range, tgt, -1).to(tl.int32)

    src = logits_ptr + rows64 * stride_row
    dst = grad_ptr + rows64 * V
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        col_ok = (cols < V)[None, :]
        # unselected rows: masked load, so no bytes are read for them
        x = tl.load(src[:, None] + cols[None, :], mask=sel[:, None] & col_ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        g = (p - tl.where(cols[None, :] == tgt32[:, None], 1.0, 0.0)) * coef[:, None]
        g = tl.where(sel[:, None], g, 0.0)
        tl.store(dst[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


def selective_ce_backward_config(V, dtype):
    """Launch config (BLOCK_N, BLOCK_V, num_warps); same reasoning as token_stats_config."""
    elem = dtype.itemsize
    if V >= 16384:
        if elem == 2:
            return 1, 8192, 16
        return 1, 4096, 8
    block_v = triton.next_power_of_2(V)
    if block_v >= 4096:
        return 1, block_v, 8
    block_n = min(16, max(1, 4096 // block_v))
    return block_n, block_v, 4


def launch_selective_ce_backward(logits, targets, lse, mask, scale, row_weight=None, ignore_index=-100,
                                 out=None, *, block_n=None, block_v=None, num_warps=None, num_stages=None,
                                 check=True):
    """Run the backward kernel. logits [N, V] (stride(1) == 1), targets [N] int64/int32, lse [N] fp32
    (any stride, e.g. a row of token_stats' [5, N] output), mask [N] bool, scale 0-dim fp32 on logits'
    device, row_weight [N] fp32 or None. Returns grad [N, V] (contiguous) of logits' dtype, or writes `out`.
    check=False skips the checks of the inputs (device, shapes, strides, dtypes, scale holding one value),
    for callers that have already made them (``cggr.stats_ops``); out and the block sizes are checked
    whenever given.
    """
    if check:
        _check_runnable(logits)
        if logits.dim() != 2 or logits.stride(1) != 1:
            raise ValueError(f"logits must be 2-D with a contiguous last dim, got shape {tuple(logits.shape)} "
                             f"strides {logits.stride()}")
    N, V = logits.shape
    if check:
        for name, t in (("targets", targets), ("lse", lse), ("mask", mask)):
            if t.shape != (N,):
                raise ValueError(f"{name} must have shape ({N},), got {tuple(t.shape)}")
        if row_weight is not None and (row_weight.shape != (N,) or not row_weight.is_contiguous()):
            raise ValueError(f"row_weight must be a contiguous tensor of shape ({N},)")
        if scale.numel() != 1:
            raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
        if mask.dtype != torch.bool or not mask.is_contiguous() or not targets.is_contiguous():
            raise ValueError("mask must be a contiguous bool tensor and targets contiguous")
    if out is None:
        out = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    elif out.shape != (N, V) or out.dtype != logits.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {logits.dtype} tensor of shape ({N}, {V})")
    if N == 0 or V == 0:
        return out
    cfg_n, cfg_v, cfg_w = selective_ce_backward_config(V, logits.dtype)
    block_n = block_n or cfg_n
    block_v = block_v or cfg_v
    num_warps = num_warps or cfg_w
    if block_n & (block_n - 1) or block_v & (block_v - 1):
        raise ValueError(f"block_n and block_v must be powers of two, got {block_n} and {block_v}")
    extra = {} if num_stages is None else {"num_stages": num_stages}
    grid = (triton.cdiv(N, block_n),)
    _selective_ce_backward_kernel[grid](
        logits, targets, lse, mask.view(torch.uint8), scale,
        row_weight if row_weight is not None else scale, out,
        N, V, logits.stride(0), lse.stride(0), ignore_index,
        HAS_WEIGHT=row_weight is not None, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps, **extra,
    )
    return out
