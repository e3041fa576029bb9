"""Per-token statistics of a logits matrix in ONE online pass over the vocabulary.

For each row x = logits[n, :V] the kernel produces, in float32 (layout [5, N]):

    0  lse      log sum_v exp(x_v)
    1  nll      lse - x[target]         (0 where target == ignore_index, NaN where target is out of [0, V))
    2  entropy  H = -sum_v p_v log p_v  (nats, p = softmax(x))
    3  p1       largest probability
    4  p2       second largest probability (== p1 when the largest logit occurs twice; 0 when V == 1)

One read of the logits: the row is swept in BLOCK_V-wide chunks keeping
  m  running max (one tl.max per chunk),
  s  = sum exp(x - m)             (rescaled by exp(m_old - m_new) when m grows),
  t  = sum exp(x - m) * (x - m)   (rescaled as scale * (t + (m_old - m_new) * s)),
so that lse = m + log s and H = lse - sum p x = log s - t / s. Working with (x - m) instead of x
keeps t free of the cancellation that lse - sum(p * x) suffers when |x| is large.
The top-2 logits are tracked per lane (t1 >= t2 per tile position, 3 min/max per element, no
reduction per chunk) and merged across lanes once at the end of the row; or, with BRANCH_TOP2, per row
from the chunk maximum, computing a chunk's second largest only when the chunk maximum beats the
running second (rare after the first chunks). Both are exact, ties included.

Rows are processed BLOCK_N at a time (BLOCK_N == 1 for large V; several rows per program for small V
so each program still moves a useful amount of data).
"""
import os

import torch
import triton
import triton.language as tl

# exp(d) underflows to exactly 0 in float32 for d < -104; clamping d here keeps exp(d) * d == 0
# (instead of 0 * -inf = NaN) for -inf logits and for the -inf padding of the last chunk.
_D_MIN = tl.constexpr(-200.0)
# Finite stand-in for "no maximum yet": exp(_M_INIT - m) == 0 for any real m, and
# _M_INIT - _M_INIT == 0 (not NaN) while a row has seen only -inf values.
_M_INIT = tl.constexpr(-3.0e38)


