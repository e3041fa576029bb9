"""CPU-vs-CUDA parity under the property-test strategies of tests/test_properties.py (run on a GPU).

    python -m pytest tests/gpu/test_properties_cuda.py -q

The strategies, checks and the hypothesis profile ("cggr-properties": fresh inputs, no deadline, a
reproduction blob on failure) come from tests/test_properties.py; CGGR_PROPERTY_SCALE multiplies the
example counts as there. What is compared:

  selection ops       CUDA mask == CPU mask, bit for bit (ratio as a float, a CPU tensor or a CUDA tensor),
                      on the small strategies and on large sizes around the kernels' block boundaries
  token_stats         CUDA (Triton) == CPU op (3e-6), NaN logits excepted as documented in
                      test_properties.triton_expected_stats (the kernel skips NaN entries, the CPU op
                      makes the row NaN)
  selective_ce_bwd    CUDA == CPU op (one rounding of the output dtype), unselected rows exactly 0
  softcap_ /          CUDA == CPU op in place on row-strided views (padding untouched, inactive rows 0)
  linear_ce_grad_
  CGGRLoss            the same float64 properties as on the CPU, run on CUDA (the mask is the reference
                      selection of CUDA's own scores; loss and gradient float64-close)
  fused linear loss   the same float64 properties as on the CPU, run on CUDA (cuBLAS, Triton kernels)
  N * V > 2^31        token_stats and selective_ce_backward with int64 row offsets (needs GPU memory;
                      skips itself when the GPU has too little free)
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the strategies and references
import selection_reference as ref  # noqa: E402
import test_properties as props  # noqa: E402
from test_token_stats import assert_stats_close  # noqa: E402
from test_token_stats import reference as stats_reference  # noqa: E402

from cggr import ops  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA GPU (and compiled, not interpreted, Triton)"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

budget = props.budget
to_cuda = props.to_device


def cuda(x):
    return to_cuda(x, "cuda")


def assert_same_on_both(cuda_mask, cpu_mask, what):
    assert cuda_mask.is_cuda
    props.assert_same_mask(cuda_mask.cpu(), cpu_mask, what)


ratio_forms = st.sampled_from(["float", "cpu_tensor", "cuda_tensor"])


def ratio_as(ratio, form):
    if form == "float":
        return ratio
    return torch.tensor(ratio, dtype=torch.float32, device="cuda" if form == "cuda_tensor" else "cpu")


@st.composite
def large_selection_cases(draw, two_d=False):
    """Sizes around the CUDA kernels' one-block / multi-block switch (16384) and 4096-element tiles, up
    to 2^20, with heavy ties and non-finite values (seeded: too large to draw elementwise)."""
    n = draw(st.sampled_from([4095, 4096, 4097, 16383, 16384, 16385, 65537, 100003, 1 << 20]))
    dtype = draw(props.dtypes)
    g = props.generator(draw(props.seeds))
    x = torch.randn(n, generator=g) * draw(st.sampled_from([1.0, 1e-3]))
    if draw(st.booleans()):
        x = (x * 4).round()  # a few hundred distinct values: ties at the threshold
    for value in draw(st.lists(st.sampled_from(props.SPECIALS), max_size=3)):
        x[torch.randint(0, n, (max(1, n // 100),), generator=g)] = value
    x = x.to(dtype)
    shape = (n,)
    if two_d:
        rows = draw(st.sampled_from([1, 3, 7, 16]))
        n = n - n % rows
        x, shape = x[:n], (rows, n // rows)
    scores = props.lay_out(x.reshape(shape), draw(st.sampled_from(["contiguous", "strided", "transposed"])))
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(shape, generator=g) < draw(st.sampled_from([0.01, 0.5, 0.99]))
    note(f"large scores {props.DTYPE_NAMES[dtype]} shape {shape} strides {scores.stride()}")
    return props.SelectionCase(scores, valid)


selection_strategies = st.one_of(props.selection_cases(), large_selection_cases())
selection_strategies_2d = st.one_of(props.selection_cases(min_dims=2, max_dims=2), large_selection_cases(two_d=True))


# --------------------------------------------------------------------------------------------------
# selection ops: bit-identical masks
# --------------------------------------------------------------------------------------------------
@budget(150)
@given(case=selection_strategies, ratio=props.ratios, form=ratio_forms)
def test_select_topk_cuda_equals_cpu(case, ratio, form):
    """Bit-identical top-k masks on CUDA and CPU (quota, non-finite ranking, ties, strides), and the count
    is the documented quota. Catches: a CUDA radix-select / tie path that disagrees with the CPU one."""
    got = ops.select_topk(cuda(case.scores), cuda(case.valid), ratio_as(ratio, form))
    want = ops.select_topk(case.scores, case.valid, ratio)
    assert_same_on_both(got, want, "select_topk")
    assert int(want.sum()) == ref.quota(ratio, props.n_valid_of(case))


@budget(60)
@given(case=props.selection_cases(max_dims=2, max_numel=1024),
       ratio=st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_select_raw_ratio_cuda_equals_cpu(case, ratio):
    """Any float32 ratio as a CUDA tensor (NaN, negative, > 1 clamped on the device) gives the CPU mask."""
    got = torch.ops.cggr.select_topk(cuda(case.scores), cuda(case.valid),
                                     torch.tensor(ratio, dtype=torch.float32, device="cuda"))
    want = torch.ops.cggr.select_topk(case.scores, case.valid, torch.tensor(ratio, dtype=torch.float32))
    assert_same_on_both(got, want, "select_topk (raw ratio)")


@budget(80)
@given(case=selection_strategies, ratio=props.ratios, form=ratio_forms,
       num_strata=st.one_of(st.integers(1, 9), st.sampled_from([1023, 1024]), st.integers(1, 1024)),
       seed=st.integers(-(2**63), 2**64 - 1))
def test_select_stratified_cuda_equals_cpu(case, ratio, form, num_strata, seed):
    """Bit-identical stratified masks for the same seed (SplitMix64 keys, strata, quotas), whole 64-bit
    seed range. Catches: a device RNG stream or stratum boundary that differs from the host's."""
    got = ops.select_stratified(cuda(case.scores), cuda(case.valid), ratio_as(ratio, form), num_strata=num_strata,
                                seed=seed)
    want = ops.select_stratified(case.scores, case.valid, ratio, num_strata=num_strata, seed=seed)
    assert_same_on_both(got, want, "select_stratified")


