"""Where does compute-sanitizer's initcheck see an uninitialised read in the fused linear backward (float16,
bias, the case of scripts/sanitize_ops.py that it flagged)? Modes, each run under initcheck:

  addmm        a float16 addmm with a bias into a fresh buffer, read by a torch kernel (cuBLAS alone)
  fused        the flagged case: fused_linear_selective_ce, N=300 H=96 V=2053 float16 with a bias
  torch-read   the same, with a torch kernel reading each logits slice just before cggr's gradient kernel
  zeroed       the same, with each logits slice zeroed by a torch kernel before the matmul writes it

If 'torch-read' flags the torch read too, the matmul's writes are what initcheck does not see; if only
cggr's kernel is flagged, that kernel reads memory nothing wrote.
Run: compute-sanitizer --tool initcheck python3 scripts/initcheck_probe.py MODE"""
import sys

import torch

import cggr.linear as linear
from cggr import ops

mode = sys.argv[1] if len(sys.argv) > 1 else "fused"
g = torch.Generator().manual_seed(0)
if mode == "addmm":
    h, w = torch.randn(57, 96, generator=g).half().cuda(), torch.randn(512, 96, generator=g).half().cuda()
    b = torch.randn(512, generator=g).half().cuda()
    out = torch.empty(57 * 512, dtype=torch.float16, device="cuda").view(57, 512)
    torch.addmm(b, h, w.t(), out=out)
    print(float(out.float().sum()))
    sys.exit(0)

if mode == "torch-read":
    grad_kernel = linear.ops.linear_ce_grad_

    def read_then_grad(x, *args, **kwargs):
        print("slice", tuple(x.shape), float(x.float().sum()), flush=True)
        return grad_kernel(x, *args, **kwargs)

    linear.ops.linear_ce_grad_ = read_then_grad
elif mode == "zeroed":
    logits_into = linear._logits_into

    def zeroed(out, h, w, b):
        out.zero_()
        return logits_into(out, h, w, b)

    linear._logits_into = zeroed

N, H, V = 300, 96, 2053
hidden = torch.randn(N, H, generator=g).half().cuda().requires_grad_(True)
weight = (torch.randn(V, H, generator=g) / H ** 0.5).half().cuda().requires_grad_(True)
bias = torch.randn(V, generator=g).half().cuda().requires_grad_(True)
targets = torch.randint(0, V, (N,), generator=g)
targets[1::4] = -100
loss, _, _ = linear.fused_linear_selective_ce(hidden, weight, targets.cuda(),
                                              lambda stats, valid: ops.select_topk(stats.nll, valid, 0.25),
                                              bias=bias, chunk_size=16)
loss.backward()
torch.cuda.synchronize()
print("loss", float(loss))
