"""CUDA checks of cggr.linear at real sizes (run on the GPU machine).

    pytest tests/gpu/test_linear_cuda.py -q

Gradients against float64 dense references (computed in row chunks so the references fit), the CUDA
kernels of the cggr.linear_ops ops against their CPU implementations and float64, opcheck of those ops
on CUDA, peak memory against a bound derived from the chunking, and a sync-free call under
torch.cuda.set_sync_debug_mode("error"). Needs ~20 GB of GPU memory.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cggr import linear as L
from cggr import ops
from cggr.linear import fused_linear_selective_ce, token_stats_from_hidden

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton)",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # fp32 tolerances (1e-5) assume full fp32 matmuls, here and in the reference
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved
    torch.cuda.empty_cache()


def make(N, H, V, dtype, bias=False, seed=0, n_ignored=0, logit_scale=2.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) * (logit_scale / math.sqrt(H))).to(dtype)
    b = (torch.randn(V, device="cuda", generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    if n_ignored:
        t[torch.randperm(N, device="cuda", generator=g)[:n_ignored]] = -100
    return h, w, b, t


def topk(ratio):
    return lambda stats, valid: ops.select_topk(stats.nll, valid, ratio)


def reference(h, w, b, t, mask, *, softcap=None, ignore_index=-100, chunk=1024):
    """float64 gradients of mean CE over mask & valid, in row chunks (grad_hidden, grad_weight, grad_bias)."""
    N, H = h.shape
    sel = mask & (t != ignore_index)
    rows = sel.nonzero().squeeze(1)
    count = max(int(rows.numel()), 1)
    w64 = w.double()
    b64 = None if b is None else b.double()
    gh = torch.zeros(N, H, dtype=torch.float64, device="cuda")
    gw = torch.zeros_like(w64)
    gb = None if b is None else torch.zeros_like(b64)
    loss = torch.zeros((), dtype=torch.float64, device="cuda")
    for i in range(0, rows.numel(), chunk):
        r = rows[i:i + chunk]
        hr = h[r].double().requires_grad_()
        wr = w64.clone().requires_grad_()
        br = None if b64 is None else b64.clone().requires_grad_()
        logits = hr @ wr.T
        if br is not None:
            logits = logits + br
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        part = F.cross_entropy(logits, t[r], reduction="sum") / count
        part.backward()
        loss += part.detach()
        gh[r] = hr.grad
        gw += wr.grad
        if gb is not None:
            gb += br.grad
        del logits, hr, wr, br
    return loss, gh, gw, gb


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def run(h, w, b, t, select_fn, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss, stats, mask = fused_linear_selective_ce(h, w, t, select_fn, bias=b, **kw)
    loss.backward()
    return loss.detach(), stats, mask, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("N,H,V", [(4096, 576, 49152), (2048, 4096, 32768)])
@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_gradients_match_float64_reference(dtype, N, H, V, ratio):
    # ratio 1 with no ignored target takes the all-rows path (no gather/scatter); 0.25 the compacted one
    h, w, b, t = make(N, H, V, dtype, bias=(H == 576), n_ignored=N // 16 if ratio < 1 else 0)
    loss, stats, mask, gh, gw, gb = run(h, w, b, t, topk(ratio))
    rloss, rh, rw, rb = reference(h, w, b, t, mask)
    sel = mask & (t != -100)
    tol = TOL[dtype]
    assert rel(loss, rloss) < tol
    assert rel(gh[sel], rh[sel]) < tol
    assert rel(gw, rw) < tol
    if b is not None:
        assert rel(gb, rb) < tol
    assert torch.equal(gh[~sel], torch.zeros_like(gh[~sel]))


def test_softcap_and_chunking_on_cuda():
    h, w, b, t = make(2048, 1024, 32000, torch.bfloat16, bias=True, logit_scale=6.0)
    base = run(h, w, b, t, topk(0.3), softcap=15.0)
    rloss, rh, rw, rb = reference(h, w, b, t, base[2], softcap=15.0)
    sel = base[2]
    assert rel(base[0], rloss) < 1e-2 and rel(base[3][sel], rh[sel]) < 1e-2 and rel(base[4], rw) < 1e-2
    assert rel(base[5], rb) < 1e-2
    for chunk in (100, 1024, 4096):
        got = run(h, w, b, t, topk(0.3), softcap=15.0, chunk_size=chunk)
        assert torch.equal(got[2], base[2])
        assert rel(got[3], base[3]) < 1e-2 and rel(got[4], base[4]) < 1e-2


def test_stats_match_token_stats_of_full_logits():
    h, w, b, t = make(4096, 576, 49152, torch.bfloat16, bias=True)
    ref = ops.token_stats(torch.addmm(b, h, w.t()), t)
    got = token_stats_from_hidden(h, w, t, bias=b)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=2e-3, atol=2e-3)  # cuBLAS may tile differently per chunk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_cuda_kernels_match_cpu_implementations(dtype, softcap):
    """The ops on CUDA tensors (Triton) against the same ops on CPU tensors (torch)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    R, C, v0 = 512, 12345, 4000
    x = (torch.randn(R, C, device="cuda", generator=g) * 4).to(dtype)
    lse = torch.randn(R, device="cuda", generator=g) + 12
    t = torch.randint(0, 20000, (R,), device="cuda", generator=g)
    coef = torch.rand(R, device="cuda", generator=g)
    coef[::7] = 0.0
    expect = ops.linear_ce_grad_(x.cpu(), lse.cpu(), t.cpu(), coef.cpu(), v0, softcap)
    got = ops.linear_ce_grad_(x.clone(), lse, t, coef, v0, softcap).cpu()
    rtol = 1e-5 if dtype == torch.float32 else (1e-2 if softcap is None else 3e-2)
    torch.testing.assert_close(got.float(), expect.float(), rtol=rtol, atol=1e-6)
    assert not got[::7].any()
    expect = ops.softcap_(x.cpu(), 7.0)
    got = ops.softcap_(x.clone(), 7.0).cpu()
    torch.testing.assert_close(got.float(), expect.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_addmm_f32_cuda_matches_float64(dtype):
    """cuBLAS with float32 output from half inputs: the running sum is never rounded to the half type."""
    g = torch.Generator(device="cuda").manual_seed(4)
    M, K, N = 1031, 2049, 577
    a = [torch.randn(M, K, device="cuda", generator=g).to(dtype) for _ in range(3)]
    b = [torch.randn(K, N, device="cuda", generator=g).to(dtype) for _ in range(3)]
    acc = torch.full((M, N), float("nan"), device="cuda")
    for j in range(3):
        ops.addmm_f32_(acc, a[j], b[j], accumulate=j > 0)
    ref = sum(x.double() @ y.double() for x, y in zip(a, b))
    assert rel(acc, ref) < 1e-6


def test_opcheck_cuda():
    g = torch.Generator(device="cuda").manual_seed(9)
    R, C = 33, 3001
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(R, C, device="cuda", generator=g) * 4).to(dtype)
        torch.library.opcheck(torch.ops.cggr.softcap_.default, (x.clone(), 5.0))
        lse = torch.logsumexp(x.float(), dim=1)
        t = torch.randint(0, 2 * C, (R,), device="cuda", generator=g)
        t[3] = -100
        coef = torch.rand(R, device="cuda", generator=g)
        coef[3] = 0.0
        for softcap in (None, 5.0):
            torch.library.opcheck(torch.ops.cggr.linear_ce_grad_.default, (x.clone(), lse, t, coef, 1000, softcap))
        a = torch.randn(R, 129, device="cuda", generator=g).to(dtype)
        b = torch.randn(129, 65, device="cuda", generator=g).to(dtype)
        for accumulate in (False, True):
            torch.library.opcheck(torch.ops.cggr.addmm_f32_.default,
                                  (torch.randn(R, 65, device="cuda", generator=g), a, b, accumulate))