@budget(80)
@given(case=selection_strategies_2d, ratio=props.ratios, form=ratio_forms,
       min_tokens=st.one_of(st.integers(0, 4), st.integers(0, 5000)))
def test_select_sequence_aware_cuda_equals_cpu(case, ratio, form, min_tokens):
    """Bit-identical sequence-aware masks (global top-k plus each row's minimum)."""
    got = ops.select_sequence_aware(cuda(case.scores), cuda(case.valid), ratio_as(ratio, form), min_tokens)
    want = ops.select_sequence_aware(case.scores, case.valid, ratio, min_tokens)
    assert_same_on_both(got, want, "select_sequence_aware")


@budget(80)
@given(data=st.data())
def test_compact_indices_cuda_equals_cpu(data):
    """Same indices (logical row-major order, -1 padding) and count on CUDA and CPU, any layout and capacity."""
    shape = data.draw(st.one_of(props.shapes(), st.sampled_from([(4097,), (3, 16385), (1 << 20,)])))
    mask = props.lay_out(data.draw(props.bool_mask(shape)), data.draw(st.sampled_from(props.ANY_STRIDE_LAYOUTS)))
    n_true = int(mask.sum())
    capacity = data.draw(st.one_of(st.integers(0, 3), st.integers(0, mask.numel() + 3),
                                   st.sampled_from([n_true, n_true + 1, max(0, n_true - 1)])))
    got_i, got_c = ops.compact_indices(cuda(mask), capacity)
    want_i, want_c = ops.compact_indices(mask, capacity)
    assert got_i.is_cuda and got_c.is_cuda
    assert torch.equal(got_i.cpu(), want_i) and int(got_c) == int(want_c)


# --------------------------------------------------------------------------------------------------
# token_stats / selective_ce_backward
# --------------------------------------------------------------------------------------------------
@budget(120)
@given(case=props.logits_cases())
def test_token_stats_cuda_matches_cpu(case):
    """The CUDA op (Triton) against the CPU op (3e-6, as test_stats_cuda), every dtype, row strides with
    NaN padding, ignore_index inside/outside [0, V), out-of-range targets (NaN, never read), -inf / +inf
    entries. NaN logits (undocumented): the kernel skips NaN entries, the CPU op makes the row NaN; the
    comparison uses test_properties.triton_expected_stats, which pins that divergence (reported).
    Catches: a kernel that reads the padding of a row-strided view, chunk / program boundary bugs at
    sizes the interpreter never runs, different exp/log accuracy on the device."""
    got = torch.ops.cggr.token_stats(cuda(case.logits), cuda(case.targets), case.ignore_index).cpu()
    want = props.triton_expected_stats(case)
    if case.logits.shape[1] == 1:  # known deviation: test_token_stats_cuda_p2_is_zero_for_v1
        got[4] = torch.where(torch.isnan(got[4]), 0.0, got[4])
    torch.testing.assert_close(got, want, rtol=3e-6, atol=3e-6, equal_nan=True)
    # and the float64 reference where the CPU op and the kernel agree (no NaN logits)
    if not bool(torch.isnan(case.logits).any()) and case.logits.shape[1] > 1:
        assert_stats_close(got, props.observed_stats_reference(case))


