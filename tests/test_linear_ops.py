"""softcap_, linear_ce_grad_, addmm_f32_ (cggr.linear_ops): the Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1) and the CPU implementations against float64 references on odd sizes; opcheck of
each op on CPU; argument errors; torch.compile through the fake kernels.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cggr import ops
from cggr.triton_kernels import launch_linear_ce_grad_, launch_softcap_

# the interpreter evaluates the masked lanes of a ragged last block with numpy
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["triton", "cpu"])
def impl_device(request):
    """(impl, device): the Triton launcher on the Triton device, or the op's CPU implementation."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return "cpu", "cpu"


def run_softcap(impl, x, c):
    if impl == "triton":
        return launch_softcap_(x, c)
    return ops.softcap_(x, c)


def run_ce_grad(impl, x, lse, t, coef, v0, c):
    if impl == "triton":
        return launch_linear_ce_grad_(x, lse, t, coef, v0, c)
    return ops.linear_ce_grad_(x, lse, t, coef, v0, c)


# ------------------------------------------------------------------------------------------------
# softcap_
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,C", [(1, 1), (7, 1013), (3, 4099)])
def test_softcap_matches_float64(impl_device, dtype, R, C):
    impl, device = impl_device
    g = torch.Generator().manual_seed(R * C)
    x = (torch.randn(R, C, generator=g) * 20).to(dtype)
    x[0, :min(C, 4)] = torch.tensor([1e-6, -1e-3, 0.05, -0.2])[:min(C, 4)].to(dtype)  # small-argument branch
    c = 7.5
    ref = (c * torch.tanh(x.double() / c)).to(dtype)  # float64 math, one rounding to x's dtype
    xd = x.to(device)
    out = run_softcap(impl, xd, c)
    assert out is xd and out.dtype == dtype
    # the one rounding may land on the neighbouring value when the float32 result sits on a tie
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.double(), rtol=tol, atol=1e-7)


def test_softcap_row_stride_and_empty(impl_device):
    impl, device = impl_device
    base = torch.randn(5, 300) * 10
    full = base.clone().to(device)
    x = full[:, 17:250]  # row stride 300, unit last stride
    run_softcap(impl, x, 3.0)
    torch.testing.assert_close(x.cpu().double(), 3.0 * torch.tanh(base[:, 17:250].double() / 3.0),
                               rtol=2e-6, atol=1e-7)
    assert torch.equal(full[:, :17].cpu(), base[:, :17]) and torch.equal(full[:, 250:].cpu(), base[:, 250:])
    run_softcap(impl, torch.empty(0, 9, device=device), 3.0)
    run_softcap(impl, torch.empty(4, 0, device=device), 3.0)


# ------------------------------------------------------------------------------------------------
# linear_ce_grad_: concatenated over odd vocabulary slices, it is the float64 autograd gradient
# ------------------------------------------------------------------------------------------------
def ce_grad_reference(x, targets, coef, softcap):
    """float64 d/dx of sum_r coef[r] * CE(cap(x[r]), targets[r]) (rows with coef 0 contribute 0) and the
    float64 lse of the capped rows."""
    x64 = x.double().requires_grad_()
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    lse = torch.logsumexp(z.detach(), dim=1)
    active = coef != 0
    nll = F.cross_entropy(z, torch.where(active, targets.long(), 0), reduction="none")
    (torch.where(active, nll, 0.0) * coef.double()).sum().backward()
    return x64.grad, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_ce_grad_matches_float64(impl_device, dtype, softcap):
    impl, device = impl_device
    g = torch.Generator().manual_seed(3 + (softcap is not None))
    R, V = 7, 1013
    cuts = [0, 333, 700, V]  # slices of odd widths 333, 367, 313
    x = (torch.randn(R, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (R,), generator=g, dtype=torch.int32 if dtype == torch.float16 else torch.int64)
    t[0], t[1], t[2] = 0, V - 1, 699  # first and last column, last column of a slice
    coef = torch.rand(R, generator=g) + 0.25
    coef[3] = 0.0       # inactive row: exact zeros
    t[3] = -100
    coef[4] = -0.5      # negative upstream gradient
    ref, lse = ce_grad_reference(x, t, coef, softcap)
    ref[3] = 0.0
    x[3, 5] = float("inf")  # an inactive row is never read
    out = torch.empty(R, V, dtype=dtype)
    for v0, v1 in zip(cuts[:-1], cuts[1:]):
        xs = x[:, v0:v1].contiguous().to(device)
        got = run_ce_grad(impl, xs, lse.float().to(device), t.to(device), coef.to(device), v0, softcap)
        assert got is xs
        out[:, v0:v1] = got.cpu()
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    # float32: float32 math against float64; half types: one rounding of the stored gradient and, with a
    # soft cap, of the capped logit (by contract the forward's statistics saw it rounded)
    rtol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    if softcap is not None and dtype != torch.float32:
        rtol *= 3
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-6 if dtype == torch.float32 else 1e-4)


