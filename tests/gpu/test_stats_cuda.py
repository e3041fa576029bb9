"""CUDA checks of token_stats / selective_ce_backward at real sizes (run on the GPU machine).

    pytest tests/gpu/test_stats_cuda.py -q

Needs ~30 GB of GPU memory for the N*V > 2**31 case. References are float64, computed in row chunks.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cggr.stats_ops import TokenStats, selective_ce_backward, token_stats
from cggr.triton_kernels import launch_selective_ce_backward, launch_token_stats

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton)",
)


def reference_stats(logits, targets, ignore_index=-100, chunk=256):
    """float64 [5, N] on logits' device, chunked over rows."""
    N, V = logits.shape
    out = torch.empty((5, N), dtype=torch.float64, device=logits.device)
    for r0 in range(0, N, chunk):
        x = logits[r0:r0 + chunk].double()
        t = targets[r0:r0 + chunk].long()
        m = x.amax(-1)
        lse_shift = torch.logsumexp(x - m[:, None], -1)
        p = torch.softmax(x, -1)
        top = torch.topk(p, min(2, V), -1).values
        in_range = (t >= 0) & (t < V)
        x_t = x.gather(1, torch.where(in_range, t, 0)[:, None]).squeeze(1)
        nll = torch.where(in_range, (m - x_t) + lse_shift, math.nan)
        out[0, r0:r0 + chunk] = m + lse_shift
        out[1, r0:r0 + chunk] = torch.where(t == ignore_index, 0.0, nll)
        out[2, r0:r0 + chunk] = -torch.special.xlogy(p, p).sum(-1)
        out[3, r0:r0 + chunk] = top[:, 0]
        out[4, r0:r0 + chunk] = top[:, 1] if V > 1 else 0.0
        del x, p
    return out


def reference_grad_rows(logits, targets, rows, scale, weight=None):
    x = logits[rows].double().requires_grad_()
    loss = F.cross_entropy(x, targets[rows].long(), reduction="none")
    if weight is not None:
        loss = loss * weight[rows].double()
    (loss.sum() * scale).backward()
    return x.grad