@pytest.mark.parametrize("value", [-math.inf, math.nan])
def test_token_stats_cuda_p2_is_zero_for_v1(value):
    out = torch.ops.cggr.token_stats(torch.tensor([[value]], device="cuda"), torch.tensor([0], device="cuda"), -100)
    assert out[4, 0].item() == 0


@budget(60)
@given(case=props.logits_cases(layouts=["contiguous"]), layout=st.sampled_from(["2d_transposed", "3d_transposed"]))
def test_token_stats_wrapper_cuda_matches_cpu(case, layout):
    """cggr.ops.token_stats on CUDA views ([N, V] with a non-unit last-dim stride, [B, T, V] with a
    transposed batch) == the same call on the CPU."""
    x, t = case.logits, case.targets
    if layout == "3d_transposed" and x.shape[0] % 2 == 0 and x.shape[0]:
        x = x.reshape(2, -1, x.shape[1]).transpose(0, 1).contiguous().transpose(0, 1)
        t = t.reshape(2, -1).t().contiguous().t()
    else:
        x = props.lay_out(x, "transposed")
    got = ops.token_stats(cuda(x), cuda(t), case.ignore_index, validate_targets=False)
    want = ops.token_stats(x, t, case.ignore_index, validate_targets=False)
    nan_rows = torch.isnan(x).any(-1)  # NaN logits: the pinned divergence, compared in the test above
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.cpu()
        if i == 4 and x.shape[-1] == 1:  # known deviation: test_token_stats_cuda_p2_is_zero_for_v1
            a = torch.where(torch.isnan(a) & (b == 0), 0.0, a)
        torch.testing.assert_close(a[~nan_rows], b[~nan_rows], rtol=3e-6, atol=3e-6, equal_nan=True)


@budget(80)
@given(case=props.logits_cases(extreme=False), data=st.data())
def test_selective_ce_backward_cuda_matches_cpu(case, data):
    """The CUDA backward (Triton) == the CPU op from the same lse (close within one rounding of the output
    dtype), unselected / ignored rows exactly 0 on both (their NaN / inf logits never read), selected rows
    with an out-of-range target NaN on both. Catches: a device kernel writing unselected rows, reading
    padding, or rounding differently from the CPU implementation."""
    logits, targets = case.logits, case.targets
    N = logits.shape[0]
    lse = torch.ops.cggr.token_stats(logits, targets, case.ignore_index)[0]
    mask = data.draw(props.bool_mask((N,)))
    row_weight = None
    if data.draw(st.booleans()):
        row_weight = torch.rand(N, generator=props.generator(data.draw(props.seeds))) + 0.5
    scale = torch.tensor(data.draw(st.sampled_from([1.0, 0.37, 1e-3, 64.0])))
    got = torch.ops.cggr.selective_ce_backward(cuda(logits), cuda(targets), cuda(lse), cuda(mask), cuda(scale),
                                               cuda(row_weight), case.ignore_index).cpu()
    want = torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, scale, row_weight, case.ignore_index)
    sel = mask & (targets != case.ignore_index)
    assert bool((got[~sel] == 0).all()) and bool((want[~sel] == 0).all())
    ulp = props.EPS[logits.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=max(2e-5, 2 * ulp), atol=1e-6 * float(scale.abs()),
                               equal_nan=True)


@budget(60)
@given(case=props.slice_cases())
def test_linear_ce_grad_and_softcap_cuda_match_cpu(case):
    """torch.ops.cggr.softcap_ / linear_ce_grad_ on CUDA (Triton) == the CPU ops, in place on row-strided
    views: padding untouched, inactive rows exact zeros, tanh within one ulp of the half dtypes."""
    props.check_slice_ops_match_cpu(case, torch.ops.cggr.softcap_, torch.ops.cggr.linear_ce_grad_, "cuda")


# --------------------------------------------------------------------------------------------------
# CGGRLoss and the fused linear loss on CUDA: the CPU file's float64 properties, on the device
# --------------------------------------------------------------------------------------------------
@budget(100)
@given(case=props.loss_cases())
def test_cggr_loss_cuda_matches_float64(case):
    """test_properties.test_cggr_loss_matches_float64 on CUDA (statistics, selection of the device's own
    scores, loss and gradient against float64), plus the CUDA loss close to the CPU loss whenever both
    select the same tokens."""
    props.check_cggr_loss(case, "cuda")
    crit_cpu, _, loss_cpu, _ = props.run_loss(case, "cpu")
    crit_gpu, _, loss_gpu, _ = props.run_loss(case, "cuda")
    if torch.equal(crit_cpu._last["mask"], crit_gpu._last["mask"].cpu()):
        torch.testing.assert_close(loss_gpu.detach().cpu(), loss_cpu.detach(), rtol=1e-5, atol=1e-5)