def test_ce_grad_nan_coef_poisons_the_row(impl_device):
    impl, device = impl_device
    x = torch.randn(3, 21, device=device)
    coef = torch.tensor([1.0, float("nan"), 0.0], device=device)
    lse = torch.logsumexp(x, dim=1)
    t = torch.tensor([4, 5, 6], device=device)
    run_ce_grad(impl, x, lse, t, coef, 0, None)
    assert torch.isfinite(x[0]).all() and torch.isnan(x[1]).all() and not x[2].any()


# ------------------------------------------------------------------------------------------------
# addmm_f32_
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_addmm_f32_matches_float64(dtype):
    g = torch.Generator().manual_seed(5)
    M, K, N = 13, 37, 29
    a1, a2 = (torch.randn(M, K, generator=g).to(dtype) for _ in range(2))
    b1, b2 = (torch.randn(K, N, generator=g).to(dtype) for _ in range(2))
    acc = torch.full((M, N), float("nan"))  # accumulate=False overwrites whatever acc holds
    assert ops.addmm_f32_(acc, a1, b1, accumulate=False) is acc
    ops.addmm_f32_(acc, a2, b2, accumulate=True)
    ref = a1.double() @ b1.double() + a2.double() @ b2.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-5)  # float32 accumulation for all dtypes


# ------------------------------------------------------------------------------------------------
# opcheck, errors, compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cpu(dtype):
    g = torch.Generator().manual_seed(6)
    R, C = 5, 37
    x = (torch.randn(R, C, generator=g) * 3).to(dtype)
    torch.library.opcheck(torch.ops.cggr.softcap_.default, (x.clone(), 2.0))
    lse = torch.logsumexp(x.float(), dim=1) + 0.5
    t = torch.tensor([3, 40, -100, 36, 10])
    coef = torch.tensor([0.5, 1.0, 0.0, 2.0, -1.0])
    for softcap in (None, 4.0):
        torch.library.opcheck(torch.ops.cggr.linear_ce_grad_.default, (x.clone(), lse, t, coef, 30, softcap))
        torch.library.opcheck(torch.ops.cggr.linear_ce_grad_.default,
                              (x.clone(), lse, t.int(), coef, 0, softcap))
    a = torch.randn(R, 11, generator=g).to(dtype)
    b = torch.randn(11, 7, generator=g).to(dtype)
    for accumulate in (False, True):
        torch.library.opcheck(torch.ops.cggr.addmm_f32_.default, (torch.randn(R, 7), a, b, accumulate))


