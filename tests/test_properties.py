"""Property-based tests (hypothesis) of every op, of CGGRLoss and of the fused linear loss, on the CPU.

Every test draws its inputs: shapes (1 and odd sizes included, 0 where the contract allows it),
layouts (transposed, strided, offset and broadcast views where the contract accepts any strides;
row-strided logits, last-dim stride 1, for the raw ops), every accepted dtype (float32 / bfloat16 /
float16 scores and logits; int64 / int32 targets), ratios in (0, 1] (tiny ones, 1 and float32
round-offs included), ignore patterns (none, all, random) and NaN / +inf / -inf placements, and
checks the contract of docs/architecture.md against the float64 / plain-Python references of the
existing tests, imported from them (never copied):

    selection_reference                      select_topk / select_stratified / select_sequence_aware
    test_token_stats.reference               token_stats, float64 [5, N]
    test_selective_ce_backward.reference     selective_ce_backward (float64 autograd)
    test_linear.reference                    fused linear selective CE (float64 dense loss + grads)

Inputs are fresh on every run (no derandomize, no example database: nothing is written into the
checkout); a failure prints the shrunk example and a ``@reproduce_failure`` blob to paste above the
test. The example budget keeps the file at about a minute on two CPU cores under TRITON_INTERPRET=1;
``CGGR_PROPERTY_SCALE=20 pytest tests/test_properties.py`` multiplies every budget for a long fuzzing
run.

Non-finite logits (not in the op contracts; what the code does, pinned here, see each test):
  * a row holding NaN or +inf: every statistic of the row is NaN (nll 0 when its target is ignored),
    like the float64 reference. The Triton kernel (CUDA, and the interpreter) differs for NaN: it skips
    NaN entries as if they were -inf (finite statistics; nll NaN only when the target's logit is NaN),
    see triton_expected_stats: CPU and CUDA statistics differ on rows holding NaN;
  * a row of -inf only: lse -inf, every other statistic NaN (the float64 reference gives lse NaN);
  * -inf in some entries (masked vocabulary): finite statistics; nll +inf when the target's logit is -inf.
"""
import math
import os
import re
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import selection_reference as ref
from test_linear import reference as linear_reference
from test_selective_ce_backward import reference as backward_reference
from test_token_stats import assert_stats_close
from test_token_stats import reference as stats_reference

from cggr import CGGRLoss, ops
from cggr.linear import fused_linear_selective_ce, token_stats_from_hidden
from cggr.scoring import score

# the Triton interpreter evaluates padding rows / lanes with numpy (log(0), inf - inf, all-NaN maxima)
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRET, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (the GPU suite covers CUDA)")

# --------------------------------------------------------------------------------------------------
# hypothesis profile: fresh random inputs, no deadline (the interpreter is slow), reproduction blob
# --------------------------------------------------------------------------------------------------
settings.register_profile(
    "cggr-properties",
    deadline=None,
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("cggr-properties")
SCALE = float(os.environ.get("CGGR_PROPERTY_SCALE", "1"))


def budget(max_examples):
    """The profile with this test's example count (times CGGR_PROPERTY_SCALE)."""
    return settings(PROFILE, max_examples=max(1, round(max_examples * SCALE)))


NAN, INF = math.nan, math.inf
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one ulp at 1
EPS32 = 2.0 ** -23
# the spacing of the subnormals: below the smallest normal a rounding error is absolute, not relative
QUANTUM = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}

dtypes = st.sampled_from(FLOAT_DTYPES)
target_dtypes = st.sampled_from([torch.int64, torch.int32])
seeds = st.integers(0, 2**32 - 1)
# sizes: small ones (1 and odd included) most of the time, the powers of two and their neighbours
# (block boundaries of the kernels), now and then a larger one
sizes = st.one_of(st.integers(1, 12), st.sampled_from([1, 2, 3, 5, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129]),
                  st.integers(1, 300))
# ratios in (0, 1]: the documented float32 rule matters for decimal ratios, tiny ones give k = 1,
# 1e-46 rounds to 0.0 in float32 (k = 1 still), 1 - 2^-24 rounds to 1.0
ratios = st.one_of(
    st.sampled_from([1.0, 0.5, 0.25, 0.1, 0.2, 0.3, 0.7, 1 / 3, 0.999, 1 - 2**-24, 1e-3, 1e-7, 1e-30, 1e-46]),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
)
SPECIALS = [NAN, INF, -INF]


def generator(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# layouts: the same values in another memory layout
# --------------------------------------------------------------------------------------------------
ANY_STRIDE_LAYOUTS = ["contiguous", "transposed", "strided", "offset", "row_strided"]
ROW_STRIDE_LAYOUTS = ["contiguous", "row_strided", "offset"]  # last-dim stride 1 (raw token ops)


def lay_out(t, layout, pad=None):
    """A view holding t's values in `layout`. Padding that a correct op never reads holds `pad`
    (NaN for floats, True for masks), so reading outside the view changes the result."""
    if pad is None:
        pad = True if t.dtype == torch.bool else NAN
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":
        if t.dim() < 2:
            return lay_out(t, "strided", pad)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of the last dim
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1] + 1,), pad, dtype=t.dtype)
        view = wide[..., 1::2]
    elif layout == "row_strided":  # a column slice of a wider tensor: last-dim stride 1, larger row stride
        wide = torch.full(t.shape[:-1] + (t.shape[-1] + 3,), pad, dtype=t.dtype)
        view = wide[..., 2:2 + t.shape[-1]]
    elif layout == "offset":  # a non-zero storage offset
        flat = torch.full((t.numel() + 7,), pad, dtype=t.dtype)
        view = flat[7:].view(t.shape)
    else:
        raise ValueError(layout)
    view.copy_(t)
    return view


@st.composite
def shapes(draw, min_dims=1, max_dims=3, max_numel=4096):
    dims = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(sizes) for _ in range(dims))
    if math.prod(shape) > max_numel:  # keep the Python references fast
        shape = tuple(min(s, 16) for s in shape)
    if draw(st.integers(0, 19)) == 0:  # now and then an empty dimension
        shape = shape[:-1] + (0,)
    return shape


# --------------------------------------------------------------------------------------------------
# scores and masks
# --------------------------------------------------------------------------------------------------
TIE_POOL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, -1e-30, 3.0e38, -3.0e38, 65504.0, 1e-40]


@st.composite
def float_values(draw, shape, dtype, specials=True):
    """Values of a score tensor: arbitrary float32s, heavy ties, or seeded normals at a drawn scale;
    then NaN / +inf / -inf at drawn positions. float16 turns |x| > 65504 into inf (ranked below finite)."""
    n = math.prod(shape)
    kind = draw(st.sampled_from(["floats", "ties", "seeded"]) if n <= 256 else st.just("seeded"))
    if kind == "floats":
        x = torch.tensor(draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                       min_size=n, max_size=n)), dtype=torch.float32)
    elif kind == "ties":
        x = torch.tensor(draw(st.lists(st.sampled_from(TIE_POOL), min_size=n, max_size=n)), dtype=torch.float32)
    else:
        scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-30]))
        x = torch.randn(n, generator=generator(draw(seeds))) * scale
        if draw(st.booleans()):  # coarse values: many exact ties
            x = x.round()
    if specials and n:
        for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(SPECIALS)), max_size=8)):
            x[i] = v
        if draw(st.integers(0, 9)) == 0:  # a tensor with non-finite values only
            x = torch.tensor(draw(st.lists(st.sampled_from(SPECIALS), min_size=n, max_size=n)))
    return x.to(dtype).reshape(shape)


@st.composite
def bool_mask(draw, shape):
    """None-like patterns: all, nothing, one, random at a drawn density (as a tensor)."""
    n = math.prod(shape)
    kind = draw(st.sampled_from(["all", "none", "one", "random", "random"]))
    if kind == "all":
        m = torch.ones(n, dtype=torch.bool)
    elif kind == "none":
        m = torch.zeros(n, dtype=torch.bool)
    elif kind == "one":
        m = torch.zeros(n, dtype=torch.bool)
        if n:
            m[draw(st.integers(0, n - 1))] = True
    else:
        p = draw(st.sampled_from([0.05, 0.5, 0.95]))
        m = torch.rand(n, generator=generator(draw(seeds))) < p
    return m.reshape(shape)


class SelectionCase(NamedTuple):
    scores: torch.Tensor
    valid: Optional[torch.Tensor]


