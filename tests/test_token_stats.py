"""token_stats: the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) and the CPU op against float64.

bf16/fp16 inputs are compared with a float64 reference computed from the same rounded values, so the
tolerances are float32-tight for every input dtype.
"""
import math

import pytest
import torch

import cggr.stats_ops as stats_ops
from cggr.stats_ops import TokenStats, token_stats
from cggr.triton_kernels.token_stats import launch_token_stats

# the interpreter evaluates the padding rows of a ragged last program (and all -inf rows) with numpy
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL, ATOL = 2e-5, 2e-5


def reference(logits, targets, ignore_index=-100):
    """float64 [5, N]: lse, nll, entropy, p1, p2."""
    x = logits.double()
    V = x.shape[-1]
    # shifted by the row max so that nll stays exact even when |x| ~ 1e30 (float64 ulp there is ~1e14)
    m = x.amax(dim=-1)
    lse_shift = torch.logsumexp(x - m[:, None], dim=-1)
    lse = m + lse_shift
    p = torch.softmax(x, dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    top = torch.topk(p, min(2, V), dim=-1).values
    p2 = top[:, 1] if V > 1 else torch.zeros_like(lse)
    t = targets.long()
    in_range = (t >= 0) & (t < V)
    x_t = x.gather(1, torch.where(in_range, t, 0)[:, None]).squeeze(1)
    nll = torch.where(in_range, (m - x_t) + lse_shift, math.nan)
    nll = torch.where(t == ignore_index, 0.0, nll)
    return torch.stack([lse, nll, entropy, top[:, 0], p2])


def run_impl(impl, logits, targets, ignore_index=-100, **cfg):
    if impl == "triton":
        return launch_token_stats(logits, targets, ignore_index, **cfg)
    return torch.ops.cggr.token_stats(logits, targets, ignore_index)


def assert_stats_close(out, ref, rtol=RTOL, atol=ATOL):
    names = ["lse", "nll", "entropy", "p1", "p2"]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for i, name in enumerate(names):
        torch.testing.assert_close(out[i].double(), ref[i].to(out.device), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def make_inputs(N, V, dtype, device, seed, scale=4.0, ignore_rows=()):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    for r in ignore_rows:
        targets[r] = -100
    return logits.to(device), targets.to(device)


@pytest.fixture(params=["triton", "cpu"])
def impl_device(request):
    """(impl, device): the Triton launcher on the Triton device, or the op's CPU implementation."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return "cpu", "cpu"


# (V, config overrides for the Triton launcher): small blocks force many chunks per row (the online
# rescaling and the cross-chunk top-2) and several rows per program with a ragged last program.
CASES = [
    (1, {}),
    (2, {}),
    (3, {}),
    (1000, {}),
    (1000, {"block_v": 128, "block_n": 4, "num_warps": 2, "branch_top2": False}),
    (4099, {"block_v": 512, "block_n": 1, "branch_top2": False}),
    (4099, {"block_v": 512, "block_n": 2, "lane_sums": True, "branch_top2": False}),
    (4099, {"block_v": 256, "block_n": 4, "branch_top2": True}),
    (20000, {"block_v": 1024, "lane_sums": True, "branch_top2": True}),
    (20000, {"block_v": 1024, "branch_top2": True, "prefetch": True}),
    (4099, {"block_v": 512, "block_n": 2, "lane_sums": True, "branch_top2": False, "prefetch": True}),
    (20000, {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,cfg", CASES, ids=[f"V{v}-{'cfg' if c else 'auto'}" for v, c in CASES])
def test_matches_float64(impl_device, dtype, V, cfg):
    impl, device = impl_device
    N = 7
    logits, targets = make_inputs(N, V, dtype, device, seed=V * 31 + len(cfg), ignore_rows=(2,))
    out = run_impl(impl, logits, targets, **(cfg if impl == "triton" else {}))
    assert_stats_close(out, reference(logits.cpu(), targets.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_odd_vocabulary(impl_device, dtype):
    impl, device = impl_device
    logits, targets = make_inputs(2, 1000003, dtype, device, seed=5)
    targets[1] = 1000002  # last column
    out = run_impl(impl, logits, targets)
    assert_stats_close(out, reference(logits.cpu(), targets.cpu()))


def test_cpu_chunking(monkeypatch):
    """The CPU implementation's row chunks (forced small here) give the unchunked numbers."""
    logits, targets = make_inputs(37, 300, torch.float32, "cpu", seed=11, ignore_rows=(0, 36))
    whole = torch.ops.cggr.token_stats(logits, targets, -100)
    monkeypatch.setattr(stats_ops, "_CPU_CHUNK_ELEMENTS", 300 * 5)
    chunked = torch.ops.cggr.token_stats(logits, targets, -100)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert_stats_close(chunked, reference(logits, targets))


def test_row_stride(impl_device):
    """A column slice of a wider tensor: row stride != V, last-dim stride 1."""
    impl, device = impl_device
    wide, _ = make_inputs(9, 700, torch.bfloat16, device, seed=3)
    logits = wide[:, 13:13 + 611]
    _, targets = make_inputs(9, 611, torch.bfloat16, device, seed=4)
    assert logits.stride() == (700, 1)
    cfg = {"block_v": 256, "block_n": 2} if impl == "triton" else {}
    out = run_impl(impl, logits, targets, **cfg)
    assert_stats_close(out, reference(logits.cpu(), targets.cpu()))


def test_duplicate_maxima(impl_device):
    """The max appearing twice gives p2 == p1: in one lane across chunks, across lanes, within a chunk."""
    impl, device = impl_device
    V = 512
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(8))
    logits[0, [3, 3 + 128]] = 9.0   # same lane, different chunks (block_v=128)
    logits[1, [5, 77]] = 9.0        # different lanes, same chunk
    logits[2, [0, 511]] = 9.0       # first and last column
    logits[3, [10, 20, 30]] = 9.0   # three-way tie
    logits[4, 100] = 9.0            # unique max: p2 < p1
    targets = torch.tensor([3, 5, 511, 0, 100])
    for cfg in ({"block_v": 128, "block_n": 1, "branch_top2": False},
                {"block_v": 128, "block_n": 2, "lane_sums": True, "branch_top2": False},
                {"block_v": 128, "block_n": 1, "branch_top2": True}, {"block_v": 64, "block_n": 4, "branch_top2": True},
                {}):
        out = run_impl(impl, logits.to(device), targets.to(device), **(cfg if impl == "triton" else {}))
        assert_stats_close(out, reference(logits, targets))
        assert torch.equal(out[3, :4], out[4, :4])
        assert out[4, 4] < out[3, 4]


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index(impl_device, ignore_index):
    """Ignored rows have nll == 0 but every other statistic; ignore_index may even lie inside [0, V)."""
    impl, device = impl_device
    logits, targets = make_inputs(6, 50, torch.float32, device, seed=12)
    targets[[1, 4]] = ignore_index
    out = run_impl(impl, logits, targets, ignore_index)
    ref = reference(logits.cpu(), targets.cpu(), ignore_index)
    assert_stats_close(out, ref)
    assert torch.all(out[1, [1, 4]] == 0)


def test_out_of_range_targets_raw(impl_device):
    """Raw op / launcher: an out-of-range target (not ignore_index) is never read and gives nll = NaN."""
    impl, device = impl_device
    logits, targets = make_inputs(6, 33, torch.float32, device, seed=13)
    targets[0] = 33
    targets[3] = -5
    targets[5] = 2**40 if targets.dtype == torch.int64 else 2**30
    out = run_impl(impl, logits, targets)
    assert torch.isnan(out[1, [0, 3, 5]]).all()
    finite = [1, 2, 4]
    assert torch.isfinite(out[1, finite]).all()
    assert_stats_close(out, reference(logits.cpu(), targets.cpu()))


def test_int32_targets(impl_device):
    impl, device = impl_device
    logits, targets = make_inputs(5, 100, torch.float16, device, seed=14)
    out = run_impl(impl, logits, targets.to(torch.int32))
    assert_stats_close(out, reference(logits.cpu(), targets.cpu()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(impl_device, dtype):
    """Large magnitudes and -inf entries (masked vocabulary) stay finite and exact."""
    impl, device = impl_device
    big = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 1e4}[dtype]  # fp16 overflows at 65504
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(6, 300, generator=g, dtype=torch.float64)
    logits[0] *= big                       # huge spread: p1 == 1, H == 0
    logits[1] = logits[1] * 3 + big / 2    # huge offset, normal spread
    logits[2, 150:] = -math.inf            # masked half
    logits[3, :] = -math.inf
    logits[3, 7] = 1.0                     # a single finite entry: p1 = 1, p2 = 0
    logits[4, ::2] = -math.inf
    logits[5] = logits[5] * 3 - big / 2
    logits = logits.to(dtype)
    targets = torch.tensor([1, 2, 3, 7, 8, 9])
    ref = reference(logits, targets)
    for cfg in ({"block_v": 64, "branch_top2": False}, {"block_v": 64, "lane_sums": True, "branch_top2": False},
                {"block_v": 64, "branch_top2": True}):
        out = run_impl(impl, logits.to(device), targets.to(device), **(cfg if impl == "triton" else {}))
        assert_stats_close(out, ref)
    # rows 1 and 5 sit near +-big/2: lse is float32-accurate relative to big, everything else is exact
    # because the kernel works with x - max
    assert out[4, 3] == 0 and out[3, 3] == 1
    assert out[1, 4] == math.inf  # the target of row 4 is a -inf logit
    out[1, 4] = 0
    assert torch.isfinite(out).all()


def test_cpu_matches_triton(triton_device):
    """The two implementations give the same numbers (float32 math in the same order)."""
    logits, targets = make_inputs(6, 3000, torch.bfloat16, "cpu", seed=16, ignore_rows=(4,))
    cpu = torch.ops.cggr.token_stats(logits, targets, -100)
    tri = launch_token_stats(logits.to(triton_device), targets.to(triton_device), -100).cpu()
    torch.testing.assert_close(tri, cpu, rtol=3e-6, atol=3e-6)


# ------------------------------------------------------------------------------------------------
# the Python wrapper
# ------------------------------------------------------------------------------------------------
def test_wrapper_batched():
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(3, 4, 50, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 50, (3, 4), generator=g)
    targets[1, 2] = -100
    stats = token_stats(logits, targets)
    assert isinstance(stats, TokenStats)
    ref = reference(logits.reshape(-1, 50), targets.reshape(-1))
    for i, t in enumerate(stats):
        assert t.shape == (3, 4) and t.dtype == torch.float32
        torch.testing.assert_close(t.reshape(-1).double(), ref[i], rtol=RTOL, atol=ATOL)
    # non-contiguous [B, T, V] (transposed batch) and a non-unit last-dim stride
    stats_t = token_stats(logits.transpose(0, 1), targets.t())
    torch.testing.assert_close(stats_t.nll, stats.nll.t())
    wide = torch.randn(12, 100, generator=g)
    stats_w = token_stats(wide[:, ::2], targets.reshape(-1))
    torch.testing.assert_close(stats_w.lse.double(), torch.logsumexp(wide[:, ::2].double(), -1), rtol=RTOL,
                               atol=ATOL)


def test_wrapper_detaches():
    logits = torch.randn(4, 10, requires_grad=True)
    stats = token_stats(logits, torch.tensor([0, 1, 2, 3]))
    assert not stats.lse.requires_grad


def test_wrapper_validates_targets():
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    targets[0, 0] = -100
    targets[1, 1] = 10
    targets[1, 2] = -7
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = 10 is outside \[0, 10\)"):
        token_stats(logits, targets)
    stats = token_stats(logits, targets, validate_targets=False)
    assert torch.isnan(stats.nll[1, 1]) and torch.isnan(stats.nll[1, 2]) and stats.nll[0, 0] == 0
    token_stats(logits, targets.clamp(0, 9))  # all valid: no error
    token_stats(logits[:, :0], targets[:, :0])  # empty: nothing to validate


def test_wrapper_argument_errors():
    logits = torch.randn(4, 10)
    targets = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="logits must be a float16/bfloat16/float32"):
        token_stats(logits.double(), targets)
    with pytest.raises(TypeError, match="targets must be an int64 or int32"):
        token_stats(logits, targets.float())
    with pytest.raises(ValueError, match="targets shape"):
        token_stats(logits, targets[:3])
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        token_stats(logits[:, :0], targets)
    with pytest.raises(ValueError, match="targets is on meta"):
        token_stats(logits, targets.to("meta"))
    with pytest.raises(ValueError, match=r"\[N, V\] or \[B, T, V\]"):
        token_stats(logits.reshape(2, 2, 1, 10), targets.reshape(2, 2, 1))
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.cggr.token_stats(logits.reshape(2, 2, 10), targets.reshape(2, 2), -100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cpu(dtype):
    logits, targets = make_inputs(5, 37, dtype, "cpu", seed=18, ignore_rows=(1,))
    torch.library.opcheck(torch.ops.cggr.token_stats.default, (logits, targets, -100))
    torch.library.opcheck(torch.ops.cggr.token_stats.default, (logits[:, :20], (targets % 20).int(), -100))


def test_compile_cpu():
    """The op is opaque to torch.compile: the fake kernel gives shapes, the CPU kernel the numbers."""
    logits, targets = make_inputs(6, 40, torch.float32, "cpu", seed=19)
    fn = torch.compile(lambda x, t: torch.ops.cggr.token_stats(x, t, -100) * 2, backend="aot_eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(logits, targets), torch.ops.cggr.token_stats(logits, targets, -100) * 2)