def test_no_host_sync_with_max_selected():
    N, H, V = 4096, 576, 49152
    h, w, b, t = make(N, H, V, torch.bfloat16)
    ratio = torch.tensor(0.25, device="cuda")
    sf = lambda stats, valid: ops.select_topk(stats.nll, valid, ratio)  # noqa: E731
    base = run(h, w, b, t, sf)
    run(h, w, b, t, sf, validate_targets=False, max_selected=math.ceil(0.25 * N))  # warm-up (compilation)
    h2 = h.clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = fused_linear_selective_ce(h2, w2, t, sf, validate_targets=False,
                                               max_selected=math.ceil(0.25 * N))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel(h2.grad, base[3]) < 1e-3 and rel(w2.grad, base[4]) < 1e-3


def _bound_bytes(N, H, V, S, itemsize, chunk_size):
    """Peak allowed by the design: one chunk of logits plus the [S, H] buffers plus the gradients."""
    rows = L._forward_rows(N, H, V, itemsize, chunk_size, grad_weight=True, grad_hidden=True)
    cols = L._backward_cols(S, N, H, V, itemsize, chunk_size, gathered=S < N)
    grads = (V * H + (N + 1) * H) * itemsize
    forward = rows * V * itemsize + 5 * N * 4 * 2
    backward_loop = V * H * itemsize + S * cols * itemsize + S * H * (itemsize + 4) + S * 32
    backward_end = grads + S * H * (itemsize + 4)
    return max(forward, backward_loop, backward_end) + (8 << 20)  # + small vectors and allocator rounding


@pytest.mark.parametrize("N,H,V", [(16384, 576, 49152), (8192, 4096, 128256)])
@pytest.mark.parametrize("chunk_size", [None, 512])
def test_peak_memory_bounded_by_chunk(N, H, V, chunk_size):
    dtype = torch.bfloat16
    h, w, _, t = make(N, H, V, dtype, logit_scale=1.0)
    h.requires_grad_()
    w.requires_grad_()
    ratio = 0.25
    S = math.ceil(ratio * N)
    sf = topk(ratio)
    fused_linear_selective_ce(h, w, t, sf, chunk_size=chunk_size)[0].backward()  # warm-up
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_selective_ce(h, w, t, sf, chunk_size=chunk_size)[0].backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = _bound_bytes(N, H, V, S, dtype.itemsize, chunk_size)
    full_logits = N * V * dtype.itemsize
    assert peak <= bound, f"peak {peak / 1e9:.3f} GB > bound {bound / 1e9:.3f} GB"
    assert peak < (V * H + N * H) * dtype.itemsize + full_logits // 4  # far below materialised logits
