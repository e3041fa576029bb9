"""CPU tests of the selection ops against plain PyTorch references (selection_reference.py)."""
import math
import zlib

import pytest
import torch

import selection_reference as ref
from cggr import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 2, 3, 1000, 100003]


def _seed(*parts):
    """A seed that is the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def make_scores(n, dtype, seed, special=True, ties=True):
    """Random scores with ties, NaN and +-inf sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g)
    if ties and n > 4:
        s[torch.randint(0, n, (n // 4,), generator=g)] = s[torch.randint(0, n, (n // 4,), generator=g)]
        s[torch.randint(0, n, (n // 8,), generator=g)] = 0.5
        s[torch.randint(0, n, (2,), generator=g)] = -0.0
    if special and n > 8:
        for value in (math.nan, math.inf, -math.inf):
            s[torch.randint(0, n, (max(1, n // 50),), generator=g)] = value
    return s.to(dtype)


def make_valid(n, seed, p=0.7):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(n, generator=g) < p


# ----------------------------------------------------------------------------------------------------
# select_topk
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_valid", [False, True])
def test_topk_matches_reference(dtype, n, with_valid):
    for trial, ratio in enumerate([0.25, 0.1, 0.5, 0.999, 1.0]):
        seed = _seed(n, trial, dtype, with_valid)
        scores = make_scores(n, dtype, seed)
        valid = make_valid(n, seed) if with_valid else None
        got = ops.select_topk(scores, valid, ratio)
        assert got.dtype == torch.bool and got.shape == scores.shape
        torch.testing.assert_close(got, ref.topk(scores, valid, ratio), rtol=0, atol=0)
        n_valid = n if valid is None else int(valid.sum())
        assert int(got.sum()) == ref.quota(ratio, n_valid)
        if valid is not None:
            assert not bool((got & ~valid).any())


def test_topk_quota_is_exact_for_decimal_ratios():
    # float32(0.1) * 10 is slightly above 1; the quota still reads as ceil(0.1 * 10) = 1.
    for ratio in (0.1, 0.2, 0.3, 0.7, 0.01, 0.25, 1 / 3):
        for n in (10, 100, 1000, 12345):
            got = int(ops.select_topk(torch.randn(n), ratio=ratio).sum())
            assert got == max(1, math.ceil(round(ratio * n, 9))), (ratio, n)


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])
    got = ops.select_topk(scores, ratio=0.5)  # k = 3 of four 3.0s
    assert got.tolist() == [False, True, True, False, True, False]
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0])  # -0.0 == 0.0: a tie
    assert ops.select_topk(zeros, ratio=0.5).tolist() == [True, True, False, False]


def test_topk_non_finite_rank_below_finite():
    scores = torch.tensor([math.nan, math.inf, -1e30, -math.inf, 5.0, math.nan])
    assert ops.select_topk(scores, ratio=2 / 6).tolist() == [False, False, True, False, True, False]
    # quota beyond the finite tokens: the non-finite ones, lowest index first
    assert ops.select_topk(scores, ratio=4 / 6).tolist() == [True, True, True, False, True, False]
    assert ops.select_topk(scores, ratio=1.0).all()


def test_topk_invalid_never_selected_and_k_capped():
    scores = torch.arange(10.0)
    valid = torch.zeros(10, dtype=torch.bool)
    valid[[1, 3]] = True
    assert ops.select_topk(scores, valid, 1.0).nonzero().reshape(-1).tolist() == [1, 3]
    assert ops.select_topk(scores, valid, 0.01).nonzero().reshape(-1).tolist() == [3]  # at least 1
    assert not ops.select_topk(scores, torch.zeros(10, dtype=torch.bool), 1.0).any()


def test_topk_empty_and_all_invalid():
    for shape in [(0,), (0, 7), (3, 0)]:
        got = ops.select_topk(torch.empty(shape), ratio=0.5)
        assert got.shape == shape and got.dtype == torch.bool
    scores = torch.randn(2, 5)
    assert not ops.select_topk(scores, torch.zeros(2, 5, dtype=torch.bool), 0.5).any()


def test_topk_ratio_tensor_is_clamped():
    scores = torch.randn(20)
    assert int(ops.select_topk(scores, ratio=torch.tensor(2.0)).sum()) == 20
    assert int(ops.select_topk(scores, ratio=torch.tensor(-1.0)).sum()) == 1
    assert int(ops.select_topk(scores, ratio=torch.tensor(math.nan)).sum()) == 1
    assert int(ops.select_topk(scores, ratio=torch.tensor(0.25)).sum()) == 5


def test_topk_non_contiguous_inputs():
    base = make_scores(4000, torch.float32, 3)
    valid_base = make_valid(4000, 3)
    scores, valid = base[::2], valid_base[1::2]
    assert not scores.is_contiguous()
    torch.testing.assert_close(ops.select_topk(scores, valid, 0.3), ref.topk(scores.contiguous(), valid, 0.3),
                               rtol=0, atol=0)
    grid = base.reshape(40, 100).t()  # transposed 2-D
    torch.testing.assert_close(ops.select_topk(grid, None, 0.3), ref.topk(grid.contiguous(), None, 0.3),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# select_sequence_aware
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 129), (5, 2000)])
@pytest.mark.parametrize("min_tokens", [0, 1, 4])
def test_sequence_aware_matches_reference(dtype, shape, min_tokens):
    n = shape[0] * shape[1]
    seed = _seed(shape, min_tokens, dtype)
    scores = make_scores(n, dtype, seed).reshape(shape)
    valid = make_valid(n, seed).reshape(shape)
    valid[0] = False  # an all-invalid row
    for ratio in (0.05, 0.5):
        got = ops.select_sequence_aware(scores, valid, ratio, min_tokens)
        torch.testing.assert_close(got, ref.sequence_aware(scores, valid, ratio, min_tokens), rtol=0, atol=0)
        per_row = (got & valid).sum(1)
        assert bool((per_row >= valid.sum(1).clamp(max=min_tokens)).all())
        assert not bool((got & ~valid).any())


def test_sequence_aware_gives_every_row_its_minimum():
    scores = torch.zeros(4, 50)
    scores[0] = 10 + torch.rand(50)  # row 0 holds every globally hard token
    got = ops.select_sequence_aware(scores, None, 0.1, 3)
    assert got.sum(1).tolist() == [20, 3, 3, 3]
    assert got[1, :3].all()  # ties: lowest indices


# ----------------------------------------------------------------------------------------------------
# select_stratified
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_strata", [1, 4, 7])
def test_stratified_matches_reference(dtype, n, num_strata):
    seed = _seed(n, num_strata, dtype)
    scores = make_scores(n, dtype, seed)
    valid = make_valid(n, seed)
    for ratio, draw in [(0.25, 12345), (0.8, -7), (1.0, 2**63 - 1)]:
        got = ops.select_stratified(scores, valid, ratio, num_strata, seed=draw)
        if n <= 1000:  # the Python reference is slow
            torch.testing.assert_close(got, ref.stratified(scores, valid, ratio, num_strata, draw), rtol=0, atol=0)
        _check_stratified_properties(got, scores, valid, ratio, num_strata)


def _check_stratified_properties(mask, scores, valid, ratio, num_strata):
    ranked = ref.ranked_valid(scores, valid)
    n = ranked.numel()
    k = ref.quota(ratio, n)
    assert int(mask.sum()) == k
    assert not bool((mask & ~valid).any())
    chosen = mask.reshape(-1)[ranked]
    counts = [int(chosen[ref.stratum_start(s, n, num_strata):ref.stratum_start(s + 1, n, num_strata)].sum())
              for s in range(num_strata)]
    assert counts == ref.stratum_quotas(n, k, num_strata)
    nonempty = sum(ref.stratum_start(s + 1, n, num_strata) > ref.stratum_start(s, n, num_strata)
                   for s in range(num_strata))
    if k >= nonempty:
        assert sum(c >= 1 for c in counts) == nonempty


def test_stratified_quota_rule():
    # 400 tokens in 4 strata of 100, k = 100: 1 each, the other 96 by weights 4:3:2:1 (38.4, 28.8, 19.2, 9.6)
    assert ref.stratum_quotas(400, 100, 4) == [39, 30, 20, 11]
    # k above what proportional shares allow: the hardest strata fill up, the rest is re-shared
    assert ref.stratum_quotas(400, 350, 4) == [100, 100, 99, 51]
    assert ref.stratum_quotas(3, 2, 8) == [1, 0, 1, 0, 0, 0, 0, 0]  # fewer tokens than strata
    scores = torch.randn(400)
    got = ops.select_stratified(scores, None, 0.25, 4, seed=1)
    chosen = got[ref.ranked_valid(scores)]
    assert [int(c.sum()) for c in chosen.split(100)] == [39, 30, 20, 11]


def test_stratified_reproducible_and_seed_dependent():
    scores = torch.randn(5000)
    a = ops.select_stratified(scores, ratio=0.3, seed=42)
    assert torch.equal(a, ops.select_stratified(scores, ratio=0.3, seed=42))
    assert not torch.equal(a, ops.select_stratified(scores, ratio=0.3, seed=43))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b = ops.select_stratified(scores, ratio=0.3, generator=g1)
    assert torch.equal(b, ops.select_stratified(scores, ratio=0.3, generator=g2))
    assert not torch.equal(b, ops.select_stratified(scores, ratio=0.3, generator=g1))  # the generator advanced
    torch.manual_seed(3)
    c = ops.select_stratified(scores, ratio=0.3)
    torch.manual_seed(3)
    assert torch.equal(c, ops.select_stratified(scores, ratio=0.3))


def test_stratified_is_uniform_inside_a_stratum():
    scores = torch.arange(100.0)  # one stratum: a uniform sample of 10 out of 100
    hits = torch.zeros(100)
    for seed in range(2000):
        hits += ops.select_stratified(scores, None, 0.1, 1, seed=seed).float()
    assert hits.sum() == 20000
    assert float(hits.min()) > 200 * 0.6 and float(hits.max()) < 200 * 1.4  # each token about 200 times


def test_stratified_edge_cases():
    assert not ops.select_stratified(torch.empty(0), ratio=0.5, seed=0).any()
    assert not ops.select_stratified(torch.randn(9), torch.zeros(9, dtype=torch.bool), 0.5, seed=0).any()
    assert int(ops.select_stratified(torch.randn(3), ratio=1.0, num_strata=8, seed=0).sum()) == 3


# ----------------------------------------------------------------------------------------------------
# compact_indices
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 1000, 100003])
def test_compact_indices(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    true = torch.nonzero(mask).reshape(-1)
    for capacity in {0, 1, len(true) // 2, len(true), len(true) + 5}:
        indices, count = ops.compact_indices(mask, capacity)
        assert indices.shape == (capacity,) and indices.dtype == torch.int64
        assert count.shape == () and count.dtype == torch.int64
        c = min(len(true), capacity)
        assert int(count) == c
        assert indices[:c].tolist() == true[:c].tolist()
        assert bool((indices[c:] == -1).all())


def test_compact_indices_flattens_any_layout():
    mask = (torch.rand(30, 40) < 0.5).t()
    indices, count = ops.compact_indices(mask, 1200)
    assert indices[: int(count)].tolist() == torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def test_bad_arguments():
    s = torch.randn(6)
    r = torch.tensor(0.5)
    with pytest.raises(RuntimeError, match=r"select_topk: scores must be float32, bfloat16 or float16, got Long"):
        torch.ops.cggr.select_topk(torch.arange(6), None, r)
    with pytest.raises(RuntimeError, match=r"valid must be a bool tensor, got dtype Float"):
        torch.ops.cggr.select_topk(s, torch.ones(6), r)
    with pytest.raises(RuntimeError, match=r"valid must have scores' shape \[6\], got \[2, 3\]"):
        torch.ops.cggr.select_topk(s, torch.ones(2, 3, dtype=torch.bool), r)
    with pytest.raises(RuntimeError, match=r"ratio must be a 0-dim float32 tensor, got shape \[1\]"):
        torch.ops.cggr.select_topk(s, None, torch.tensor([0.5]))
    with pytest.raises(RuntimeError, match=r"ratio must be a 0-dim float32 tensor, got dtype Double"):
        torch.ops.cggr.select_topk(s, None, torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"num_strata must be in \[1, 1024\], got 0"):
        torch.ops.cggr.select_stratified(s, None, r, 0, 0)
    with pytest.raises(RuntimeError, match=r"num_strata must be in \[1, 1024\], got 5000"):
        torch.ops.cggr.select_stratified(s, None, r, 5000, 0)
    with pytest.raises(RuntimeError, match=r"scores must be 2-D \[batch, seq\], got shape \[6\]"):
        torch.ops.cggr.select_sequence_aware(s, None, r, 1)
    with pytest.raises(RuntimeError, match=r"min_tokens_per_sequence must be >= 0, got -1"):
        torch.ops.cggr.select_sequence_aware(s.reshape(2, 3), None, r, -1)
    with pytest.raises(RuntimeError, match=r"capacity must be >= 0, got -1"):
        torch.ops.cggr.compact_indices(s > 0, -1)
    with pytest.raises(RuntimeError, match=r"compact_indices: mask must be a bool tensor, got dtype Float"):
        torch.ops.cggr.compact_indices(s, 3)


def test_bad_wrapper_arguments():
    s = torch.randn(6)
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            ops.select_topk(s, ratio=bad)
    with pytest.raises(TypeError, match="ratio must be a float"):
        ops.select_topk(s, ratio="0.5")
    with pytest.raises(ValueError, match="num_strata must be >= 1, got 0"):
        ops.select_stratified(s, num_strata=0)
    with pytest.raises(ValueError, match="either seed or generator"):
        ops.select_stratified(s, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="min_tokens_per_sequence must be >= 0"):
        ops.select_sequence_aware(s.reshape(2, 3), min_tokens_per_sequence=-2)
    with pytest.raises(TypeError, match="capacity must be an int"):
        ops.compact_indices(s > 0, 2.5)


def test_large_seed_keeps_its_bit_pattern():
    s = torch.randn(100)
    assert torch.equal(ops.select_stratified(s, seed=2**64 - 1), ops.select_stratified(s, seed=-1))


# ----------------------------------------------------------------------------------------------------
# torch.library registration (schema, fake kernels, dispatch)
# ----------------------------------------------------------------------------------------------------
def test_opcheck():
    s = make_scores(300, torch.float32, 0).reshape(10, 30)
    v = make_valid(300, 0).reshape(10, 30)
    r = torch.tensor(0.3)
    torch.library.opcheck(torch.ops.cggr.select_topk, (s, v, r))
    torch.library.opcheck(torch.ops.cggr.select_topk, (s.bfloat16(), None, r))
    torch.library.opcheck(torch.ops.cggr.select_stratified, (s, v, r, 4, 123))
    torch.library.opcheck(torch.ops.cggr.select_sequence_aware, (s, v, r, 2))
    torch.library.opcheck(torch.ops.cggr.compact_indices, (v, 50))


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def select(scores, valid, ratio):
        mask = torch.ops.cggr.select_topk(scores, valid, ratio)
        return torch.ops.cggr.compact_indices(mask, scores.numel())

    s, v = torch.randn(64), torch.rand(64) < 0.8
    indices, count = select(s, v, torch.tensor(0.25))
    expected = torch.nonzero(ref.topk(s, v, 0.25)).reshape(-1)
    assert int(count) == len(expected) and indices[: int(count)].tolist() == expected.tolist()