@st.composite
def selection_cases(draw, min_dims=1, max_dims=3, max_numel=4096):
    """scores (any dtype, any layout, broadcast views included) and valid (None or a mask, any layout)."""
    shape = draw(shapes(min_dims, max_dims, max_numel))
    dtype = draw(dtypes)
    layout = draw(st.sampled_from(ANY_STRIDE_LAYOUTS + ["broadcast"]))
    if layout == "broadcast" and len(shape) >= 2 and shape[0] > 0:
        # stride 0 along the first dim: every row the same values (ties across rows)
        row = draw(float_values((1,) + shape[1:], dtype))
        scores = row.expand(shape)
    else:
        scores = lay_out(draw(float_values(shape, dtype)), "contiguous" if layout == "broadcast" else layout)
    valid = None
    if draw(st.integers(0, 3)):
        valid = lay_out(draw(bool_mask(shape)), draw(st.sampled_from(ANY_STRIDE_LAYOUTS)))
    note(f"scores {DTYPE_NAMES[dtype]} shape {tuple(shape)} strides {scores.stride()} ({layout}); "
         f"valid {None if valid is None else f'{int(valid.sum())} true, strides {valid.stride()}'}")
    return SelectionCase(scores, valid)


def n_valid_of(case):
    return case.scores.numel() if case.valid is None else int(case.valid.sum())


def assert_same_mask(got, want, what="mask"):
    assert got.dtype == torch.bool and tuple(got.shape) == tuple(want.shape), (got.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        diff = torch.nonzero((got != want).reshape(-1)).reshape(-1)
        raise AssertionError(f"{what} differs from the reference at {diff.numel()} flat positions, first "
                             f"{diff[:10].tolist()} (got {got.reshape(-1)[diff[:10]].tolist()})")


def ratio_arg(ratio, as_tensor):
    return torch.tensor(ratio, dtype=torch.float32) if as_tensor else ratio


# --------------------------------------------------------------------------------------------------
# selection ops
# --------------------------------------------------------------------------------------------------
@budget(150)
@given(case=selection_cases(), ratio=ratios, as_tensor=st.booleans())
def test_select_topk_matches_reference(case, ratio, as_tensor):
    """select_topk == selection_reference.topk bit for bit: k = quota(ratio, n_valid) (the documented
    float32 rule), non-finite below finite, ties to the lower flat index, invalid never chosen, any layout.
    Catches: a wrong quota rounding, NaN/inf ranked as finite, ties broken by the higher index, a
    stride ignored (reading padding), invalid tokens selected."""
    got = ops.select_topk(case.scores, case.valid, ratio_arg(ratio, as_tensor))
    assert_same_mask(got, ref.topk(case.scores, case.valid, ratio))
    assert int(got.sum()) == ref.quota(ratio, n_valid_of(case))
    if case.valid is not None:
        assert not bool((got & ~case.valid).any())


@budget(60)
@given(case=selection_cases(max_dims=2, max_numel=1024),
       ratio=st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_select_raw_op_clamps_any_ratio_tensor(case, ratio):
    """The raw op takes any float32 ratio tensor: clamped to [0, 1] on device, NaN and values <= 0 give
    k = 1 (at least one token when one is valid), values >= 1 every valid token.
    Catches: an unclamped ratio (k > n_valid, k < 0), NaN turning into k = 0 or k = n."""
    got = torch.ops.cggr.select_topk(case.scores, case.valid, torch.tensor(ratio, dtype=torch.float32))
    assert_same_mask(got, ref.topk(case.scores, case.valid, ratio))


@budget(80)
@given(case=selection_cases(max_numel=1024), ratio=ratios,
       num_strata=st.one_of(st.integers(1, 9), st.sampled_from([1023, 1024]), st.integers(1, 1024)),
       seed=st.integers(-(2**63), 2**64 - 1), as_tensor=st.booleans())
def test_select_stratified_matches_reference(case, ratio, num_strata, seed, as_tensor):
    """select_stratified == selection_reference.stratified: equal-count strata of the ranked valid
    tokens, the documented quota water-fill, splitmix64(seed, flat index) keys, seeds over the whole
    64-bit range. Catches: a stratum boundary off by one, a quota that does not sum to k, a different
    RNG stream or seed truncation, a stride ignored."""
    got = ops.select_stratified(case.scores, case.valid, ratio_arg(ratio, as_tensor), num_strata=num_strata,
                                seed=seed)
    assert_same_mask(got, ref.stratified(case.scores, case.valid, ratio, num_strata, seed))
    assert int(got.sum()) == ref.quota(ratio, n_valid_of(case))


@budget(80)
@given(case=selection_cases(min_dims=2, max_dims=2), ratio=ratios,
       min_tokens=st.one_of(st.integers(0, 4), st.integers(0, 400)), as_tensor=st.booleans())
def test_select_sequence_aware_matches_reference(case, ratio, min_tokens, as_tensor):
    """select_sequence_aware == selection_reference.sequence_aware: the global top-k plus every row's
    hardest valid tokens up to min(min_tokens, row's valid tokens). Catches: a row minimum missed or
    exceeded, rows ranked by another order than the global one, invalid tokens counted."""
    got = ops.select_sequence_aware(case.scores, case.valid, ratio_arg(ratio, as_tensor), min_tokens)
    assert_same_mask(got, ref.sequence_aware(case.scores, case.valid, ratio, min_tokens))
    valid = torch.ones_like(got) if case.valid is None else case.valid
    assert bool(((got & valid).sum(1) >= valid.sum(1).clamp(max=min_tokens)).all())
    assert not bool((got & ~valid).any())


@budget(80)
@given(data=st.data())
def test_compact_indices(data):
    """compact_indices(mask, capacity): the flat indices of True entries (row-major order of the logical
    shape, whatever the strides) ascending, padded with -1 to capacity; count = min(true count, capacity).
    Catches: storage order instead of logical order, a missing -1 padding, a count above capacity."""
    shape = data.draw(shapes())
    mask = lay_out(data.draw(bool_mask(shape)), data.draw(st.sampled_from(ANY_STRIDE_LAYOUTS)))
    true = torch.nonzero(mask.reshape(-1)).reshape(-1)
    capacity = data.draw(st.one_of(st.integers(0, 3), st.integers(0, mask.numel() + 3),
                                   st.sampled_from([true.numel(), true.numel() + 1, max(0, true.numel() - 1)])))
    indices, count = ops.compact_indices(mask, capacity)
    assert indices.shape == (capacity,) and indices.dtype == torch.int64
    assert count.shape == () and count.dtype == torch.int64
    c = min(true.numel(), capacity)
    assert int(count) == c
    assert indices[:c].tolist() == true[:c].tolist()
    assert bool((indices[c:] == -1).all())


# --------------------------------------------------------------------------------------------------
# logits cases (token_stats, selective_ce_backward)
# --------------------------------------------------------------------------------------------------
class LogitsCase(NamedTuple):
    logits: torch.Tensor      # [N, V], last-dim stride 1 (layout drawn)
    targets: torch.Tensor     # [N] int64 / int32
    ignore_index: int
    in_range: torch.Tensor    # [N] bool: target in [0, V) (ignored targets count as in range when they are)


@st.composite
def logits_cases(draw, max_n=33, max_v=300, nonfinite=True, out_of_range=True, extreme=True,
                 layouts=ROW_STRIDE_LAYOUTS):
    N = draw(st.one_of(st.integers(1, 9), st.integers(0, max_n)))
    V = draw(st.one_of(st.integers(1, 5), st.sampled_from([31, 32, 33, 127, 128, 129]), st.integers(1, max_v)))
    dtype = draw(dtypes)
    g = generator(draw(seeds))
    scales = [1.0, 4.0, 0.01] + ([30.0, 1000.0] if extreme else [])
    shifts = [0.0, 20.0] + ([-1e4, 5e3] if extreme else [])
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * draw(st.sampled_from(scales))
    x = x + draw(st.sampled_from(shifts))
    if draw(st.booleans()):  # coarse logits: duplicated maxima (p2 == p1), exact ties
        x = x.round()
    x = x.to(dtype)
    if nonfinite and N:
        for r, c, v in draw(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, V - 1),
                                               st.sampled_from(SPECIALS + [-INF, -INF])), max_size=6)):
            x[r, c] = v  # -inf (masked vocabulary) more often than NaN / +inf
        for r in draw(st.lists(st.integers(0, N - 1), max_size=2)):
            x[r] = -INF  # a row of -inf only
    t_dtype = draw(target_dtypes)
    targets = torch.randint(0, V, (N,), generator=g)
    ignore_index = draw(st.sampled_from([-100, -1, "inside"]))
    if ignore_index == "inside":  # ignore_index may be a valid class id
        ignore_index = draw(st.integers(0, V - 1))
    pattern = draw(st.sampled_from(["none", "all", "random"]))
    if pattern == "all":
        targets[:] = ignore_index
    elif pattern == "random":
        targets[torch.rand(N, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))] = ignore_index
    if out_of_range and N:
        bad_values = [V, V + 1, -2, -(2**31), 2**31 - 1] + ([2**40, -(2**40)] if t_dtype == torch.int64 else [])
        for r, v in draw(st.lists(st.tuples(st.integers(0, N - 1), st.sampled_from(bad_values)), max_size=3)):
            if v != ignore_index:
                targets[r] = v
    targets = targets.to(t_dtype)
    layout = draw(st.sampled_from(layouts))
    logits = lay_out(x, layout)
    in_range = ((targets >= 0) & (targets < V)) | (targets == ignore_index)
    note(f"logits {DTYPE_NAMES[dtype]} [{N}, {V}] strides {logits.stride()} ({layout}), targets {t_dtype}, "
         f"ignore_index {ignore_index}, {int((targets == ignore_index).sum())} ignored, "
         f"{int((~in_range).sum())} out of range, non-finite {int((~torch.isfinite(x)).sum())}")
    return LogitsCase(logits, targets, ignore_index, in_range)


