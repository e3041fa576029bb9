"""Fused LM head + selective cross-entropy: the [N, V] logits are never materialised, and the LM-head
backward runs only on the selected (hard) tokens.

Two entry points:

- ``token_stats_from_hidden(hidden, weight, targets, ...)``: per-token statistics (lse, nll, entropy,
  p1, p2) of ``hidden @ weight.T (+ bias)``, computed chunk of tokens by chunk of tokens, no grad.
- ``fused_linear_selective_ce(hidden, weight, targets, select_fn, ...)``: the same statistics, a
  selection over all tokens at once by the caller's ``select_fn``, and a loss over the selected tokens
  whose backward recomputes only their logits.

How the work is laid out (N tokens, H hidden size, V vocabulary, S selected tokens):

forward   for each chunk of token rows: logits = h_chunk @ W.T (+ b) (cuBLAS, in the input dtype with
          fp32 accumulation) -> optional soft cap in place (``cggr.ops.softcap_``) ->
          ``torch.ops.cggr.token_stats`` -> keep the [5, rows] statistics, reuse the logits buffer for
          the next chunk. 2NHV flops.
select    ``mask = select_fn(stats, valid)`` over all tokens at once; the loss is read from the saved nll.
backward  the S selected rows are compacted without a host sync (``cggr.ops.compact_indices``) and
          gathered once (h_sel [S, H]); the VOCABULARY is then tiled: for each slice [v0, v1) of W,
              g = h_sel @ W[v0:v1].T          recompute, [S, v1 - v0]
              g = (softmax - onehot) * coef   in place, from the forward's lse (a slice needs nothing
                                              else from its row): ``cggr.ops.linear_ce_grad_``
              grad_W[v0:v1] = g.T @ h_sel     written once: no read-modify-write of grad_W, no
                                              accumulation rounding in the weight's dtype
              grad_h_sel   += g @ W[v0:v1]    [S, H] float32 accumulator (small): ``cggr.ops.addmm_f32_``
              grad_b[v0:v1] = g.sum(0)
          3 * 2SHV flops; unselected rows cost nothing and their grad_hidden rows are exact zeros.
          Tiling V rather than tokens is what keeps grad_W exact and cheap: tiling tokens would add
          every chunk's g.T @ h into grad_W (V*H reads+writes per chunk, one rounding per chunk).

Memory (the default chunking): at most one chunk of logits is alive at any time. A forward chunk may
be as large as the gradients the backward allocates anyway (grad_W [V, H] + grad_hidden [N, H]) so it
never raises the step's peak; a backward slice is about the size of the hidden states minus the
[S, H] working buffers. ``chunk_size`` overrides both (see its docs).

Host synchronisation: one, at most, per call (reading the selected count and validating targets
together); none when ``validate_targets=False`` and ``max_selected`` is given.

Every device-specific kernel is a ``torch.ops.cggr`` operator called through ``cggr.ops`` (CUDA and
CPU implementations behind one dispatch); this module never branches on the device. Timings and
memory measurements: see BENCHMARKS.md.
"""
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from . import ops

