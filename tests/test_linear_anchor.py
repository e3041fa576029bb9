"""The newest anchor: torch's own chunked ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13; CI runs
2.14) against ``cggr.fused_linear_selective_ce``. With every valid token selected the two are the same loss;
with a selection, cggr's loss is torch's on targets where the unselected tokens are ignore_index. Loss and
gradients (hidden, weight, bias) agree within float rounding (both accumulate in float32)."""
import pytest
import torch
import torch.nn.functional as F

from cggr import fused_linear_selective_ce
from cggr.ops import select_topk

if not hasattr(F, "linear_cross_entropy"):
    pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (added in 2.13)",
                allow_module_level=True)

IGNORE = -100
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def inputs(n, h, v, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = IGNORE
    targets[0] = 1  # at least one valid token (torch's mean over none is NaN; cggr's is 0, tested elsewhere)
    return hidden, weight, b, targets


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(37, 16, 101), (64, 24, 300), (1, 8, 5)])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_matches_torch_linear_cross_entropy(dtype, bias, reduction, shape, ratio):
    hidden, weight, b, targets = inputs(*shape, dtype, bias, seed=hash((shape, ratio, bias)) % 1000)
    if ratio == 1.0:
        def select_fn(stats, valid):
            return valid
    else:
        def select_fn(stats, valid):
            return select_topk(stats.nll, valid, ratio)
    ours, _, mask = fused_linear_selective_ce(hidden, weight, targets, select_fn, bias=b, ignore_index=IGNORE,
                                              reduction=reduction)
    # torch's chunked path (options given) on the same tokens: unselected ones become ignore_index
    kept = torch.where(mask & (targets != IGNORE), targets, torch.full_like(targets, IGNORE))
    theirs = F.linear_cross_entropy(hidden, weight, kept, linear_bias=b, reduction=reduction, ignore_index=IGNORE,
                                    options=torch.nn.LinearCrossEntropyOptions())
    torch.testing.assert_close(ours.float(), theirs.float(), **TOL[dtype])
    for got, expected in zip(grads(ours, (hidden, weight, b)), grads(theirs, (hidden, weight, b))):
        torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])
