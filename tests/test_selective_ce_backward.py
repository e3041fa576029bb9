"""selective_ce_backward: the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) and the CPU op.

Reference: float64 autograd of sum_{selected n} row_weight[n] * F.cross_entropy(x[n], t[n]) * scale.
The kernels compute in float32 and round once to the logits' dtype, so a bf16/fp16 result may differ
from the rounded reference by one unit in the last place.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cggr.stats_ops import selective_ce_backward, token_stats
from cggr.triton_kernels.selective_ce_backward import launch_selective_ce_backward

# the interpreter evaluates the padding rows of a ragged last program with numpy (log(0) etc.)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one rounding to the output dtype (plus float32 noise in exp)
TOL = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (2 ** -7, 1e-6), torch.float16: (2 ** -10, 1e-7)}


def reference(logits, targets, mask, scale, row_weight=None, ignore_index=-100):
    x = logits.double().detach().requires_grad_()
    sel = mask & (targets != ignore_index)
    w = torch.ones(targets.shape, dtype=torch.float64) if row_weight is None else row_weight.double()
    if sel.any():
        loss = (F.cross_entropy(x[sel], targets[sel].long(), reduction="none") * w[sel]).sum() * float(scale)
        loss.backward()
        return x.grad
    return torch.zeros_like(x)


def lse_of(logits):
    return torch.logsumexp(logits.float(), dim=-1)


def run_impl(impl, logits, targets, lse, mask, scale, row_weight=None, ignore_index=-100, **cfg):
    if impl == "triton":
        return launch_selective_ce_backward(logits, targets, lse, mask, scale, row_weight, ignore_index, **cfg)
    return torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, scale, row_weight, ignore_index)


@pytest.fixture(params=["triton", "cpu"])
def impl_device(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return "cpu", "cpu"


def make_case(N, V, dtype, seed, ratio=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < ratio
    weight = torch.rand(N, generator=g) + 0.5
    return logits, targets, mask, weight


def check(grad, ref, mask, targets, dtype, ignore_index=-100):
    sel = (mask & (targets != ignore_index)).cpu()
    grad = grad.cpu()
    assert grad.dtype == dtype and grad.shape == ref.shape
    assert torch.all(grad[~sel] == 0), "unselected / ignored rows must be exactly zero"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(grad.double(), ref.to(dtype).double(), rtol=rtol, atol=atol)


CASES = [
    (1, {}),
    (3, {}),
    (1000, {}),
    (1000, {"block_v": 128, "block_n": 4, "num_warps": 2}),
    (4099, {"block_v": 512}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("V,cfg", CASES, ids=[f"V{v}-{'cfg' if c else 'auto'}" for v, c in CASES])
def test_matches_autograd(impl_device, dtype, weighted, V, cfg):
    impl, device = impl_device
    logits, targets, mask, weight = make_case(9, V, dtype, seed=V + 7 * weighted)
    targets[1] = -100
    mask[1] = True  # selected but ignored: zero
    w = weight if weighted else None
    scale = torch.tensor(0.37)
    grad = run_impl(impl, logits.to(device), targets.to(device), lse_of(logits).to(device), mask.to(device),
                    scale.to(device), None if w is None else w.to(device), **(cfg if impl == "triton" else {}))
    check(grad, reference(logits, targets, mask, scale, w), mask, targets, dtype)


def test_unselected_rows_are_not_read(impl_device):
    """NaN logits in unselected / ignored rows must not leak: those rows are written, never read."""
    impl, device = impl_device
    logits, targets, mask, weight = make_case(8, 300, torch.bfloat16, seed=21)
    mask[:] = torch.tensor([True, False, True, False, False, True, True, False])
    targets[5] = -100
    poisoned = logits.clone()
    poisoned[~mask] = math.nan
    poisoned[5] = math.nan
    scale = torch.tensor(2.0)
    cfg = {"block_v": 64, "block_n": 2} if impl == "triton" else {}
    grad = run_impl(impl, poisoned.to(device), targets.to(device), lse_of(logits).to(device), mask.to(device),
                    scale.to(device), weight.to(device), **cfg)
    check(grad, reference(logits, targets, mask, scale, weight), mask, targets, torch.bfloat16)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_all_or_nothing(impl_device, ratio):
    impl, device = impl_device
    logits, targets, mask, _ = make_case(6, 77, torch.float32, seed=22, ratio=ratio)
    grad = run_impl(impl, logits.to(device), targets.to(device), lse_of(logits).to(device), mask.to(device),
                    torch.tensor(1.0, device=device))
    check(grad, reference(logits, targets, mask, 1.0), mask, targets, torch.float32)


def test_out_of_range_target(impl_device):
    """A selected row with an out-of-range target is NaN (its loss is NaN too); unselected ones stay zero."""
    impl, device = impl_device
    logits, targets, mask, _ = make_case(5, 40, torch.float32, seed=23)
    targets[[0, 1]] = torch.tensor([40, -3])
    mask[:] = torch.tensor([True, False, True, True, False])
    grad = run_impl(impl, logits.to(device), targets.to(device), lse_of(logits).to(device), mask.to(device),
                    torch.tensor(1.0, device=device)).cpu()
    assert torch.isnan(grad[0]).all()
    assert torch.all(grad[1] == 0) and torch.all(grad[4] == 0)
    ref = reference(logits[2:4], targets[2:4], mask[2:4], 1.0)
    torch.testing.assert_close(grad[2:4].double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ignore_index", [-1, 5])
def test_ignore_index_values(impl_device, ignore_index):
    impl, device = impl_device
    logits, targets, mask, _ = make_case(8, 30, torch.float16, seed=24, ratio=1.0)
    targets[[2, 6]] = ignore_index
    grad = run_impl(impl, logits.to(device), targets.to(device), lse_of(logits).to(device), mask.to(device),
                    torch.tensor(0.5, device=device), None, ignore_index)
    check(grad, reference(logits, targets, mask, 0.5, None, ignore_index), mask, targets, torch.float16,
          ignore_index)


def test_row_stride_and_int32(impl_device):
    impl, device = impl_device
    wide, targets, mask, weight = make_case(7, 500, torch.bfloat16, seed=25)
    logits = wide[:, 50:50 + 333]
    targets = targets % 333
    stats_lse = lse_of(logits)
    cfg = {"block_v": 128, "block_n": 2} if impl == "triton" else {}
    grad = run_impl(impl, logits.to(device), targets.int().to(device), stats_lse.to(device), mask.to(device),
                    torch.tensor(1.5, device=device), weight.to(device), **cfg)
    assert grad.is_contiguous()
    check(grad, reference(logits, targets, mask, 1.5, weight), mask, targets, torch.bfloat16)


def test_cpu_matches_triton(triton_device):
    logits, targets, mask, weight = make_case(6, 2000, torch.float32, seed=26)
    lse = lse_of(logits)
    scale = torch.tensor(0.25)
    cpu = torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, scale, weight, -100)
    d = triton_device
    tri = launch_selective_ce_backward(logits.to(d), targets.to(d), lse.to(d), mask.to(d), scale.to(d),
                                       weight.to(d), -100).cpu()
    torch.testing.assert_close(tri, cpu, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# the Python wrapper and the op registration
# ------------------------------------------------------------------------------------------------
def test_wrapper_batched_with_token_stats():
    logits, targets, mask, weight = make_case(12, 64, torch.bfloat16, seed=27)
    logits3, targets3 = logits.reshape(3, 4, 64), targets.reshape(3, 4)
    mask3, weight3 = mask.reshape(3, 4), weight.reshape(3, 4)
    stats = token_stats(logits3, targets3)
    grad = selective_ce_backward(logits3, targets3, stats.lse, mask3, 0.125, weight3)
    assert grad.shape == (3, 4, 64)
    check(grad.reshape(12, 64), reference(logits, targets, mask, 0.125, weight), mask, targets, torch.bfloat16)
    # a 1-element scale tensor of another shape / dtype is accepted
    grad2 = selective_ce_backward(logits3, targets3, stats.lse, mask3, torch.tensor([0.125], dtype=torch.float64),
                                  weight3)
    assert torch.equal(grad, grad2)


def test_wrapper_argument_errors():
    logits, targets, mask, weight = make_case(4, 10, torch.float32, seed=28)
    lse = lse_of(logits)
    with pytest.raises(TypeError, match="mask must be a bool"):
        selective_ce_backward(logits, targets, lse, mask.float(), 1.0)
    with pytest.raises(TypeError, match="lse must be a float32"):
        selective_ce_backward(logits, targets, lse.double(), mask, 1.0)
    with pytest.raises(TypeError, match="row_weight must be a float32"):
        selective_ce_backward(logits, targets, lse, mask, 1.0, weight.double())
    with pytest.raises(ValueError, match="mask shape"):
        selective_ce_backward(logits, targets, lse, mask[:3], 1.0)
    with pytest.raises(ValueError, match="row_weight is on meta"):
        selective_ce_backward(logits, targets, lse, mask, 1.0, weight.to("meta"))
    with pytest.raises(ValueError, match="scale must hold one value"):
        selective_ce_backward(logits, targets, lse, mask, torch.ones(2))
    with pytest.raises(TypeError, match="logits must be"):
        selective_ce_backward(logits.double(), targets, lse, mask, 1.0)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        selective_ce_backward(logits[:, :0], targets, lse, mask, 1.0)
    with pytest.raises(ValueError, match="scale is on"):
        torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, torch.tensor(1.0, device="meta"), None,
                                             -100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_opcheck_cpu(dtype, weighted):
    logits, targets, mask, weight = make_case(6, 33, dtype, seed=29)
    args = (logits, targets, lse_of(logits), mask, torch.tensor(0.5), weight if weighted else None, -100)
    torch.library.opcheck(torch.ops.cggr.selective_ce_backward.default, args)