__all__ = ["token_stats_from_hidden", "fused_linear_selective_ce", "default_chunk_size",
           "FusedLinearSelectiveCE"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGET_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum", "none")
# Chunks never go below this many bytes of logits (tiny chunks make the matmuls launch-bound).
_MIN_CHUNK_BYTES = 16 << 20
_MIN_SLICE_BYTES = 24 << 20  # backward slices: see _backward_cols
# Row counts of forward chunks and column counts of backward slices are rounded down to these
# multiples (when larger) so the matmul tiles stay whole.
_ROW_ALIGN = 64
_COL_ALIGN = 128
# Default backward slices are at least this wide (when V allows): narrower slices make grad_W's
# per-slice matmul ([cols, S] @ [S, H]) a skinny, launch-bound one. Only matters for large S.
_MIN_COLS = 2048


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _dtype_name(x):
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_common(op, hidden, weight, targets, bias, chunk_size, softcap):
    """Check shapes/dtypes/devices; return (hidden2d, targets_flat, token_shape, N, H, V)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be a float16/bfloat16/float32 tensor, got {_dtype_name(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: weight must be a float16/bfloat16/float32 tensor, got {_dtype_name(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype} "
                        f"(cast one of them: the matmul runs in a single dtype)")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [V, H], got shape {tuple(weight.shape)}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{op}: hidden size mismatch: hidden has H={H} (shape {tuple(hidden.shape)}) but "
                         f"weight is {tuple(weight.shape)}; weight must be [V, H] (nn.Linear(H, V).weight)")
    if V == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary dimension (shape {tuple(weight.shape)})")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in _TARGET_DTYPES:
        raise TypeError(f"{op}: targets must be an int64 or int32 tensor, got {_dtype_name(targets)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} does not match hidden shape "
                         f"{tuple(hidden.shape)} without its last dim ({tuple(hidden.shape[:-1])})")
    named = [("weight", weight), ("targets", targets)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias must be a tensor of hidden's dtype {hidden.dtype}, got {_dtype_name(bias)}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{op}: bias must have shape ({V},) (one value per vocabulary entry of weight), "
                             f"got {tuple(bias.shape)}")
        named.append(("bias", bias))
    for name, t in named:
        if t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
                math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{op}: softcap must be a positive finite number or None, got {softcap!r}")
    h2d = hidden.reshape(-1, H)  # a view whenever the leading dims can be merged
    return h2d, targets.reshape(-1), targets.shape, h2d.shape[0], H, V


def _sync_check(op, targets_flat, token_shape, V, ignore_index, validate, count):
    """The single host synchronisation: validate targets and/or read the selected count together.

    Returns the count as an int (None when ``count`` is None). Raises ValueError naming the first
    target outside [0, V) that is not ignore_index.
    """
    items = []
    check_targets = validate and targets_flat.numel() > 0
    if check_targets:
        bad = (targets_flat != ignore_index) & ((targets_flat < 0) | (targets_flat >= V))
        first = torch.argmax(bad.to(torch.uint8))  # argmax returns the first maximal index
        items += [bad[first].long(), first, targets_flat[first].long()]
    if count is not None:
        items.append(count.reshape(()).long())
    if not items:
        return None
    host = torch.stack(items).tolist()  # <- the host sync
    if check_targets and host[0]:
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(host[1]), tuple(token_shape)))
        raise ValueError(f"{op}: targets{list(where)} = {host[2]} is outside [0, {V}) and is not "
                         f"ignore_index ({ignore_index})")
    return host[-1] if count is not None else None


# --------------------------------------------------------------------------------------------------
# chunking
# --------------------------------------------------------------------------------------------------
def _align_down(n, multiple):
    return n - n % multiple if n > multiple else n


def _rows_for_bytes(budget_bytes, V, itemsize, N):
    rows = _align_down(max(1, int(budget_bytes) // (V * itemsize)), _ROW_ALIGN)
    return max(1, min(rows, N)) if N > 0 else 1


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Token rows per chunk used by ``token_stats_from_hidden`` when ``chunk_size`` is None.

    A chunk of logits is about as large as the hidden states it comes from (N * H elements, as Liger's
    fused linear cross entropy does), never below 16 MiB; rows rounded down to a multiple of 64.
    """
    itemsize = dtype.itemsize
    budget = max(n_tokens * hidden_size * itemsize, _MIN_CHUNK_BYTES)
    return _rows_for_bytes(budget, vocab_size, itemsize, n_tokens)


def _forward_rows(N, H, V, itemsize, chunk_size, grad_weight, grad_hidden):
    """Forward chunk rows: chunk_size, or up to the size of the gradients the backward will allocate.

    The backward must hold grad_W [V, H] and grad_hidden [N, H] at its peak whatever the chunking, so a
    forward logits chunk of that size does not raise the peak of forward + backward.
    """
    if chunk_size is not None:
        return min(chunk_size, max(N, 1))
    grads = (V * H if grad_weight else 0) + (N * H if grad_hidden else 0)
    budget = max(N * H * itemsize, _MIN_CHUNK_BYTES, grads * itemsize)
    return _rows_for_bytes(budget, V, itemsize, N)


def _backward_cols(S, N, H, V, itemsize, chunk_size, gathered):
    """Vocabulary columns per backward slice of S selected rows.

    chunk_size given: a slice holds at most chunk_size * V logits, like a forward chunk. Default: the
    hidden states' size (N * H elements) minus the [S, H] working buffers (the gathered rows and the
    float32 grad accumulator), never below 24 MiB nor 2048 columns (so for very large S a default slice
    exceeds the budget: 4 KiB per selected row in bf16). Widths are rounded down to a multiple of 128.
    Fewer, wider slices save launches; the width sweep behind the 2048 floor: see BENCHMARKS.md.
    """
    if chunk_size is not None:
        cols = chunk_size * V // max(S, 1)
    else:
        work = S * H * (4 + (itemsize if gathered else 0))
        elements = max(N * H * itemsize - work, _MIN_SLICE_BYTES) // itemsize
        cols = max(elements // max(S, 1), _MIN_COLS)
    if cols >= V:
        return V
    return max(1, _align_down(cols, _COL_ALIGN))


# --------------------------------------------------------------------------------------------------
# building blocks (the device-specific kernels are torch.ops.cggr operators: cggr.linear_ops)
# --------------------------------------------------------------------------------------------------
def _logits_into(out, h, w, b):
    """out = h @ w.T (+ b), in h's dtype (cuBLAS accumulates in fp32)."""
    if b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)
    return out


def _chunked_stats(h2d, weight, bias, targets, ignore_index, rows, softcap):
    """[5, N] float32 statistics of h2d @ weight.T (+ bias), one logits chunk of ``rows`` rows alive."""
    N = h2d.shape[0]
    V = weight.shape[0]
    if N == 0:
        return torch.empty((5, 0), dtype=torch.float32, device=h2d.device)
    rows = min(rows, N)
    # One buffer reused by every chunk (out= matmuls): a fresh tensor per chunk would briefly hold two
    # chunks, since the new one is allocated before the old name is rebound.
    buf = torch.empty(rows * V, dtype=h2d.dtype, device=h2d.device)
    parts = []
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        logits = _logits_into(buf[: (r1 - r0) * V].view(r1 - r0, V), h2d[r0:r1], weight, bias)
        if softcap is not None:
            ops.softcap_(logits, softcap)
        parts.append(torch.ops.cggr.token_stats(logits, targets[r0:r1], ignore_index))
    del buf, logits
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _autocast_inputs(hidden, weight, bias):
    """Under an active autocast, compute in its dtype, as ``F.linear`` would: fp32 master weights with
    bf16 autocast get bf16 logits (not fp32 matmuls), and the casts are differentiable, so their
    gradients still arrive in fp32. The work itself then runs with autocast off (its matmuls write into
    preallocated buffers, which autocast would not cast anyway)."""
    device_type = hidden.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t if t is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)
    return cast(hidden), cast(weight), cast(bias)