def observed_stats_reference(case):
    """float64 reference (test_token_stats.reference) plus the observed rule for rows of -inf only:
    the op returns lse = -inf there (the reference's m + logsumexp(x - m) is NaN)."""
    want = stats_reference(case.logits, case.targets, case.ignore_index)
    all_neg_inf = (case.logits.double() == -INF).all(dim=1) if case.logits.shape[1] else None
    if all_neg_inf is not None:
        want[0, all_neg_inf] = -INF
    return want


@budget(120)
@given(case=logits_cases())
def test_token_stats_cpu_matches_float64(case):
    """torch.ops.cggr.token_stats (CPU) == float64 reference (rtol = atol = 2e-5, the documented accuracy
    of test_token_stats) for every dtype, int32/int64 targets, any row stride, ignore_index inside or
    outside [0, V), out-of-range targets (nll NaN, never read), ignored rows (nll 0).
    Non-finite logits (undocumented; what the code does): a row with NaN or +inf has every statistic
    NaN (nll 0 if ignored), as the float64 reference; a row of -inf only has lse = -inf and every other
    statistic NaN; partial -inf rows are finite except nll = +inf when the target's logit is -inf.
    Catches: lost precision at large |logits| or fp16/bf16, p2 wrong on duplicated maxima, the padding
    of a row-strided view read, an out-of-range target read, ignored rows with a non-zero nll."""
    logits, targets = case.logits, case.targets
    out = torch.ops.cggr.token_stats(logits, targets, case.ignore_index)
    assert out.shape == (5, logits.shape[0]) and out.dtype == torch.float32
    assert_stats_close(out, observed_stats_reference(case))
    ignored = targets == case.ignore_index
    assert bool((out[1, ignored] == 0).all())
    assert bool(torch.isnan(out[1, ~case.in_range]).all())
    x = logits.double()
    poisoned = (torch.isnan(x) | (x == INF)).any(dim=1)
    assert bool(torch.isnan(out[[0, 2, 3] + ([4] if logits.shape[1] > 1 else [])][:, poisoned]).all())


@budget(60)
@given(case=logits_cases(layouts=["contiguous"]), data=st.data())
def test_token_stats_wrapper_any_layout_and_validation(case, data):
    """cggr.ops.token_stats: [N, V] or [B, T, V] in any layout (transposed batch, non-unit last-dim stride)
    gives the raw op's numbers on a contiguous copy, bit for bit, shaped like targets; with
    validate_targets=True an out-of-range target raises a ValueError naming the first one (row-major
    position of the logical shape) and its value. Catches: a wrong flattening of a transposed batch,
    a mismatch between validation and the kernel's notion of out of range."""
    logits, targets = case.logits, case.targets
    N, V = logits.shape
    want = torch.ops.cggr.token_stats(logits, targets, case.ignore_index)
    split = data.draw(st.sampled_from([d for d in range(1, N + 1) if N % d == 0] or [1]))
    layout = data.draw(st.sampled_from(["2d_transposed", "2d_strided", "3d", "3d_transposed_batch"]))
    if layout.startswith("2d"):
        x, t, shape = lay_out(logits, "transposed" if layout == "2d_transposed" else "strided"), targets, (N,)
    else:
        B, T = split, N // split
        shape = (B, T)
        x, t = logits.reshape(B, T, V), targets.reshape(B, T)
        if layout == "3d_transposed_batch":  # storage [T, B, V], viewed as [B, T, V]
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
            t = t.t().contiguous().t()
    note(f"wrapper input {layout} shape {tuple(x.shape)} strides {x.stride()}")
    bad = (~case.in_range).nonzero().reshape(-1)
    if bad.numel():
        first = int(bad[0])
        where = list(torch.unravel_index(torch.tensor(first), shape))
        value = int(targets[first])
        with pytest.raises(ValueError, match=re.escape(f"targets{[int(i) for i in where]} = {value} is outside "
                                                       f"[0, {V})")):
            ops.token_stats(x, t, case.ignore_index)
    stats = ops.token_stats(x, t, case.ignore_index, validate_targets=False)
    for i, s in enumerate(stats):
        assert tuple(s.shape) == shape and s.dtype == torch.float32
        torch.testing.assert_close(s.reshape(-1), want[i], rtol=0, atol=0, equal_nan=True)


TRITON_CONFIGS = st.one_of(st.just({}), st.fixed_dictionaries({
    "block_v": st.sampled_from([16, 32, 64, 128, 256]), "block_n": st.sampled_from([1, 2, 4]),
    "lane_sums": st.booleans(), "branch_top2": st.booleans(), "prefetch": st.booleans()}))


def triton_expected_stats(case):
    """What the Triton kernel returns, from the CPU op (undocumented for NaN; observed the same on an
    H200 and in the interpreter): NaN logits are skipped as if they were -inf, except that the nll of a
    row whose target logit is NaN is NaN. The CPU op instead makes the whole row NaN (reported as a
    CPU / CUDA divergence). Callers also set aside p2 of a V == 1 row of -inf / NaN only (the kernel gives
    NaN, the contract 0: test_token_stats_triton_p2_is_zero_for_v1)."""
    x = case.logits
    cleaned = torch.where(torch.isnan(x), -INF, x)
    want = torch.ops.cggr.token_stats(cleaned, case.targets, case.ignore_index)
    t = case.targets.long()
    hit = case.in_range & (t != case.ignore_index)
    if x.shape[1]:
        t_logit = x.gather(1, torch.where(hit, t, 0)[:, None]).squeeze(1)
        want[1, hit & torch.isnan(t_logit)] = NAN
    return want


@requires_interpreter
@budget(40)
@given(case=logits_cases(max_n=17, max_v=200), cfg=TRITON_CONFIGS)
def test_token_stats_triton_matches_cpu(case, cfg):
    """The Triton kernel (interpreted on CPU tensors) == the CPU implementation (rtol = atol = 3e-6, as
    test_token_stats) for every launch variant (block sizes, several rows per program, lane sums, branchy
    top-2, prefetch), on finite, -inf and +inf logits; NaN logits: see triton_expected_stats.
    Catches: a chunk boundary / ragged last program bug, the online rescaling or the cross-chunk top-2
    going wrong, row-stride handling in the kernel, a NaN handling that changes."""
    from cggr.triton_kernels import launch_token_stats

    note(f"config {cfg}")
    got = launch_token_stats(case.logits, case.targets.contiguous(), case.ignore_index, **cfg)
    want = triton_expected_stats(case)
    if case.logits.shape[1] == 1:  # known deviation, pinned by test_token_stats_triton_p2_is_zero_for_v1
        got[4] = torch.where(torch.isnan(got[4]), 0.0, got[4])
    torch.testing.assert_close(got, want, rtol=3e-6, atol=3e-6, equal_nan=True)