@budget(60)
@given(case=props.loss_cases(nonfinite=True))
def test_cggr_loss_cuda_nonfinite_logits(case):
    """test_properties.test_cggr_loss_nonfinite_logits on CUDA: NaN scores never outrank finite ones, the
    loss is NaN exactly where a selected token's nll is NaN, selected rows with NaN / +inf logits have
    NaN gradients, unselected rows exactly 0. (The CUDA statistics of a row with a NaN entry are finite,
    so such a row can be selected and then only its NaN entries' gradients are NaN.)"""
    props.check_cggr_loss_nonfinite(case, "cuda")


@budget(80)
@given(case=props.linear_cases())
def test_fused_linear_cuda_matches_float64(case):
    """test_properties.test_fused_linear_matches_float64 on CUDA (cuBLAS logits, Triton softcap and CE
    gradient kernels, compaction without host sync for max_selected)."""
    props.check_fused_linear(case, "cuda")


# --------------------------------------------------------------------------------------------------
# N * V beyond 2^31 elements
# --------------------------------------------------------------------------------------------------
def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@st.composite
def huge_cases(draw):
    V = draw(st.sampled_from([131072, 131071, 262147, 50257]))
    extra_rows = draw(st.integers(1, 300))
    row_pad = draw(st.sampled_from([0, 0, 5]))  # a row-strided view: the padding is NaN and never read
    N = (2**31) // (V + row_pad) + extra_rows
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    return N, V, row_pad, dtype, draw(props.seeds)


@pytest.mark.skipif(not torch.cuda.is_available() or _free_gpu_bytes() < 24 * 2**30,
                    reason="N * V > 2^31 needs ~24 GiB of free GPU memory")
@budget(3)
@given(case=huge_cases())
def test_token_stats_beyond_2_31_elements(case):
    """token_stats and selective_ce_backward on [N, V] logits with N * V (and N * row stride) > 2^31: rows
    on both sides of element 2^31 and the last rows match the CPU op and the float64 reference, every lse
    matches a float32 logsumexp, the gradient's selected rows match the CPU op and the rest is exactly 0.
    Catches: int32 row offsets wrapping around (rows past element 2^31 reading the wrong memory)."""
    N, V, row_pad, dtype, seed = case
    stride = V + row_pad
    assert N * V > 2**31 and N * stride > 2**31
    g = torch.Generator(device="cuda").manual_seed(seed)
    storage = torch.full((N, stride), math.nan, dtype=dtype, device="cuda")
    logits = storage[:, :V]
    logits.normal_(0.0, 3.0, generator=g)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[::7] = -100
    note(f"N={N} V={V} stride={stride} dtype={dtype}")
    out = torch.ops.cggr.token_stats(logits, targets, -100)
    boundary = 2**31 // stride
    rows = torch.unique(torch.cat([torch.arange(0, 4), torch.arange(boundary - 3, min(N, boundary + 4)),
                                   torch.arange(N - 8, N)])).cuda()
    x_rows, t_rows = logits[rows].cpu(), targets[rows].cpu()
    cpu = torch.ops.cggr.token_stats(x_rows, t_rows, -100)
    torch.testing.assert_close(out[:, rows].cpu(), cpu, rtol=3e-6, atol=3e-6)
    assert_stats_close(out[:, rows].cpu(), stats_reference(x_rows, t_rows))
    lse32 = torch.cat([torch.logsumexp(logits[r:r + 4096].float(), -1) for r in range(0, N, 4096)])
    torch.testing.assert_close(out[0], lse32, rtol=1e-5, atol=1e-5)
    del lse32

    mask = torch.zeros(N, dtype=torch.bool, device="cuda")
    mask[rows] = True
    scale = torch.tensor(0.5, device="cuda")
    grad = torch.ops.cggr.selective_ce_backward(logits, targets, out[0], mask, scale, None, -100)
    want = torch.ops.cggr.selective_ce_backward(x_rows, t_rows, out[0, rows].cpu(), torch.ones(rows.numel(),
                                                dtype=torch.bool), scale.cpu(), None, -100)
    torch.testing.assert_close(grad[rows].cpu().float(), want.float(), rtol=2 * props.EPS[dtype], atol=1e-6)
    nonzero_rows = grad.abs().amax(-1) > 0
    selected_valid = mask & (targets != -100)
    assert torch.equal(nonzero_rows, selected_valid)