# --------------------------------------------------------------------------------------------------
# token_stats_from_hidden
# --------------------------------------------------------------------------------------------------
def token_stats_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                            chunk_size: Optional[int] = None, softcap: Optional[float] = None,
                            validate_targets: bool = True) -> "ops.TokenStats":
    """Per-token statistics of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    hidden: [N, H] or [B, T, H], float16/bfloat16/float32. weight: [V, H], same dtype. targets: int64 or
    int32, shaped like hidden without its last dim. bias: [V] or None.
    chunk_size: token rows per chunk of logits (one chunk alive at a time); None picks
    ``default_chunk_size`` (a chunk about the size of hidden, at least 16 MiB).
    softcap: None, or c > 0 to compute the statistics of c * tanh(logits / c) (Gemma-2 style).
    validate_targets: raise a ValueError naming the first target outside [0, V) that is not
    ignore_index (one host sync); with False an out-of-range target's nll is NaN.

    Returns a ``cggr.ops.TokenStats`` (lse, nll, entropy, p1, p2) of float32 tensors shaped like targets.
    Never differentiable (computed under no_grad).
    """
    op = "cggr.token_stats_from_hidden"
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    h2d, t_flat, token_shape, N, H, V = _check_common(op, hidden, weight, targets, bias, chunk_size, softcap)
    rows = chunk_size if chunk_size is not None else default_chunk_size(N, H, V, hidden.dtype)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        stats = _chunked_stats(h2d.detach(), weight.detach(), None if bias is None else bias.detach(),
                               t_flat, int(ignore_index), rows, softcap)
    _sync_check(op, t_flat, token_shape, V, int(ignore_index), validate_targets, None)
    return ops.TokenStats(*(stats[i].view(token_shape) for i in range(5)))