def test_argument_errors():
    x = torch.randn(4, 10)
    lse, coef, t = torch.zeros(4), torch.ones(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        ops.softcap_(x, 0.0)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        ops.softcap_(x, math.inf)
    with pytest.raises(TypeError, match="x must be a float16/bfloat16/float32"):
        ops.softcap_(x.double(), 1.0)
    with pytest.raises(ValueError, match="unit-stride last dim"):
        ops.softcap_(x.t(), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        ops.softcap_(x.reshape(2, 2, 10), 1.0)
    with pytest.raises(TypeError, match="lse must be a float32"):
        ops.linear_ce_grad_(x, lse.double(), t, coef, 0)
    with pytest.raises(TypeError, match="targets must be a int64 or int32"):
        ops.linear_ce_grad_(x, lse, t.float(), coef, 0)
    with pytest.raises(ValueError, match=r"coef must be contiguous of shape \(4,\)"):
        ops.linear_ce_grad_(x, lse, t, torch.ones(5), 0)
    with pytest.raises(ValueError, match=r"lse must be contiguous"):
        ops.linear_ce_grad_(x, torch.zeros(8)[::2], t, coef, 0)
    with pytest.raises(ValueError, match="v0 must be an int >= 0"):
        ops.linear_ce_grad_(x, lse, t, coef, -1)
    with pytest.raises(ValueError, match="softcap must be a positive finite number or None"):
        ops.linear_ce_grad_(x, lse, t, coef, 0, -2.0)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        ops.linear_ce_grad_(x, lse.to("meta"), t, coef, 0)
    with pytest.raises(TypeError, match="acc must be a float32"):
        ops.addmm_f32_(torch.zeros(4, 3).bfloat16(), x, torch.randn(10, 3), False)
    with pytest.raises(TypeError, match="a and b must have one dtype"):
        ops.addmm_f32_(torch.zeros(4, 3), x, torch.randn(10, 3).bfloat16(), False)
    with pytest.raises(ValueError, match=r"need acc \[M, N\]"):
        ops.addmm_f32_(torch.zeros(4, 4), x, torch.randn(10, 3), False)


def test_fake_kernels_and_compile_cpu():
    """The ops are opaque to torch.compile: the fake kernels check arguments, the CPU kernels compute."""
    x = torch.randn(6, 40) * 4
    lse = torch.logsumexp(x, dim=1)
    t = torch.randint(0, 40, (6,))
    coef = torch.rand(6)

    def f(x, lse, t, coef):
        y = x * 1.0
        torch.ops.cggr.softcap_(y, 3.0)
        torch.ops.cggr.linear_ce_grad_(y, lse, t, coef, 0, 3.0)
        acc = torch.zeros(6, 5)
        torch.ops.cggr.addmm_f32_(acc, y, torch.ones(40, 5), False)
        return y, acc

    eager = f(x, lse, t, coef)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, lse, t, coef)
    for a, r in zip(compiled, eager):
        torch.testing.assert_close(a, r)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(6, 40)
        torch.ops.cggr.softcap_(fx, 3.0)
        with pytest.raises(ValueError, match="coef must be contiguous"):
            torch.ops.cggr.linear_ce_grad_(fx, torch.empty(6), torch.empty(6, dtype=torch.long),
                                           torch.empty(7), 0, None)


def test_linear_dispatches_only_through_ops():
    """cggr.linear neither imports the Triton kernels nor branches on the device: every device-specific
    kernel is a torch.ops.cggr operator reached through cggr.ops (no module imports the package root)."""
    import ast
    import inspect

    from cggr import linear, linear_ops, stats_ops

    tree = ast.parse(inspect.getsource(linear))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr != "is_cuda", f"cggr/linear.py:{node.lineno} branches on the device"
        if isinstance(node, ast.ImportFrom):
            assert "triton_kernels" not in (node.module or ""), f"cggr/linear.py:{node.lineno} imports Triton kernels"
    for module in (linear, linear_ops, stats_ops):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Import):
                assert all(alias.name != "cggr" for alias in node.names), f"{module.__name__} imports the package root"
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("cggr"), f"{module.__name__} imports {node.module}"