def assert_stats_close(out, ref, rtol=2e-5, atol=2e-5):
    for i, name in enumerate(["lse", "nll", "entropy", "p1", "p2"]):
        torch.testing.assert_close(out[i].double(), ref[i], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def make(N, V, dtype, seed, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(N, V, device="cuda", generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    return logits, targets


@pytest.mark.parametrize("N,V,dtype", [
    (4096, 128256, torch.bfloat16),
    (4096, 49152, torch.bfloat16),
    (2048, 49152, torch.float16),
    (2048, 32000, torch.float32),
    (3000, 1000, torch.bfloat16),   # several rows per program
    (777, 1000003, torch.float32),  # huge odd vocabulary
    (513, 3, torch.float16),
    (65, 1, torch.float32),
])
def test_token_stats_real_sizes(N, V, dtype):
    logits, targets = make(N, V, dtype, seed=N + V)
    targets[::7] = -100
    out = torch.ops.cggr.token_stats(logits, targets, -100)
    assert_stats_close(out, reference_stats(logits, targets))


@pytest.mark.parametrize("lane_sums", [False, True])
@pytest.mark.parametrize("branch_top2", [False, True])
@pytest.mark.parametrize("block_v,num_warps", [(4096, 8), (8192, 16), (16384, 32)])
def test_token_stats_kernel_variants(lane_sums, branch_top2, block_v, num_warps):
    """Every variant the benchmark sweep may pick, at a real size."""
    logits, targets = make(1024, 128256, torch.bfloat16, seed=block_v)
    logits[0, [3, 100000]] = 40.0  # a tie across chunks
    targets[::5] = -100
    out = launch_token_stats(logits, targets, -100, block_v=block_v, num_warps=num_warps, lane_sums=lane_sums,
                             branch_top2=branch_top2)
    assert_stats_close(out, reference_stats(logits, targets))
    assert out[3, 0] == out[4, 0]


def test_token_stats_matches_cpu_implementation():
    logits, targets = make(512, 50257, torch.bfloat16, seed=1)
    targets[3] = -100
    cuda = torch.ops.cggr.token_stats(logits, targets, -100).cpu()
    cpu = torch.ops.cggr.token_stats(logits.cpu(), targets.cpu(), -100)
    torch.testing.assert_close(cuda, cpu, rtol=3e-6, atol=3e-6)


def test_row_stride_duplicates_and_bad_targets():
    wide, targets = make(1024, 70000, torch.bfloat16, seed=2)
    logits = wide[:, 100:100 + 65537]
    targets = targets % 65537
    logits[0, [5, 40000]] = 60.0   # tie across chunks
    logits[1, [7, 9]] = 60.0       # tie in one chunk
    targets[2] = 65537
    targets[3] = -2
    out = torch.ops.cggr.token_stats(logits, targets, -100)
    assert torch.isnan(out[1, 2:4]).all()
    assert torch.equal(out[3, :2], out[4, :2])
    assert_stats_close(out, reference_stats(logits, targets))
    with pytest.raises(ValueError, match=r"targets\[2\] = 65537"):
        token_stats(logits, targets)


def test_large_index_space():
    """N * V > 2**31: int64 row offsets (rows near the end would otherwise wrap around)."""
    N, V = 16640, 131072
    assert N * V > 2**31
    logits, targets = make(N, V, torch.bfloat16, seed=3)
    out = torch.ops.cggr.token_stats(logits, targets, -100)
    rows = torch.cat([torch.arange(0, 64), torch.arange(N // 2, N // 2 + 64), torch.arange(N - 256, N)]).cuda()
    assert_stats_close(out[:, rows], reference_stats(logits[rows], targets[rows]))
    assert torch.isfinite(out).all()
    # every row's lse against a float32 logsumexp (cheap full check)
    lse32 = torch.cat([torch.logsumexp(logits[r:r + 2048].float(), -1) for r in range(0, N, 2048)])
    torch.testing.assert_close(out[0], lse32, rtol=1e-5, atol=1e-5)

    mask = torch.zeros(N, dtype=torch.bool, device="cuda")
    mask[rows[-128:]] = True
    mask[5] = True
    scale = torch.tensor(0.5, device="cuda")
    grad = torch.ops.cggr.selective_ce_backward(logits, targets, out[0], mask, scale, None, -100)
    sel = mask.nonzero().squeeze(1)
    ref = reference_grad_rows(logits, targets, sel, 0.5)
    torch.testing.assert_close(grad[sel].double(), ref.bfloat16().double(), rtol=2**-7, atol=1e-6)
    zero_rows = torch.tensor([0, 6, N // 2, N - 300], device="cuda")
    assert torch.all(grad[zero_rows] == 0)
    assert int(torch.count_nonzero(grad.abs().amax(-1))) == sel.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_selective_ce_backward_real_sizes(dtype, weighted):
    N, V = 2048, 128256
    logits, targets = make(N, V, dtype, seed=4)
    targets[::11] = -100
    g = torch.Generator(device="cuda").manual_seed(5)
    mask = torch.rand(N, device="cuda", generator=g) < 0.25
    weight = torch.rand(N, device="cuda", generator=g) + 0.5 if weighted else None
    stats = token_stats(logits, targets)
    scale = torch.tensor(1.0 / 512, device="cuda")
    grad = selective_ce_backward(logits, targets, stats.lse, mask, scale, weight)
    assert grad.dtype == dtype and grad.shape == logits.shape
    sel = (mask & (targets != -100)).nonzero().squeeze(1)
    assert torch.all(grad[~(mask & (targets != -100))] == 0)
    rtol = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}[dtype]
    for r0 in range(0, sel.numel(), 128):
        rows = sel[r0:r0 + 128]
        ref = reference_grad_rows(logits, targets, rows, 1.0 / 512, weight)
        # float16 gradients this small (1/512 scale) are subnormal: allow one subnormal step absolute
        atol = 2**-24 if dtype == torch.float16 else 1e-9
        torch.testing.assert_close(grad[rows].double(), ref.to(dtype).double(), rtol=rtol, atol=atol)


def test_backward_matches_cpu_implementation():
    logits, targets = make(256, 50257, torch.float32, seed=6)
    mask = torch.arange(256, device="cuda") % 3 == 0
    weight = torch.linspace(0.5, 2.0, 256, device="cuda")
    lse = torch.logsumexp(logits, -1)
    scale = torch.tensor(0.01, device="cuda")
    cuda = torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, scale, weight, -100).cpu()
    cpu = torch.ops.cggr.selective_ce_backward(logits.cpu(), targets.cpu(), lse.cpu(), mask.cpu(), scale.cpu(),
                                               weight.cpu(), -100)
    torch.testing.assert_close(cuda, cpu, rtol=1e-6, atol=1e-10)


def test_opcheck_cuda():
    logits, targets = make(64, 3001, torch.bfloat16, seed=7)
    targets[2] = -100
    torch.library.opcheck(torch.ops.cggr.token_stats.default, (logits, targets, -100))
    lse = torch.ops.cggr.token_stats(logits, targets, -100)[0]
    mask = torch.arange(64, device="cuda") % 2 == 0
    for weight in (None, torch.rand(64, device="cuda")):
        torch.library.opcheck(torch.ops.cggr.selective_ce_backward.default,
                              (logits, targets, lse, mask, torch.tensor(0.5, device="cuda"), weight, -100))


def test_compile_cuda():
    logits, targets = make(256, 4096, torch.bfloat16, seed=8)

    @torch.compile(fullgraph=True)
    def f(x, t):
        stats = torch.ops.cggr.token_stats(x, t, -100)
        return stats[1].sum() + stats[2].mean()

    eager = torch.ops.cggr.token_stats(logits, targets, -100)
    torch.testing.assert_close(f(logits, targets), eager[1].sum() + eager[2].mean())


def test_no_host_sync():
    """token_stats(validate_targets=False) + selective_ce_backward with a device scale never sync."""
    logits, targets = make(1024, 32768, torch.bfloat16, seed=9)
    logits3, targets3 = logits.view(8, 128, -1), targets.view(8, 128)
    mask = (torch.arange(1024, device="cuda") % 4 == 0).view(8, 128)
    weight = torch.rand(8, 128, device="cuda")
    scale = torch.tensor(1.0 / 256, device="cuda")

    def step():
        stats = token_stats(logits3, targets3, validate_targets=False)
        grad = selective_ce_backward(logits3, targets3, stats.lse, mask, scale, weight)
        return stats, grad

    step()  # compile the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats, grad = step()
        raw = launch_token_stats(logits, targets, -100)
        launch_selective_ce_backward(logits, targets, raw[0], mask.view(-1), scale, None, -100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(stats, TokenStats)
    torch.testing.assert_close(stats.lse.reshape(-1), raw[0])
    assert grad.shape == logits3.shape