# --------------------------------------------------------------------------------------------------
# the autograd Function
# --------------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """Host-side facts the backward needs (no tensors)."""
    reduction: str
    ignore_index: int
    softcap: Optional[float]
    chunk_size: Optional[int]
    capacity: int      # rows given to compact_indices (>= the selected count unless `exact` is False)
    exact: bool        # capacity is the true selected count (read at the host sync)
    all_rows: bool     # every row is selected: no compaction, no gather, no scatter


class FusedLinearSelectiveCE(torch.autograd.Function):
    """loss over selected rows of hidden @ weight.T (+ bias), from precomputed statistics.

    forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N], sel [N] bool (selected AND
    valid), lse [N] f32, nll [N] f32, row_weight [N] f32 | None, count 0-dim int64 (= sel.sum()),
    plan) -> loss. Use ``fused_linear_selective_ce``, which computes the statistics and the selection.
    Gradients flow to hidden, weight and bias; row_weight is a constant. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sel, lse, nll, row_weight, count, plan):
        per_token = torch.where(sel, nll, 0.0)  # 0 (not NaN) on unselected rows whatever their nll
        if row_weight is not None:
            per_token = per_token * row_weight
        if plan.reduction == "none":
            loss = per_token
        elif plan.reduction == "sum":
            loss = per_token.sum()
        else:
            loss = per_token.sum() / count.clamp_min(1)
        ctx.save_for_backward(hidden, weight, bias, targets, sel, lse, row_weight, count)
        ctx.plan = plan
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, sel, lse, row_weight, count = ctx.saved_tensors
        plan = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _selected_backward(hidden, weight, bias, targets, sel, lse, row_weight, count, grad_out, plan,
                                   need_h, need_w, need_b and bias is not None)
        return grads + (None,) * 7


def _row_coef(sel, row_weight, count, grad_out, plan):
    """Per-row factor d loss / d nll[row] (float32 [N]); 0 on rows that are not selected."""
    g = grad_out.float()
    if plan.reduction == "none":
        g = g.reshape(-1)
    elif plan.reduction == "mean":
        g = g.reshape(()) / count.clamp_min(1)
    else:
        g = g.reshape(())
    if row_weight is not None:
        g = g * row_weight
    coef = torch.where(sel, g.expand(sel.shape), 0.0)
    if not plan.exact:
        # The caller's max_selected bound was not checked on the host (no sync). If the selection is
        # larger, compact_indices keeps only `capacity` rows: poison every gradient with NaN rather
        # than silently dropping rows.
        coef = torch.where(count > plan.capacity, float("nan"), coef)
    return coef


def _selected_backward(hidden, weight, bias, targets, sel, lse, row_weight, count, grad_out, plan,
                       need_h, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    S = plan.capacity
    grad_w = torch.empty((V, H), dtype=dtype, device=device) if need_w else None
    grad_b = torch.empty((V,), dtype=dtype, device=device) if need_b else None
    if S == 0 or N == 0:
        # nothing selected: exact zeros, no matmul
        if grad_w is not None:
            grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        grad_h = torch.zeros_like(hidden) if need_h else None
        return grad_h, grad_w, grad_b

    coef = _row_coef(sel, row_weight, count, grad_out, plan)
    if plan.all_rows:
        idx = None
        h_sel, t_sel, lse_sel, c_sel = hidden, targets, lse, coef
    else:
        idx, _ = ops.compact_indices(sel, S)  # ascending row indices, -1 padding past the count; no sync
        safe = idx.clamp_min(0)
        h_sel = hidden.index_select(0, safe)
        t_sel = targets.index_select(0, safe)
        lse_sel = lse.index_select(0, safe)
        # padding rows gather row 0 but get coef 0: their gradient rows are exact zeros
        c_sel = torch.where(idx >= 0, coef.index_select(0, safe), 0.0)
    t_sel = t_sel.contiguous()
    lse_sel = lse_sel.contiguous()
    c_sel = c_sel.contiguous()

    # float16: the per-row factor stays out of the stored gradient, which is then p - onehot in [-1, 1].
    # coef * p (e.g. 1/4096 * 1e-5) is below float16's smallest subnormal (6e-8) and would flush to zero,
    # losing the softmax part of every gradient. The factor goes on the gathered rows for grad_W and
    # grad_b, and on the float32 grad_hidden rows at the end. bfloat16/float32 have the range: one pass.
    prescale = dtype == torch.float16
    if prescale:
        kernel_coef = (c_sel != 0).float()  # 1 on active rows (NaN != 0: a poisoned row stays active)
        h_w = torch.mul(h_sel, c_sel[:, None], out=torch.empty_like(h_sel)) if need_w else None
        c_b = c_sel.to(dtype) if need_b else None
    else:
        kernel_coef, h_w = c_sel, h_sel

    cols = _backward_cols(S, N, H, V, hidden.element_size(), plan.chunk_size, gathered=not plan.all_rows)
    buf = torch.empty(S * cols, dtype=dtype, device=device)
    gh = torch.empty((S, H), dtype=torch.float32, device=device) if need_h else None
    for j, v0 in enumerate(range(0, V, cols)):
        v1 = min(V, v0 + cols)
        w_s = weight[v0:v1]
        g = _logits_into(buf[: S * (v1 - v0)].view(S, v1 - v0), h_sel, w_s,
                         None if bias is None else bias[v0:v1])
        ops.linear_ce_grad_(g, lse_sel, t_sel, kernel_coef, v0, plan.softcap)
        if need_w:
            torch.mm(g.t(), h_w, out=grad_w[v0:v1])
        if need_b:
            if prescale:
                torch.mv(g.t(), c_b, out=grad_b[v0:v1])
            else:
                torch.sum(g, dim=0, out=grad_b[v0:v1])
        if need_h:
            ops.addmm_f32_(gh, g, w_s, accumulate=j > 0)
    del buf, g, h_w

    grad_h = None
    if need_h:
        if prescale:
            gh.mul_(c_sel[:, None])
        if plan.all_rows:
            grad_h = gh.to(dtype)
        else:
            # Reuse the gathered rows' buffer for the low-precision copy and free the float32 one before
            # the [N, H] gradient is allocated. Row N is a scratch row that absorbs the padding (-1)
            # entries, so index_copy_ never sees a duplicate real index.
            h_sel.copy_(gh)
            del gh
            full = torch.zeros((N + 1, H), dtype=dtype, device=device)
            full.index_copy_(0, torch.where(idx >= 0, idx, N), h_sel)
            grad_h = full[:N]
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------------
def fused_linear_selective_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              select_fn: Callable, *, bias: Optional[torch.Tensor] = None,
                              ignore_index: int = -100, reduction: str = "mean",
                              chunk_size: Optional[int] = None, softcap: Optional[float] = None,
                              row_weight: Optional[torch.Tensor] = None, validate_targets: bool = True,
                              max_selected: Optional[int] = None):
    """Selective cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    Returns ``(loss, stats, mask)``:
      loss   float32; 'mean': sum over selected valid tokens of row_weight * nll, divided by their
             count (0 with zero gradients when there is none); 'sum': that sum; 'none': per-token
             row_weight * nll shaped like targets, 0 on tokens not selected.
      stats  ``cggr.ops.TokenStats`` (lse, nll, entropy, p1, p2), float32, shaped like targets, no grad.
      mask   what ``select_fn`` returned (tokens with target == ignore_index never count, selected or not).

    Arguments:
      hidden      [N, H] or [B, T, H], float16/bfloat16/float32 (the last hidden states).
      weight      [V, H], hidden's dtype: the LM head (``nn.Linear(H, V).weight``). May be shared with the
                  input embedding (tied weights): its gradient is returned to autograd, which sums it
                  with the embedding's.
      targets     int64/int32, shaped like hidden without the last dim (already shifted: row n predicts
                  targets[n]).
      select_fn   ``select_fn(stats, valid) -> mask``: stats as returned above, valid = targets !=
                  ignore_index; mask bool shaped like targets. Called once, over all tokens at once, e.g.
                  ``lambda stats, valid: cggr.ops.select_topk(stats.nll, valid, 0.25)``.
      bias        [V] or None, hidden's dtype.
      ignore_index  targets equal to it contribute nothing (and are never selected).
      reduction   'mean' | 'sum' | 'none' (above).
      chunk_size  token rows per forward chunk of logits; the backward then uses slices of at most
                  chunk_size * V logits. None (default): forward chunks up to the size of the gradients
                  the backward allocates anyway (grad_W + grad_hidden), backward slices about the size of
                  hidden minus the [S, H] working buffers, never below 16 MiB. Only one chunk of logits is
                  alive at any time, forward or backward.
      softcap     None, or c > 0: logits are c * tanh(logits / c) (Gemma-2 style), stats and gradients
                  included.
      row_weight  None, or float weights shaped like targets multiplying each token's loss (a constant:
                  no gradient flows to it). 'mean' still divides by the selected count, not by the
                  weights' sum.
      validate_targets  check that every target is in [0, V) or is ignore_index and raise a ValueError
                  naming the first bad one. Costs a host sync, shared with reading the selected count.
                  With False an out-of-range target has nll NaN (keep it out of the selection).
      max_selected  a host-known upper bound on the number of selected tokens (e.g. ceil(ratio * N) for
                  select_topk). It sizes the backward's compacted row buffer; padding rows cost work,
                  so a tight bound matters. None: the exact count is read on the host (one sync, the same
                  as validate_targets'). With validate_targets=False and max_selected given there is no
                  host sync at all; a selection larger than max_selected then makes every gradient NaN
                  (it cannot raise without a sync); with validate_targets=True it raises a ValueError.

    Data parallel (DDP, FSDP2): call with ``reduction='sum'`` and divide by the group's selected count,
    ``cggr.distributed.global_token_mean(loss, (mask & (targets != ignore_index)).sum(), cggr.DataParallel())``
    (``CGGRLoss(data_parallel=...).forward_linear`` does this). Under FSDP2 ``weight`` must be the gathered LM
    head: call this inside the forward of the FSDP module that owns it (its pre-forward hook gathers it).

    Autocast: under an active ``torch.autocast`` the logits are computed in its dtype (hidden, weight
    and bias are cast first, differentiably), as ``F.linear`` would be; gradients reach fp32 master
    weights in fp32.

    Gradients: hidden, weight and bias (when they require grad). Rows not selected get exact zeros in
    grad_hidden and no work. Precision: logits in the input dtype (as eager ``h @ W.T``), softmax and
    gradient math in float32, grad_hidden accumulated over vocabulary slices in float32, grad_weight
    written once per row of W (no accumulation in the weight's dtype). float16: the stored logits
    gradient is softmax - onehot, unscaled (the 1/count factor would push it below float16's range);
    the factor is applied to the rows instead, so no loss scaler is needed for this layer.
    """
    op = "cggr.fused_linear_selective_ce"
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_linear_selective_ce(op, hidden, weight, targets, select_fn, bias, ignore_index, reduction,
                                          chunk_size, softcap, row_weight, validate_targets, max_selected)


def _fused_linear_selective_ce(op, hidden, weight, targets, select_fn, bias, ignore_index, reduction, chunk_size,
                               softcap, row_weight, validate_targets, max_selected):
    h2d, t_flat, token_shape, N, H, V = _check_common(op, hidden, weight, targets, bias, chunk_size, softcap)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not callable(select_fn):
        raise TypeError(f"{op}: select_fn must be callable as select_fn(stats, valid) -> mask, "
                        f"got {type(select_fn).__name__}")
    if max_selected is not None and (isinstance(max_selected, bool) or not isinstance(max_selected, int)
                                     or max_selected < 0):
        raise ValueError(f"{op}: max_selected must be an int >= 0 or None, got {max_selected!r}")
    rw_flat = None
    if row_weight is not None:
        if not isinstance(row_weight, torch.Tensor) or not row_weight.is_floating_point():
            raise TypeError(f"{op}: row_weight must be a floating-point tensor or None, got {_dtype_name(row_weight)}")
        if tuple(row_weight.shape) != tuple(token_shape):
            raise ValueError(f"{op}: row_weight shape {tuple(row_weight.shape)} does not match targets shape "
                             f"{tuple(token_shape)}")
        if row_weight.device != hidden.device:
            raise ValueError(f"{op}: row_weight is on {row_weight.device} but hidden is on {hidden.device}")
        rw_flat = row_weight.detach().reshape(-1).to(torch.float32)
    ignore_index = int(ignore_index)
    softcap = None if softcap is None else float(softcap)
    itemsize = hidden.element_size()

    # 1. statistics, chunk by chunk (no grad)
    rows = _forward_rows(N, H, V, itemsize, chunk_size, grad_weight=weight.requires_grad,
                         grad_hidden=hidden.requires_grad)
    with torch.no_grad():
        stats_flat = _chunked_stats(h2d.detach(), weight.detach(), None if bias is None else bias.detach(),
                                    t_flat, ignore_index, rows, softcap)
    stats = ops.TokenStats(*(stats_flat[i].view(token_shape) for i in range(5)))

    # 2. selection over all tokens at once
    valid = targets != ignore_index
    mask = select_fn(stats, valid)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: select_fn must return a bool tensor, got {_dtype_name(mask)}")
    if tuple(mask.shape) != tuple(token_shape) or mask.device != hidden.device:
        raise ValueError(f"{op}: select_fn returned a mask of shape {tuple(mask.shape)} on {mask.device}; "
                         f"expected shape {tuple(token_shape)} on {hidden.device}")
    sel = (mask & valid).reshape(-1)
    count = sel.sum()

    # 3. the one host sync (when any): validate targets and size the backward's row buffer
    synced = _sync_check(op, t_flat, token_shape, V, ignore_index, validate_targets,
                         count if (validate_targets or max_selected is None) else None)
    if synced is not None:
        if max_selected is not None and synced > max_selected:
            raise ValueError(f"{op}: select_fn selected {synced} tokens, more than max_selected={max_selected}")
        capacity, exact = synced, True
    else:
        capacity, exact = min(max_selected, N), False
    plan = _Plan(reduction, ignore_index, softcap, chunk_size, capacity, exact,
                 all_rows=exact and capacity == N and N > 0)

    loss = FusedLinearSelectiveCE.apply(h2d, weight, bias, t_flat, sel, stats_flat[0], stats_flat[1],
                                        rw_flat, count, plan)
    if reduction == "none":
        loss = loss.view(token_shape)
    return loss, stats, mask
