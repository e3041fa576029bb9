"""Does compute-sanitizer's initcheck see cuBLAS's writes? A float16 addmm with a bias (the fused linear
backward's logits slice, [57, 512] from [57, 96] x [96, 512]) and a plain torch read of its output: if
initcheck flags the torch read, the matmul's writes are not tracked (a sanitizer blind spot, not a bug).
Run: compute-sanitizer --tool initcheck python3 scripts/initcheck_probe.py [bias|nobias]"""
import sys

import torch

S, H, C = 57, 96, 512
g = torch.Generator(device="cuda").manual_seed(0)
h = torch.randn(S, H, device="cuda", generator=g).half()
w = torch.randn(C, H, device="cuda", generator=g).half()
b = torch.randn(C, device="cuda", generator=g).half()
out = torch.empty(S * C, dtype=torch.float16, device="cuda").view(S, C)
if sys.argv[1:] == ["nobias"]:
    torch.mm(h, w.t(), out=out)
else:
    torch.addmm(b, h, w.t(), out=out)
print(float(out.float().sum()))