@requires_interpreter
@pytest.mark.parametrize("value", [-INF, NAN])
def test_token_stats_triton_p2_is_zero_for_v1(value):
    """Minimised by hypothesis from test_token_stats_triton_matches_cpu: logits [[-inf]], target 0."""
    from cggr.triton_kernels import launch_token_stats

    out = launch_token_stats(torch.tensor([[value]]), torch.tensor([0]), -100)
    assert torch.ops.cggr.token_stats(torch.tensor([[value]]), torch.tensor([0]), -100)[4, 0] == 0
    assert out[4, 0] == 0


# --------------------------------------------------------------------------------------------------
# selective_ce_backward
# --------------------------------------------------------------------------------------------------
def grad_error_bound(logits64, lse32, coef, dtype, extra_rel=0.0):
    """Elementwise bound on |kernel - float64| for (softmax - onehot) * coef computed in float32 from a
    float32 lse: the rounding of lse (a few ulp of |lse|) is a relative error of p, exp and the product
    add a few float32 ulp, the result is rounded once to `dtype`."""
    with torch.no_grad():
        p = torch.softmax(logits64, dim=-1)
        p = torch.where(torch.isnan(p), 0.0, p)
        delta = 8 * EPS32 * (1 + lse32.double().abs().nan_to_num(0.0, 0.0, 0.0))[:, None] + extra_rel
        c = coef.double().abs()[:, None]
        return c * (p * delta + 4 * EPS32), c * (p + 1) * EPS[dtype] + QUANTUM[dtype]


def assert_within(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    bad = ~(err <= bound)  # NaN counts as a failure
    if bool(bad.any()):
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond the error bound; first "
                             f"{list(i)}: got {float(got[i])}, want {float(want[i])}, bound {float(bound[i])}")


@budget(80)
@given(case=logits_cases(extreme=False), data=st.data())
def test_selective_ce_backward_cpu(case, data):
    """selective_ce_backward (CPU) against float64 autograd (test_selective_ce_backward.reference): rows
    with mask True and target != ignore_index get (softmax - onehot) * scale * row_weight, within the
    float32-lse error bound; every other row is exactly 0 without being read (its logits may be NaN/inf);
    a selected row with an out-of-range target is NaN (documented in stats_ops). Selected rows with
    NaN or +inf logits are NaN (lse is NaN; undocumented, what the code does).
    Catches: gradient on unselected or ignored rows, NaN leaking from unselected rows, a missing scale or
    row weight, the onehot at the wrong column, a wrong dtype rounding."""
    logits, targets = case.logits, case.targets
    N = logits.shape[0]
    dtype = logits.dtype
    lse = torch.ops.cggr.token_stats(logits, targets, case.ignore_index)[0]
    mask = lay_out(data.draw(bool_mask((N,))), data.draw(st.sampled_from(ANY_STRIDE_LAYOUTS)))
    scale = data.draw(st.sampled_from([1.0, 0.37, 1e-3, 64.0, -2.0]))
    row_weight = None
    if data.draw(st.booleans()):
        row_weight = torch.rand(N, generator=generator(data.draw(seeds))) * 2 - 0.5
    grad = torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, torch.tensor(scale), row_weight,
                                                case.ignore_index)
    assert grad.shape == logits.shape and grad.dtype == dtype and grad.is_contiguous()
    sel = mask & (targets != case.ignore_index)
    assert bool((grad[~sel] == 0).all()), "unselected / ignored rows must be exactly zero"
    x = logits.double()
    nonfinite_row = (torch.isnan(x) | (x == INF)).any(dim=1) | (x == -INF).all(dim=1)
    assert bool(torch.isnan(grad[sel & ~case.in_range]).all()), "selected out-of-range target: NaN"
    assert bool(torch.isnan(grad[sel & nonfinite_row]).all()), "selected NaN / +inf / all -inf row: NaN"
    good = sel & case.in_range & ~nonfinite_row
    if not bool(good.any()):
        return
    want = backward_reference(logits.contiguous(), targets.long(), good, scale, row_weight, case.ignore_index)
    coef = torch.full((N,), scale, dtype=torch.float64) * (1.0 if row_weight is None else row_weight.double())
    kernel, rounding = grad_error_bound(x, lse, coef, dtype)
    assert_within(grad[good], want[good], 2 * kernel[good] + rounding[good], "grad_logits")


@requires_interpreter
@budget(30)
@given(case=logits_cases(max_n=17, max_v=200, extreme=False), data=st.data())
def test_selective_ce_backward_triton_matches_cpu(case, data):
    """The Triton backward kernel (interpreted) == the CPU implementation (close: the same float32
    formula; bf16/fp16 may round to neighbouring values), unselected rows exactly 0 in both, for every
    launch variant. Catches: a ragged last program writing garbage, rows not zeroed, row stride bugs."""
    from cggr.triton_kernels import launch_selective_ce_backward

    logits, targets = case.logits, case.targets
    N = logits.shape[0]
    lse = torch.ops.cggr.token_stats(logits, targets, case.ignore_index)[0]
    mask = data.draw(bool_mask((N,)))
    row_weight = torch.rand(N, generator=generator(data.draw(seeds))) + 0.5 if data.draw(st.booleans()) else None
    scale = torch.tensor(data.draw(st.sampled_from([1.0, 0.25, 3.0])))
    cfg = data.draw(st.one_of(st.just({}), st.fixed_dictionaries({
        "block_v": st.sampled_from([16, 64, 256]), "block_n": st.sampled_from([1, 2, 4])})))
    note(f"config {cfg}")
    got = launch_selective_ce_backward(logits, targets.contiguous(), lse, mask, scale, row_weight,
                                       case.ignore_index, **cfg)
    want = torch.ops.cggr.selective_ce_backward(logits, targets, lse, mask, scale, row_weight, case.ignore_index)
    sel = mask & (targets != case.ignore_index)
    assert bool((got[~sel] == 0).all())
    ulp = EPS[logits.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=max(1e-5, ulp), atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------------------------------
# the in-place building blocks of the fused linear loss: softcap_, linear_ce_grad_
# --------------------------------------------------------------------------------------------------
SLICE_PAD = 7.0  # padding of in-place slices: finite, and changed by any write of softcap_ or linear_ce_grad_


class SliceCase(NamedTuple):
    x: torch.Tensor           # [R, C] logits slice (layout drawn; its padding holds NaN)
    lse: torch.Tensor         # [R] float32
    targets: torch.Tensor     # [R] (inside the slice, outside it, or -100)
    coef: torch.Tensor        # [R] float32, 0 on inactive rows
    v0: int
    softcap: Optional[float]


@st.composite
def slice_cases(draw):
    R = draw(st.integers(0, 9))
    C = draw(st.one_of(st.integers(1, 5), st.sampled_from([31, 32, 33, 127, 128, 129]), st.integers(1, 300)))
    dtype = draw(dtypes)
    g = generator(draw(seeds))
    x = (torch.randn(R, C, generator=g) * draw(st.sampled_from([1.0, 4.0, 20.0]))).to(dtype)
    v0 = draw(st.integers(0, 500))
    softcap = draw(st.sampled_from([None, None, 0.5, 3.0, 30.0]))
    z = x.float() if softcap is None else (torch.tanh(x.float() / softcap) * softcap).to(dtype).float()
    # the full-vocabulary lse is at least the slice's own
    lse = torch.logsumexp(z, dim=1) + torch.rand(R, generator=g) * draw(st.sampled_from([0.0, 3.0]))
    targets = torch.randint(max(0, v0 - 3), v0 + C + 3, (R,), generator=g)
    targets[torch.rand(R, generator=g) < 0.2] = -100
    coef = torch.rand(R, generator=g) * 2 - 0.5
    coef[torch.rand(R, generator=g) < 0.3] = 0.0
    if R and draw(st.booleans()):  # an inactive row is never read: its logits may be anything
        x[draw(st.integers(0, R - 1))] = draw(st.sampled_from(SPECIALS))
        coef[torch.isnan(x.float()).any(1) | torch.isinf(x.float()).any(1)] = 0.0
    layout = draw(st.sampled_from(ROW_STRIDE_LAYOUTS))
    x = lay_out(x, layout, pad=SLICE_PAD)
    note(f"slice {DTYPE_NAMES[dtype]} [{R}, {C}] strides {x.stride()} ({layout}), v0 {v0}, softcap {softcap}")
    return SliceCase(x, lse, targets.to(draw(target_dtypes)), coef, v0, softcap)


def whole_storage(x):
    """A flat tensor over all of x's storage (x's padding and the elements of other views included)."""
    n = x.untyped_storage().nbytes() // x.element_size()
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), 0, (n,))


