"""Drive every CUDA op of ``torch.ops.cggr`` and every Triton kernel once on small shapes, for
``compute-sanitizer`` (memcheck, racecheck, initcheck): run it under ``scripts/gpu_sanitize.sh``.

Small, odd shapes (a tail in every block) and both the public paths and the raw ops: the selection ops
(``select_topk``, ``select_stratified``, ``select_sequence_aware``, ``compact_indices``), ``token_stats``
and ``selective_ce_backward`` (Triton) through ``CGGRLoss`` forward + backward, and the fused linear path
(``softcap_``, ``linear_ce_grad_``, ``addmm_f32_``) through ``fused_linear_selective_ce`` forward +
backward with and without a soft cap and a bias. Each result is checked against the CPU op (selection
masks bit-identical, losses close) so that a kernel reading uninitialised memory also fails here.
Exit status 0 when every check passed; the sanitizer's own exit status reports its findings.
"""
import sys

import torch

import cggr
from cggr import ops
from cggr.linear import fused_linear_selective_ce


def check(name, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        check.failed += 1


check.failed = 0


def selection_ops(g):
    for n in (1, 37, 1000, 5003):
        scores = torch.randn(n, generator=g)
        valid = torch.rand(n, generator=g) > 0.2
        ratio = torch.tensor(0.3)
        for name, fn in (("select_topk", lambda s, v, r: ops.select_topk(s, v, r)),
                         ("select_stratified", lambda s, v, r: ops.select_stratified(s, v, r, num_strata=4, seed=3)),
                         ("select_sequence_aware",
                          lambda s, v, r: ops.select_sequence_aware(s.view(1, -1), v.view(1, -1), r,
                                                                    min_tokens_per_sequence=1).view(-1))):
            cpu = fn(scores, valid, ratio)
            cuda = fn(scores.cuda(), valid.cuda(), ratio.cuda())
            check(f"{name} n={n}", torch.equal(cpu, cuda.cpu()))
        mask = torch.rand(n, generator=g) > 0.5
        idx_cpu, count_cpu = ops.compact_indices(mask, n)
        idx_cuda, count_cuda = ops.compact_indices(mask.cuda(), n)
        check(f"compact_indices n={n}", torch.equal(idx_cpu, idx_cuda.cpu()) and torch.equal(count_cpu, count_cuda.cpu()))


def loss_module(g):
    for N, V, dtype in ((7, 50, torch.float32), (33, 1000, torch.bfloat16), (129, 4099, torch.float16)):
        logits = torch.randn(N, V, generator=g).to(dtype)
        targets = torch.randint(0, V, (N,), generator=g)
        targets[::5] = -100
        results = []
        for device in ("cpu", "cuda"):
            x = logits.to(device, copy=True).requires_grad_(True)
            loss = cggr.CGGRLoss(scoring="combined", min_tokens_ratio=0.4, warmup_steps=0)(x, targets.to(device))
            loss.backward()
            results.append((loss.detach().cpu().double(), x.grad.cpu().double()))
        (l_cpu, g_cpu), (l_cuda, g_cuda) = results
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        check(f"CGGRLoss N={N} V={V} {dtype}", torch.allclose(l_cpu, l_cuda, rtol=tol, atol=tol)
              and torch.allclose(g_cpu, g_cuda, rtol=tol, atol=tol))


def fused_linear(g):
    for N, H, V, softcap, bias, dtype in ((5, 16, 77, None, False, torch.float32),
                                          (67, 64, 1031, 30.0, True, torch.bfloat16),
                                          (300, 96, 2053, None, True, torch.float16)):
        hidden = torch.randn(N, H, generator=g).to(dtype)
        weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
        b = torch.randn(V, generator=g).to(dtype) if bias else None
        targets = torch.randint(0, V, (N,), generator=g)
        targets[1::4] = -100
        results = []
        for device in ("cpu", "cuda"):
            h = hidden.to(device, copy=True).requires_grad_(True)
            w = weight.to(device, copy=True).requires_grad_(True)
            bb = b.to(device, copy=True).requires_grad_(True) if b is not None else None
            loss, _, _ = fused_linear_selective_ce(
                h, w, targets.to(device), lambda stats, valid: ops.select_topk(stats.nll, valid, 0.25),
                bias=bb, softcap=softcap, chunk_size=16)
            loss.backward()
            grads = [t.grad.cpu().double() for t in (h, w, bb) if t is not None]
            results.append([loss.detach().cpu().double()] + grads)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        check(f"fused_linear_selective_ce N={N} H={H} V={V} softcap={softcap} bias={bias} {dtype}",
              all(torch.allclose(a, c, rtol=tol, atol=tol) for a, c in zip(*results)))


def main():
    if not torch.cuda.is_available():
        sys.exit("scripts/sanitize_ops.py drives the CUDA ops: it needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    selection_ops(g)
    loss_module(g)
    fused_linear(g)
    torch.cuda.synchronize()
    print(f"{check.failed} check(s) failed", flush=True)
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