@triton.jit
def _token_stats_kernel(
    logits_ptr,
    targets_ptr,
    out_ptr,
    N,
    V,
    stride_row,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANE_SUMS: tl.constexpr,
    BRANCH_TOP2: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 before multiplying by the stride: N * V may exceed 2**31.
    row_base = logits_ptr + rows.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_N], _M_INIT, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    if BRANCH_TOP2:
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        second = tl.full([BLOCK_N], float("-inf"), tl.float32)
    else:
        top1 = tl.full([BLOCK_N, BLOCK_V], float("-inf"), tl.float32)
        top2 = tl.full([BLOCK_N, BLOCK_V], float("-inf"), tl.float32)
    if LANE_SUMS:
        s_lane = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        t_lane = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)

    if PREFETCH:
        x_next = tl.load(row_base[:, None] + cols0[None, :], mask=row_ok[:, None] & (cols0 < V)[None, :],
                         other=float("-inf"))
    for v0 in range(0, V, BLOCK_V):
        if PREFETCH:
            # software pipelining by hand: the next chunk's loads are in flight while this one is reduced
            x = x_next.to(tl.float32)
            cols_next = v0 + BLOCK_V + cols0
            x_next = tl.load(row_base[:, None] + cols_next[None, :],
                             mask=row_ok[:, None] & (cols_next < V)[None, :], other=float("-inf"))
        else:
            cols = v0 + cols0
            ld_mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(row_base[:, None] + cols[None, :], mask=ld_mask, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=1)
        if BRANCH_TOP2:
            # the chunk's own top-2 is needed only when it holds a value above the running second;
            # after the first chunks that is rare, so most chunks skip these two extra reductions
            if tl.sum((block_max > second).to(tl.int32), axis=0) > 0:
                is_bm = x == block_max[:, None]
                n_bm = tl.sum(is_bm.to(tl.int32), axis=1)
                block_second = tl.max(tl.where(is_bm, float("-inf"), x), axis=1)
                block_second = tl.where(n_bm > 1, block_max, block_second)
                second = tl.maximum(tl.minimum(best, block_max), tl.maximum(second, block_second))
                best = tl.maximum(best, block_max)
        else:
            # per-lane running top-2 of the raw logits (duplicates land in top2 via the min)
            top2 = tl.maximum(top2, tl.minimum(top1, x))
            top1 = tl.maximum(top1, x)
        # online softmax sums around the running max
        m_new = tl.maximum(m, block_max)
        delta = m - m_new
        rescale = tl.exp(delta)
        d = tl.maximum(x - m_new[:, None], _D_MIN)
        e = tl.exp(d)
        if LANE_SUMS:
            # per-lane sums: two more FMAs per element, but no cross-warp reduction per chunk
            t_lane = rescale[:, None] * (t_lane + delta[:, None] * s_lane) + e * d
            s_lane = s_lane * rescale[:, None] + e
        else:
            t = rescale * (t + delta * s) + tl.sum(e * d, axis=1)
            s = s * rescale + tl.sum(e, axis=1)
        m = m_new

    if LANE_SUMS:
        s = tl.sum(s_lane, axis=1)
        t = tl.sum(t_lane, axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s

    if not BRANCH_TOP2:
        # merge the per-lane top-2: the second largest of the row is the larger of every lane's second
        # and the second largest lane maximum (the row maximum itself when it occurs in two lanes).
        best = tl.max(top1, axis=1)
        is_best = top1 == best[:, None]
        n_best = tl.sum(is_best.to(tl.int32), axis=1)
        other_lanes = tl.max(tl.where(is_best, float("-inf"), top1), axis=1)
        second = tl.maximum(tl.max(top2, axis=1), other_lanes)
        second = tl.where(n_best > 1, best, second)
    # (x - m) - log s rather than x - lse: exact when |m| is huge and log s is not
    p1 = tl.exp((best - m) - log_s)
    # V == 1 has no second logit: 0 by contract (the formula gives NaN for a row of -inf or NaN)
    p2 = tl.where(V > 1, tl.exp((second - m) - log_s), 0.0)

    # target logit: one scalar load per row, only for targets inside [0, V)
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    ignored = tgt == ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    x_t = tl.load(row_base + tgt, mask=row_ok & in_range & (~ignored), other=0.0).to(tl.float32)
    nll = tl.where(ignored, 0.0, tl.where(in_range, (m - x_t) + log_s, float("nan")))

    tl.store(out_ptr + rows, lse, mask=row_ok)
    tl.store(out_ptr + N + rows, nll, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, entropy, mask=row_ok)
    tl.store(out_ptr + 3 * N + rows, p1, mask=row_ok)
    tl.store(out_ptr + 4 * N + rows, p2, mask=row_ok)


def token_stats_config(V, dtype):
    """Launch config for a vocabulary size and logits dtype: a dict of block_n, block_v, num_warps,
    lane_sums, branch_top2 (the keyword arguments of launch_token_stats).

    A fixed table instead of autotuning, so the first call is as fast as the rest; the benchmark's
    --sweep times alternatives on the GPU. Large V: one row per program, a wide chunk so each thread
    keeps two 16-byte loads in flight (16 elements per thread). Small V: the whole row in one chunk and
    several rows per program so a program still moves ~8-16 KB. branch_top2 everywhere: most chunks skip
    the chunk top-2 reductions, so its hot loop has fewer instructions and needs fewer registers than
    the per-lane top-2 (three min/max per element and two more [BLOCK_N, BLOCK_V] accumulators), and with
    a single chunk per row it is the cheaper top-2 as well. See BENCHMARKS.md (token scoring).
    """
    if V >= 16384:
        # small programs (few warps) with many rows in flight per SM beat wide ones that stall on
        # cross-warp reductions; see BENCHMARKS.md (token scoring)
        block_v, warps = (2048, 2) if dtype.itemsize == 2 else (4096, 8)
        return dict(block_n=1, block_v=block_v, num_warps=warps, lane_sums=False, branch_top2=True)
    block_v = triton.next_power_of_2(V)
    if block_v >= 4096:
        return dict(block_n=1, block_v=block_v, num_warps=8, lane_sums=False, branch_top2=True)
    block_n = min(16, max(1, 4096 // block_v))
    return dict(block_n=block_n, block_v=block_v, num_warps=4, lane_sums=False, branch_top2=True)


def _check_runnable(t):
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {t.device}")


def launch_token_stats(logits, targets, ignore_index=-100, out=None, *, block_n=None, block_v=None,
                       num_warps=None, num_stages=None, lane_sums=None, branch_top2=None, prefetch=None,
                       check=True):
    """Run the token_stats kernel: logits [N, V] (stride(1) == 1), targets [N] int64/int32 -> [5, N] fp32.

    No argument checking beyond what the kernel needs to be memory safe (the op layer checks dtypes and
    shapes). Every keyword left None comes from the table in token_stats_config;
    lane_sums=True selects the variant that keeps the softmax sums per lane (reduced once per row);
    branch_top2=True tracks the top-2 per row, computing a chunk's top-2 only when it can matter,
    instead of per lane (three min/max per element); prefetch=True issues the next chunk's loads before
    reducing the current one (hand-written software pipelining, one more chunk of registers).
    check=False skips the checks of logits and targets (device, shapes, strides, V > 0), for callers that
    have already made them (``cggr.stats_ops``); out and the block sizes are checked whenever given.
    """
    if check:
        _check_runnable(logits)
        if logits.dim() != 2 or logits.stride(1) != 1:
            raise ValueError(f"logits must be 2-D with a contiguous last dim, got shape {tuple(logits.shape)} "
                             f"strides {logits.stride()}")
    N, V = logits.shape
    if check:
        if targets.shape != (N,) or not targets.is_contiguous():
            raise ValueError(f"targets must be a contiguous tensor of shape ({N},), got {tuple(targets.shape)}")
        if V == 0:
            raise ValueError("logits has an empty vocabulary dimension (V == 0)")
    if out is None:
        out = torch.empty((5, N), dtype=torch.float32, device=logits.device)
    elif out.shape != (5, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape (5, {N})")
    if N == 0:
        return out
    cfg = token_stats_config(V, logits.dtype)
    block_n = block_n or cfg["block_n"]
    block_v = block_v or cfg["block_v"]
    num_warps = num_warps or cfg["num_warps"]
    lane_sums = cfg["lane_sums"] if lane_sums is None else lane_sums
    branch_top2 = cfg["branch_top2"] if branch_top2 is None else branch_top2
    prefetch = cfg.get("prefetch", False) if prefetch is None else prefetch
    if block_n & (block_n - 1) or block_v & (block_v - 1):
        raise ValueError(f"block_n and block_v must be powers of two, got {block_n} and {block_v}")
    extra = {} if num_stages is None else {"num_stages": num_stages}
    grid = (triton.cdiv(N, block_n),)
    _token_stats_kernel[grid](
        logits, targets, out, N, V, logits.stride(0), ignore_index,
        BLOCK_N=block_n, BLOCK_V=block_v, LANE_SUMS=bool(lane_sums),
        BRANCH_TOP2=bool(branch_top2), PREFETCH=bool(prefetch), num_warps=num_warps, **extra,
    )
    return out