def storage_outside(x):
    """Everything of x's storage that is not x itself (padding an in-place op must leave alone)."""
    flat = whole_storage(x)
    inside = torch.zeros(flat.shape, dtype=torch.bool, device=x.device)
    inside.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(True)
    return flat[~inside].cpu()


def ce_grad_float64(case):
    """(softmax over the full vocabulary - onehot) * coef on the slice, softcap's derivative included,
    from the (rounded) capped logits the forward saw; exact zeros on inactive rows."""
    x = case.x.double()
    if case.softcap is None:
        z, dz = x, torch.ones_like(x)
    else:
        th = torch.tanh(x / case.softcap)
        z, dz = (th * case.softcap).to(case.x.dtype).double(), 1 - th * th
    cols = torch.arange(case.v0, case.v0 + x.shape[1])
    onehot = (cols[None, :] == case.targets.long()[:, None]).double()
    g = (torch.exp(z - case.lse.double()[:, None]) - onehot) * dz * case.coef.double()[:, None]
    active = (case.coef != 0)[:, None]
    return torch.where(active, g, 0.0), torch.where(active, torch.exp(z - case.lse.double()[:, None]), 0.0)


@budget(60)
@given(case=slice_cases())
def test_linear_ce_grad_cpu_matches_float64(case):
    """torch.ops.cggr.linear_ce_grad_ (CPU) in place over a vocabulary slice: (softmax - onehot(target - v0))
    * coef (* softcap's 1 - tanh^2), targets outside the slice matching no column, inactive rows (coef 0)
    exact zeros without reading them (inf / NaN there), nothing written outside the view.
    Catches: the onehot at the wrong column (v0 offset), softcap's derivative missing, inactive rows
    turned into NaN (0 * inf), writes into the padding of a row-strided view."""
    outside = storage_outside(case.x)
    want, p = ce_grad_float64(case)
    x = case.x
    torch.ops.cggr.linear_ce_grad_(x, case.lse, case.targets, case.coef, case.v0, case.softcap)
    torch.testing.assert_close(storage_outside(x), outside, rtol=0, atol=0, equal_nan=True)
    assert bool((x[case.coef == 0] == 0).all())
    c = case.coef.double().abs()[:, None]
    bound = c * (p * 8 * EPS32 * (1 + case.lse.double().abs())[:, None] + 4 * EPS32) + EPS[x.dtype] * want.abs() \
        + QUANTUM[x.dtype]
    assert_within(x, want, 2 * bound + 1e-12, "linear_ce_grad_")


@budget(40)
@given(case=slice_cases())
def test_softcap_cpu_matches_float64(case):
    """torch.ops.cggr.softcap_ (CPU) in place: c * tanh(x / c) within one rounding to the dtype (plus
    float32 tanh), the padding untouched. Catches: a cap applied twice or not at all, writes outside."""
    c = case.softcap or 2.0
    outside = storage_outside(case.x)
    want = c * torch.tanh(case.x.double() / c)
    x = case.x
    torch.ops.cggr.softcap_(x, c)
    torch.testing.assert_close(storage_outside(x), outside, rtol=0, atol=0, equal_nan=True)
    finite = torch.isfinite(want)
    assert_within(x[finite], want[finite], EPS[x.dtype] * want[finite].abs() + 8 * EPS32 * c, "softcap_")


@requires_interpreter
@budget(30)
@given(case=slice_cases())
def test_linear_ce_grad_and_softcap_triton_match_cpu(case):
    """The Triton softcap_ and linear_ce_grad_ kernels (interpreted) == the CPU ops (test_linear's
    tolerances: bf16/fp16 tanh may round to a neighbouring value), padding untouched, inactive rows 0.
    Catches: a kernel writing past its row (ragged last block), reading inactive rows, the v0 offset."""
    from cggr.triton_kernels import launch_linear_ce_grad_, launch_softcap_

    check_slice_ops_match_cpu(case, launch_softcap_, launch_linear_ce_grad_, "cpu")


def check_slice_ops_match_cpu(case, softcap_fn, ce_grad_fn, device):
    c = case.softcap or 2.0
    half = case.x.dtype != torch.float32
    a, b = to_device(lay_out(case.x, "row_strided", SLICE_PAD), device), lay_out(case.x, "row_strided", SLICE_PAD)
    outside = storage_outside(a)
    softcap_fn(a, c)
    torch.ops.cggr.softcap_(b, c)
    torch.testing.assert_close(storage_outside(a), outside, rtol=0, atol=0, equal_nan=True)
    # tanh through exp (the kernel) and torch's differ by a few float32 ulp of 1, times c; then one
    # rounding to the dtype, which may land on the neighbouring value
    finite = torch.isfinite(b)
    assert bool(torch.equal(torch.isnan(a.cpu()), torch.isnan(b)))
    assert_within(a.cpu()[finite], b[finite], 2 * EPS[b.dtype] * b[finite].double().abs() + 8 * EPS32 * c
                  + QUANTUM[b.dtype], "softcap_ kernel vs CPU")
    a, b = to_device(lay_out(case.x, "row_strided", SLICE_PAD), device), lay_out(case.x, "row_strided", SLICE_PAD)
    outside = storage_outside(a)
    ce_grad_fn(a, to_device(case.lse, device), to_device(case.targets.contiguous(), device),
               to_device(case.coef, device), case.v0, case.softcap)
    torch.ops.cggr.linear_ce_grad_(b, case.lse, case.targets, case.coef, case.v0, case.softcap)
    torch.testing.assert_close(storage_outside(a), outside, rtol=0, atol=0, equal_nan=True)
    a = a.cpu()
    assert bool((a[case.coef == 0] == 0).all())
    # the kernel's tanh may round a capped half-precision logit to the neighbouring value: one ulp of z
    # moves exp(z - lse) by that much relatively (test_linear's tolerances, made elementwise)
    want, p = ce_grad_float64(case)
    z_ulp = 2 * EPS[case.x.dtype] * (1 + case.x.double().abs().clamp(max=c)) if case.softcap and half else 0.0
    coef = case.coef.double().abs()[:, None]
    bound = coef * (p * (z_ulp + 16 * EPS32 * (1 + case.lse.double().abs())[:, None]) + 8 * EPS32) \
        + 2 * EPS[case.x.dtype] * b.double().abs() + 2 * QUANTUM[case.x.dtype]
    bound = torch.where(case.coef[:, None] == 0, 0.0, bound)  # inactive rows: exact zeros on both
    assert_within(a, b, bound, "linear_ce_grad_ kernel vs CPU")


# --------------------------------------------------------------------------------------------------
# CGGRLoss
# --------------------------------------------------------------------------------------------------
class LossCase(NamedTuple):
    logits: torch.Tensor
    targets: torch.Tensor
    kwargs: dict
    reference_nll: Optional[torch.Tensor]


@st.composite
def loss_cases(draw, nonfinite=False):
    three_d = draw(st.booleans())
    B = draw(st.integers(1, 5)) if three_d else 1
    T = draw(st.one_of(st.integers(1, 9), st.integers(1, 40)))
    V = draw(st.one_of(st.integers(1, 4), st.integers(1, 70)))
    dtype = draw(dtypes)
    g = generator(draw(seeds))
    x = torch.randn(B * T, V, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    x = x + draw(st.sampled_from([0.0, 10.0]))
    if draw(st.booleans()):
        x = x.round()  # ties
    ignore_index = draw(st.sampled_from([-100, -1]))
    targets = torch.randint(0, V, (B * T,), generator=g)
    pattern = draw(st.sampled_from(["none", "all", "random"]))
    if pattern == "all":
        targets[:] = ignore_index
    elif pattern == "random":
        targets[torch.rand(B * T, generator=g) < draw(st.sampled_from([0.2, 0.8]))] = ignore_index
    if nonfinite:
        for r, c, v in draw(st.lists(st.tuples(st.integers(0, B * T - 1), st.integers(0, V - 1),
                                               st.sampled_from(SPECIALS)), min_size=1, max_size=4)):
            x[r, c] = v
    x = x.to(dtype)
    selection = draw(st.sampled_from(["topk", "topk", "stratified"] + (["sequence_aware"] if three_d else [])))
    scoring = draw(st.sampled_from(["entropy", "margin", "loss"] if nonfinite else
                                   ["entropy", "margin", "loss", "combined", "excess_loss"]))
    kwargs = dict(scoring=scoring, selection=selection, min_tokens_ratio=draw(ratios), warmup_steps=0,
                  dynamic_threshold=False if nonfinite else draw(st.booleans()),
                  threshold_sensitivity=draw(st.sampled_from([0.5, 1.0])), ignore_index=ignore_index,
                  reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                  num_strata=draw(st.integers(1, 6)), min_tokens_per_sequence=draw(st.integers(0, 3)),
                  shift_labels=three_d and T > 1 and draw(st.booleans()), seed=draw(st.integers(0, 2**31)))
    targets = targets.to(draw(target_dtypes))
    layout = draw(st.sampled_from(["contiguous", "row_strided", "offset", "transposed_batch"]))
    if three_d:
        x, targets = x.reshape(B, T, V), targets.reshape(B, T)
        if layout == "transposed_batch":  # storage [T, B, V]
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
            targets = targets.t().contiguous().t()
    if layout in ("row_strided", "offset"):
        x = lay_out(x, layout)
    reference_nll = None
    if scoring == "excess_loss":
        aligned = targets[:, 1:] if kwargs["shift_labels"] else targets
        reference_nll = torch.rand(aligned.shape, generator=g) * 3
    note(f"logits {DTYPE_NAMES[dtype]} shape {tuple(x.shape)} strides {x.stride()} ({layout}); {kwargs}")
    return LossCase(x, targets, kwargs, reference_nll)


def aligned(case):
    """(logits [M, V], targets [M]) as CGGRLoss scores them (after the label shift), and the index map
    from those rows into the flattened logits."""
    x, t = case.logits, case.targets
    V = x.shape[-1]
    idx = torch.arange(math.prod(x.shape[:-1])).reshape(x.shape[:-1])
    if case.kwargs["shift_labels"]:
        x, t, idx = x[:, :-1], t[:, 1:], idx[:, :-1]
    return x.reshape(-1, V), t.reshape(-1), idx.reshape(-1)


def to_device(x, device):
    """x on `device` with the same strides (a non-contiguous view stays one)."""
    if not isinstance(x, torch.Tensor) or x.device.type == torch.device(device).type:
        return x
    # the whole storage moves (padding, broadcast dims and all), then the same view is taken of it
    return whole_storage(x).to(device).as_strided(x.shape, x.stride(), x.storage_offset())


def run_loss(case, device="cpu"):
    """CGGRLoss forward + backward on `device`; returns (crit, logits leaf, loss, upstream grad on the CPU)."""
    crit = CGGRLoss(**case.kwargs)
    logits = to_device(case.logits, device).detach()
    logits = (logits.clone() if logits.is_contiguous() else logits).requires_grad_(True)
    loss = crit(logits, to_device(case.targets, device), reference_nll=to_device(case.reference_nll, device))
    if case.kwargs["reduction"] == "none":
        upstream = torch.randn(loss.shape, generator=generator(7), dtype=torch.float64)
    else:
        upstream = torch.tensor(1.7, dtype=torch.float64)
    (loss.double() * upstream.to(loss.device)).sum().backward()
    return crit, logits, loss, upstream


def last_call(crit):
    """The criterion's record of its last call, on the CPU."""
    last = crit._last
    return dict(mask=last["mask"].cpu(), valid=last["valid"].cpu(), ratio=float(last["ratio"]),
                stats=type(last["stats"])(*(s.cpu() for s in last["stats"])))


def loss_coefficients(case, loss, upstream, sel):
    """d loss / d nll per aligned token (float64 [M]), for the reduction and upstream gradient."""
    M = sel.numel()
    n_sel = int(sel.sum())
    if case.kwargs["reduction"] == "mean":
        return torch.full((M,), float(upstream) / max(n_sel, 1), dtype=torch.float64)
    if case.kwargs["reduction"] == "sum":
        return torch.full((M,), float(upstream), dtype=torch.float64)
    return upstream.reshape(-1)


def check_grad_rows(case, crit, logits, rows_mask, coef):
    """grad_logits == float64 autograd (test_selective_ce_backward.reference) on the aligned tokens in
    rows_mask, within the float32-lse error bound."""
    x2, t2, idx = aligned(case)
    if not bool(rows_mask.any()):
        return
    flat = logits.grad.cpu().reshape(-1, x2.shape[-1])
    want = backward_reference(x2.contiguous(), t2.long(), rows_mask, 1.0, coef.float(), case.kwargs["ignore_index"])
    lse = last_call(crit)["stats"].lse.reshape(-1)
    kernel, rounding = grad_error_bound(x2.double(), lse, coef, logits.dtype)
    assert_within(flat[idx[rows_mask]], want[rows_mask], 2 * kernel[rows_mask] + rounding[rows_mask] + 1e-12,
                  "grad_logits")


def check_zero_elsewhere(case, crit, logits):
    """Exact zeros in the gradient of every token that is not selected (the label shift's dropped
    positions included); returns the selected-and-valid aligned mask."""
    x2, t2, idx = aligned(case)
    sel = last_call(crit)["mask"].reshape(-1) & (t2 != case.kwargs["ignore_index"])
    grad = logits.grad.cpu()
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    flat = grad.reshape(-1, x2.shape[-1])
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[idx[sel]] = False
    assert bool((flat[others] == 0).all()), "gradient on a token that is not selected"
    return sel


def check_loss_against_float64(case, crit, logits, loss, upstream):
    """loss == float64 cross entropy over the selected valid tokens and grad == float64 autograd on
    them, exact zeros elsewhere."""
    x2, t2, idx = aligned(case)
    sel = check_zero_elsewhere(case, crit, logits)
    loss = loss.detach().cpu()
    ce = torch.zeros(x2.shape[0], dtype=torch.float64)
    if bool(sel.any()):
        ce[sel] = F.cross_entropy(x2.double()[sel], t2[sel].long(), reduction="none")
    coef = loss_coefficients(case, loss, upstream, sel)
    if case.kwargs["reduction"] == "mean":
        want_loss = ce.sum() / max(int(sel.sum()), 1)
    elif case.kwargs["reduction"] == "sum":
        want_loss = ce.sum()
    else:
        want_loss = ce.reshape(loss.shape)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    check_grad_rows(case, crit, logits, sel, coef)


def check_selection(case, crit):
    """The mask is the documented selection of the op's own scores at the op's own ratio."""
    kw = case.kwargs
    last = last_call(crit)
    stats, valid, mask, r = last["stats"], last["valid"], last["mask"], last["ratio"]
    if kw["dynamic_threshold"]:
        assert kw["min_tokens_ratio"] - 1e-6 <= r <= 1.0, f"dynamic ratio {r} outside [r_min, 1]"
    scores = score(stats, kw["scoring"], valid, None, case.reference_nll)
    k = ref.quota(r, int(valid.sum()))
    if kw["selection"] == "topk":
        assert_same_mask(mask, ref.topk(scores, valid, r))
    elif kw["selection"] == "sequence_aware":
        assert_same_mask(mask, ref.sequence_aware(scores, valid, r, kw["min_tokens_per_sequence"]))
    else:
        assert int(mask.sum()) == k
    assert not bool((mask & ~valid).any())


@budget(100)
@given(case=loss_cases())
def test_cggr_loss_matches_float64(case):
    """CGGRLoss for random shapes ([N, V] / [B, T, V], label shift), layouts (row-strided, offset,
    transposed batch), dtypes, int32/int64 targets, ignore patterns, every scoring and selection,
    reductions, ratios and the dynamic threshold: statistics == float64 (2e-5); the mask == the
    reference selection of the scores at the ratio (quota, ties, invalid never selected; the dynamic
    ratio inside [r_min, 1]); the loss == float64 CE over the selected tokens; the gradient == float64
    autograd on them within the float32-lse bound, exact zeros on every other token and on the shifted-out
    position. Catches: scoring / selection plumbing, a wrong normaliser (count vs valid vs N), gradients on
    unselected tokens, a transposed batch flattened in storage order, the label shift misaligned."""
    check_cggr_loss(case, "cpu")


def check_cggr_loss(case, device):
    crit, logits, loss, upstream = run_loss(case, device)
    x2, t2, _ = aligned(case)
    got = torch.stack([s.reshape(-1) for s in last_call(crit)["stats"]])
    assert_stats_close(got, stats_reference(x2, t2, case.kwargs["ignore_index"]))
    check_selection(case, crit)
    check_loss_against_float64(case, crit, logits, loss, upstream)


@budget(60)
@given(case=loss_cases(nonfinite=True))
def test_cggr_loss_nonfinite_logits(case):
    """NaN / +inf / -inf logits with per-signal scoring (entropy, margin, loss), fixed ratio.
    Undocumented; what the code does: on the CPU a row with NaN or +inf (or -inf only) has NaN
    statistics, so its score is NaN and ranks below every finite score (the documented selection rule):
    it is selected only when the quota exceeds the tokens with finite scores, and then the loss and that
    row's gradient are NaN. A token whose target logit is -inf has nll +inf: with scoring='loss' it
    ranks *below* the finite ones too (the hardest token is chosen last). The loss is NaN exactly when a
    selected token's nll is NaN; selected rows holding NaN / +inf have NaN gradients; every other
    selected row matches float64 and every unselected row's gradient is exactly 0 (never read).
    Catches: NaN scores ranked as hardest, NaN leaking from unselected rows into the gradient, a NaN
    loss hidden by the reduction."""
    check_cggr_loss_nonfinite(case, "cpu")


def check_cggr_loss_nonfinite(case, device):
    crit, logits, loss, upstream = run_loss(case, device)
    check_selection(case, crit)
    sel = check_zero_elsewhere(case, crit, logits)
    x2, t2, idx = aligned(case)
    x64 = x2.double()
    nll = last_call(crit)["stats"].nll.reshape(-1)
    loss = loss.detach().cpu()
    # the loss is NaN exactly where a selected token's nll is NaN
    per_token_nan = torch.isnan(torch.where(sel, nll, 0.0))
    if case.kwargs["reduction"] == "none":
        assert torch.equal(torch.isnan(loss.reshape(-1)), per_token_nan)
    else:
        assert bool(torch.isnan(loss)) == bool(per_token_nan.any())
    # a selected row holding NaN / +inf, or only -inf, has NaN in its gradient
    flat = logits.grad.cpu().reshape(-1, x2.shape[-1])
    bad_row = (torch.isnan(x64) | (x64 == INF)).any(1) | (x64 == -INF).all(1)
    assert bool(torch.isnan(flat[idx[sel & bad_row]]).any(dim=1).all())
    if device == "cpu":  # the CPU statistics are NaN on such rows: the whole row is NaN
        assert bool(torch.isnan(nll[sel & bad_row]).all())
        assert bool(torch.isnan(flat[idx[sel & bad_row]]).all())
    # every other selected row: float64
    good = sel & ~bad_row
    check_grad_rows(case, crit, logits, good, loss_coefficients(case, loss, upstream, sel))
    if not bool((sel & (bad_row | torch.isinf(nll))).any()):
        check_loss_against_float64(case, crit, logits, loss, upstream)


@pytest.mark.parametrize("entry", ["logits", "linear"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_dynamic_threshold_keeps_r_min_with_a_nonfinite_logit(entry, value):
    """Minimised from test_cggr_loss_nonfinite_logits-style inputs: 8 tokens, r_min = 0.25 (k >= 2)."""
    crit = CGGRLoss(scoring="entropy", dynamic_threshold=True, warmup_steps=0, min_tokens_ratio=0.25)
    targets = torch.zeros(8, dtype=torch.long)
    if entry == "logits":
        logits = torch.zeros(8, 2)
        logits[3, 1] = value
        crit(logits, targets)
    else:
        hidden = torch.ones(8, 2)
        hidden[3, 1] = value
        crit.forward_linear(hidden, torch.eye(2), targets)
    assert crit.get_metrics()["tokens_selected"] >= 2


@pytest.mark.parametrize("value", [NAN, INF])
def test_combined_scoring_one_nonfinite_logit_collapses_selection(value):
    """Undocumented, pinned as observed: with scoring='combined' the z-scores use the batch mean and std,
    so ONE NaN/+inf logit makes every score NaN; every token then ranks as non-finite and the selection
    falls back to the k lowest valid indices, not the hardest tokens. The loss stays finite when the
    poisoned row is not among them (the NaN is hidden). Reported; if this changes, update the test."""
    logits = torch.zeros(8, 4)
    logits[:, 0] = torch.arange(8.0)  # later tokens are easier: the hardest are 0, 1, ...
    logits = logits.flip(0).contiguous()  # now the hardest are the last ones
    logits[5, 2] = value
    crit = CGGRLoss(scoring="combined", dynamic_threshold=False, warmup_steps=0, min_tokens_ratio=0.25)
    loss = crit(logits, torch.zeros(8, dtype=torch.long))
    assert crit._last["mask"].nonzero().reshape(-1).tolist() == [0, 1]
    assert bool(torch.isfinite(loss))


# --------------------------------------------------------------------------------------------------
# fused linear selective CE and token_stats_from_hidden
# --------------------------------------------------------------------------------------------------
class LinearCase(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    ignore_index: int
    kwargs: dict
    select: str


@st.composite
def linear_cases(draw):
    three_d = draw(st.booleans())
    B = draw(st.integers(1, 4)) if three_d else 1
    T = draw(st.one_of(st.integers(1, 7), st.integers(1, 40)))
    N = B * T
    H = draw(st.one_of(st.integers(1, 4), st.integers(1, 24)))
    V = draw(st.one_of(st.integers(1, 5), st.integers(1, 90)))
    dtype = draw(dtypes)
    g = generator(draw(seeds))
    logit_scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if draw(st.booleans()) else None
    ignore_index = draw(st.sampled_from([-100, -1, "inside"]))
    if ignore_index == "inside":
        ignore_index = draw(st.integers(0, V - 1))
    t = torch.randint(0, V, (N,), generator=g)
    pattern = draw(st.sampled_from(["none", "all", "random"]))
    if pattern == "all":
        t[:] = ignore_index
    elif pattern == "random":
        t[torch.rand(N, generator=g) < draw(st.sampled_from([0.2, 0.8]))] = ignore_index
    t = t.to(draw(target_dtypes))
    h, w = h.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    if three_d:
        h, t = h.reshape(B, T, H), t.reshape(B, T)
    h_layout = draw(st.sampled_from(["contiguous", "row_strided", "offset", "transposed_batch"]))
    if h_layout == "transposed_batch" and three_d:
        h = h.transpose(0, 1).contiguous().transpose(0, 1)
    elif h_layout in ("row_strided", "offset"):
        h = lay_out(h, h_layout)
    w_layout = draw(st.sampled_from(["contiguous", "transposed", "row_strided"]))
    w = lay_out(w, w_layout)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    kwargs = dict(reduction=reduction, chunk_size=draw(st.one_of(st.none(), st.integers(1, N + 2))),
                  softcap=draw(st.sampled_from([None, None, 0.7, 2.5, 30.0])))
    if draw(st.booleans()):
        kwargs["row_weight"] = torch.rand(t.shape, generator=g) + 0.25
    select = draw(st.sampled_from(["topk_nll", "topk_entropy", "random", "all", "nothing"]
                                  + (["sequence_aware"] if three_d else [])))
    if select.startswith("topk") or select == "sequence_aware":
        kwargs["_ratio"] = draw(ratios)
    if select == "random":
        kwargs["_mask_seed"] = draw(seeds)
    bound = draw(st.sampled_from(["none", "exact", "loose"]))
    kwargs["_bound"] = bound
    note(f"hidden {DTYPE_NAMES[dtype]} {tuple(h.shape)} strides {h.stride()} ({h_layout}); weight "
         f"{tuple(w.shape)} strides {w.stride()} ({w_layout}); bias {b is not None}; ignore_index {ignore_index}; "
         f"select {select}; {kwargs}")
    return LinearCase(h, w, b, t, ignore_index, kwargs, select)


def select_fn_of(case):
    kw = case.kwargs

    def select_fn(stats, valid):
        if case.select == "topk_nll":
            return ops.select_topk(stats.nll, valid, kw["_ratio"])
        if case.select == "topk_entropy":
            return ops.select_topk(stats.entropy, valid, kw["_ratio"])
        if case.select == "sequence_aware":
            return ops.select_sequence_aware(stats.nll, valid, kw["_ratio"], 1)
        if case.select == "all":
            return torch.ones_like(valid)
        if case.select == "nothing":
            return torch.zeros_like(valid)
        return (torch.rand(valid.shape, generator=generator(kw["_mask_seed"])) < 0.5).to(valid.device)

    return select_fn


def dense_logits64(case, softcap):
    """float64 logits of the (rounded) inputs, soft-capped like the op."""
    x = case.hidden.double().reshape(-1, case.hidden.shape[-1]) @ case.weight.double().T
    if case.bias is not None:
        x = x + case.bias.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


def logits_rounding(case):
    """Per-row bound on |logit(input dtype, fp32 accumulation) - logit(float64)|: one rounding of each
    product sum (and of the capped value) to the input dtype plus float32 accumulation."""
    h = case.hidden.double().reshape(-1, case.hidden.shape[-1]).abs()
    mag = h @ case.weight.double().abs().T
    if case.bias is not None:
        mag = mag + case.bias.double().abs()
    eps = EPS[case.hidden.dtype]
    return (2 * eps * (mag.amax(dim=1) + 1) + 4 * EPS32 * (case.hidden.shape[-1] + 2) * mag.amax(dim=1))


@budget(80)
@given(case=linear_cases())
def test_fused_linear_matches_float64(case):
    """fused_linear_selective_ce for random [N, H] / [B, T, H] hidden (transposed batch, strided rows,
    offset), weight layouts (contiguous, transposed storage, strided rows), bias, dtypes, int32/int64
    targets, ignore_index inside/outside [0, V), ignore patterns, chunk sizes from 1 to N + 2, softcap,
    row weights, reductions, selections (top-k, sequence-aware, random, all, nothing) and max_selected
    (None / exact / loose, no host sync): stats == float64 statistics of the dense logits within the
    input dtype's rounding of a logit; token_stats_from_hidden gives the same stats; loss, grad_hidden,
    grad_weight and grad_bias == the dense float64 reference (test_linear.reference) on the returned
    mask within an error bound derived from that rounding; grad_hidden exactly 0 on every row not
    selected. Catches: a chunk / vocabulary-slice boundary bug, compaction dropping or duplicating rows,
    the padding rows of a loose max_selected leaking, a wrong coefficient per reduction, softcap's
    derivative, the weight's strides ignored."""
    check_fused_linear(case, "cpu")


def check_fused_linear(case, device):
    kw = case.kwargs
    call_kw = {k: to_device(v, device) for k, v in kw.items() if not k.startswith("_")}
    leaf = to_device(case.hidden, device).detach()
    hidden = (leaf.clone() if leaf.is_contiguous() else leaf).requires_grad_(True)
    weight = to_device(case.weight, device).detach().requires_grad_(True)
    bias = None if case.bias is None else to_device(case.bias, device).detach().requires_grad_(True)
    t_dev = to_device(case.targets, device)
    valid_dev = t_dev != case.ignore_index
    select_fn = select_fn_of(case)
    max_selected, validate = None, True
    if kw["_bound"] != "none":
        pre = select_fn(token_stats_from_hidden(hidden, weight, t_dev, bias=bias, ignore_index=case.ignore_index,
                                                softcap=kw["softcap"]), valid_dev)
        max_selected = int((pre & valid_dev).sum()) + (0 if kw["_bound"] == "exact" else 3)
        validate = kw["_bound"] == "exact"
    loss, stats, mask = fused_linear_selective_ce(hidden, weight, t_dev, select_fn, bias=bias,
                                                  ignore_index=case.ignore_index, validate_targets=validate,
                                                  max_selected=max_selected, **call_kw)
    grad_out = torch.randn(loss.shape, generator=generator(3)) if kw["reduction"] == "none" else torch.tensor(1.3)
    loss.backward(grad_out.to(device))
    again = token_stats_from_hidden(hidden, weight, t_dev, bias=bias, ignore_index=case.ignore_index,
                                    chunk_size=kw["chunk_size"], softcap=kw["softcap"])
    stats = type(stats)(*(x.cpu() for x in stats))
    again = type(stats)(*(x.cpu() for x in again))
    loss, mask = loss.detach().cpu(), mask.cpu()
    grad_h, grad_w = hidden.grad.cpu(), weight.grad.cpu()
    grad_b = None if bias is None else bias.grad.cpu()
    t = case.targets
    valid = t != case.ignore_index

    # statistics: float64 of the dense logits, within the rounding of a logit to the input dtype
    x64 = dense_logits64(case, kw["softcap"])
    flat_t = t.reshape(-1)
    want = stats_reference(x64, flat_t, case.ignore_index)
    got = torch.stack([s.reshape(-1) for s in stats])
    delta = logits_rounding(case)
    V = x64.shape[1]
    tol = torch.stack([2 * delta, 2 * delta, delta * (2 + 2 * math.log(V + 1)), 2 * delta, 2 * delta])
    assert_within(got, want, tol + 2e-5 * (1 + want.abs()), "stats")
    for a, s in zip(again, stats):
        torch.testing.assert_close(a, s, rtol=1e-6, atol=1e-6)

    # loss and gradients: the dense float64 reference on the returned mask
    rloss, ref_gh, ref_gw, ref_gb = linear_reference(
        case.hidden, case.weight, case.bias, t, mask, ignore_index=case.ignore_index, reduction=kw["reduction"],
        softcap=kw["softcap"], row_weight=kw.get("row_weight"), grad_out=grad_out)
    sel = (mask & valid).reshape(-1)
    n_sel = int(sel.sum())
    row_w = (torch.ones(sel.shape, dtype=torch.float64) if kw.get("row_weight") is None
             else kw["row_weight"].double().reshape(-1))
    lse_err = 8 * EPS32 * (1 + want[0].abs())  # the float32 lse / nll of the rounded logits
    nll_err = (2 * delta + lse_err) * row_w.abs()
    if kw["reduction"] == "none":
        loss_tol = nll_err.reshape(loss.shape)
    else:
        loss_tol = nll_err[sel].sum() / (max(n_sel, 1) if kw["reduction"] == "mean" else 1)
    assert_within(loss, rloss, loss_tol + 2e-5 * (1 + rloss.abs()), "loss")

    gh = grad_h.reshape(-1, grad_h.shape[-1])
    assert gh.dtype == hidden.dtype and grad_w.dtype == weight.dtype
    assert bool((gh[~sel] == 0).all()), "grad_hidden on a row that is not selected"
    if not n_sel:
        assert bool((grad_w == 0).all()) and (grad_b is None or bool((grad_b == 0).all()))
        return
    if kw["reduction"] == "mean":
        coef = torch.full(sel.shape, float(grad_out) / n_sel, dtype=torch.float64)
    elif kw["reduction"] == "sum":
        coef = torch.full(sel.shape, float(grad_out), dtype=torch.float64)
    else:
        coef = grad_out.double().reshape(-1)
    coef = torch.where(sel, coef * row_w, 0.0).abs()[:, None]
    # per logit-gradient element g = (softmax - onehot) * coef: the logits' rounding (2 delta) and the
    # float32 lse move p relatively, float32 adds a few ulp, the stored g is rounded to the input dtype
    # (softcap's derivative 1 - tanh^2 <= 1 keeps every term a bound)
    p = torch.softmax(x64, -1)
    onehot = (torch.arange(V)[None, :] == flat_t.long()[:, None]).double()
    eps = EPS[case.hidden.dtype]
    dg = coef * (p * (2 * delta + lse_err)[:, None] + 4 * EPS32 + 2 * eps * (p + onehot))
    g_abs = coef * (p + onehot)
    h_abs = case.hidden.double().reshape(-1, case.hidden.shape[-1]).abs()
    w_abs = case.weight.double().abs()
    # matmuls of g with W (grad_hidden) and with h (grad_weight): the propagated error plus their own
    # rounding of the result to the input dtype
    ref_gh = ref_gh.reshape(-1, ref_gh.shape[-1])
    bound_h = dg @ w_abs + 2 * eps * (g_abs @ w_abs) + QUANTUM[case.hidden.dtype]
    assert_within(gh[sel], ref_gh[sel], 2 * bound_h[sel], "grad_hidden")
    bound_w = dg.T @ h_abs + 2 * eps * (g_abs.T @ h_abs) + QUANTUM[case.hidden.dtype]
    assert_within(grad_w, ref_gw, 2 * bound_w, "grad_weight")
    if grad_b is not None:
        bound_b = dg.sum(0) + 2 * eps * g_abs.sum(0) + QUANTUM[case.hidden.dtype]
        assert_within(grad_b, ref_gb, 2 * bound_b, "grad_bias")
