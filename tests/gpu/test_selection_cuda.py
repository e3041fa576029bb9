"""CUDA selection ops against the CPU ops (bit-identical masks) and the plain references.

Run on a GPU machine: python -m pytest tests/gpu/test_selection_cuda.py -q
Tests needing a lot of memory skip themselves when the GPU does not have it.
"""
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: selection_reference
import selection_reference as ref  # noqa: E402

from cggr import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Around the one-block / multi-block switch (16384) and the write kernel's 4096-element tiles.
SIZES = [1, 2, 3, 31, 1000, 4095, 4096, 4097, 16384, 16385, 100003, 1 << 20, 3_000_017]


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


def make_scores(n, dtype, seed, special=True, ties=True, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, generator=g, device=device)
    if ties and n > 4:
        s[torch.randint(0, n, (n // 4,), generator=g, device=device)] = \
            s[torch.randint(0, n, (n // 4,), generator=g, device=device)]
        s[torch.randint(0, n, (n // 8,), generator=g, device=device)] = 0.5
        s[torch.randint(0, n, (2,), generator=g, device=device)] = -0.0
    if special and n > 8:
        for value in (math.nan, math.inf, -math.inf):
            s[torch.randint(0, n, (max(1, n // 50),), generator=g, device=device)] = value
    return s.to(dtype)


def make_valid(n, seed, p=0.7, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.rand(n, generator=g, device=device) < p


def assert_same(cuda_mask, cpu_mask):
    assert cuda_mask.is_cuda and cuda_mask.dtype == torch.bool
    got, want = cuda_mask.cpu(), cpu_mask.cpu()
    if not torch.equal(got, want):
        diff = torch.nonzero(got != want).reshape(-1)[:10].tolist()
        raise AssertionError(f"CUDA and CPU masks differ at {int((got != want).sum())} positions, first {diff}")


# ----------------------------------------------------------------------------------------------------
# select_topk
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_valid", [False, True])
def test_topk_cuda_matches_cpu(dtype, n, with_valid):
    for ratio in (0.25, 0.01, 0.7, 1.0):
        seed = _seed(n, ratio, dtype, with_valid)
        scores = make_scores(n, dtype, seed)
        valid = make_valid(n, seed) if with_valid else None
        for r in (torch.tensor(ratio), torch.tensor(ratio, device="cuda")):
            got = ops.select_topk(scores, valid, r)
            want = ops.select_topk(scores.cpu(), None if valid is None else valid.cpu(), torch.tensor(ratio))
            assert_same(got, want)
        n_valid = n if valid is None else int(valid.sum())
        assert int(got.sum()) == ref.quota(ratio, n_valid)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_cuda_many_ties(dtype):
    # Heavy ties at the threshold exercise the ordered (look-back) path of the write kernel.
    n = 2_000_003
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randint(0, 7, (n,), generator=g, device="cuda").to(dtype)
    valid = make_valid(n, 5)
    for ratio in (0.1, 0.33, 0.9):
        assert_same(ops.select_topk(scores, valid, ratio),
                    ops.select_topk(scores.cpu(), valid.cpu(), ratio))
    constant = torch.zeros(n, device="cuda", dtype=dtype)
    got = ops.select_topk(constant, None, 0.25)
    assert int(got.sum()) == ref.quota(0.25, n)
    assert bool(got[: ref.quota(0.25, n)].all())  # ties: the lowest indices


def test_topk_cuda_reference_semantics():
    s = torch.tensor([math.nan, math.inf, -1e30, -math.inf, 5.0, math.nan], device="cuda")
    assert ops.select_topk(s, ratio=2 / 6).tolist() == [False, False, True, False, True, False]
    assert ops.select_topk(s, ratio=4 / 6).tolist() == [True, True, True, False, True, False]
    big = make_scores(50_000, torch.float32, 1)
    torch.testing.assert_close(ops.select_topk(big, None, 0.3).cpu(), ref.topk(big.cpu(), None, 0.3), rtol=0, atol=0)


def test_topk_cuda_ratio_clamped_on_device():
    for n in (1000, 100_000):  # the one-block and the multi-block paths
        s = torch.randn(n, device="cuda")
        for value, expected in ((2.0, n), (-1.0, 1), (math.nan, 1), (0.5, n // 2)):
            assert int(ops.select_topk(s, ratio=torch.tensor(value, device="cuda")).sum()) == expected


def test_topk_cuda_empty_all_invalid_non_contiguous():
    assert ops.select_topk(torch.empty(0, device="cuda"), ratio=0.5).shape == (0,)
    for n in (100, 100_000):
        s = torch.randn(n, device="cuda")
        assert not ops.select_topk(s, torch.zeros(n, dtype=torch.bool, device="cuda"), 0.5).any()
    base = make_scores(400_000, torch.bfloat16, 9)
    grid = base.reshape(400, 1000).t()
    valid = make_valid(400_000, 9).reshape(400, 1000).t()
    assert_same(ops.select_topk(grid, valid, 0.2), ops.select_topk(grid.cpu(), valid.cpu(), 0.2))


@pytest.mark.parametrize("n", [30_000_000, 70_000_001])
def test_topk_cuda_large(n):
    scores = make_scores(n, torch.float32, 2, ties=False)
    valid = make_valid(n, 2, p=0.9)
    got = ops.select_topk(scores, valid, 0.25)
    want = ops.select_topk(scores.cpu(), valid.cpu(), 0.25)
    assert_same(got, want)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


def test_topk_cuda_beyond_int32_elements():
    # 2^31 + 5 elements: indices past 2^31 must be computed in 64 bits. bf16 + mask ~= 6.5 GB.
    n = 2**31 + 5
    if _free_bytes() < 12 * 2**30:
        pytest.skip("needs ~12 GB of free GPU memory")
    scores = torch.full((n,), -1.0, dtype=torch.bfloat16, device="cuda")
    hot = torch.tensor([7, 2**31 - 1, 2**31, 2**31 + 4], device="cuda")
    scores[hot] = torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.bfloat16, device="cuda")
    ratio = torch.tensor(4 / n, dtype=torch.float32)
    k = ref.quota(float(ratio), n)  # 4, or 5 if float32 rounding of 4 / n pushes it over
    mask = ops.select_topk(scores, None, ratio)
    assert int(mask.sum()) == k
    assert bool(mask[hot].all())
    indices, count = ops.compact_indices(mask, 8)
    assert int(count) == k
    assert indices[:k].tolist() == sorted(set(hot.tolist()) | set(range(k - 4)))  # extra ties: lowest indices
    del mask
    # ties past 2^31: all equal, the lowest indices win
    scores.fill_(1.0)
    mask = ops.select_topk(scores, None, torch.tensor(0.75))
    kk = ref.quota(0.75, n)
    assert int(mask.sum()) == kk and bool(mask[kk - 1]) and not bool(mask[kk])


# ----------------------------------------------------------------------------------------------------
# select_sequence_aware
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 129), (4, 4096), (16, 2048), (2, 40_000), (64, 8192)])
@pytest.mark.parametrize("min_tokens", [0, 1, 16])
def test_sequence_aware_cuda_matches_cpu(dtype, shape, min_tokens):
    n = shape[0] * shape[1]
    seed = _seed(shape, min_tokens, dtype)
    scores = make_scores(n, dtype, seed).reshape(shape)
    valid = make_valid(n, seed).reshape(shape)
    valid[0] = False
    for ratio in (0.02, 0.4):
        assert_same(ops.select_sequence_aware(scores, valid, torch.tensor(ratio, device="cuda"), min_tokens),
                    ops.select_sequence_aware(scores.cpu(), valid.cpu(), ratio, min_tokens))


# ----------------------------------------------------------------------------------------------------
# select_stratified (bit-identical to the CPU op for the same seed)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 1000, 16385, 100003, 2_000_000])
@pytest.mark.parametrize("num_strata", [1, 4, 7, 1024])
def test_stratified_cuda_matches_cpu(dtype, n, num_strata):
    seed = _seed(n, num_strata, dtype)
    scores = make_scores(n, dtype, seed)
    valid = make_valid(n, seed)
    for ratio, draw in [(0.25, 12345), (0.9, -7)]:
        got = ops.select_stratified(scores, valid, torch.tensor(ratio, device="cuda"), num_strata, seed=draw)
        want = ops.select_stratified(scores.cpu(), valid.cpu(), ratio, num_strata, seed=draw)
        assert_same(got, want)


# ----------------------------------------------------------------------------------------------------
# compact_indices
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 4095, 4097, 100003, 10_000_019])
def test_compact_cuda(n):
    mask = make_valid(n, n, p=0.3) if n else torch.zeros(0, dtype=torch.bool, device="cuda")
    true = torch.nonzero(mask).reshape(-1)
    for capacity in sorted({0, 1, len(true) // 2, len(true), len(true) + 5}):
        indices, count = ops.compact_indices(mask, capacity)
        assert indices.is_cuda and count.is_cuda and count.shape == ()
        c = min(len(true), capacity)
        assert int(count) == c
        assert torch.equal(indices[:c], true[:c])
        assert bool((indices[c:] == -1).all())


# ----------------------------------------------------------------------------------------------------
# no host synchronisation, registration, streams
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1000, 1 << 20])
def test_no_host_sync(n):
    scores = torch.randn(n, device="cuda")
    valid = torch.rand(n, device="cuda") < 0.9
    ratio = torch.tensor(0.25, device="cuda")
    rows = scores.reshape(-1, 1000 if n == 1000 else 1024)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = torch.ops.cggr.select_topk(scores, valid, ratio)
        torch.ops.cggr.select_sequence_aware(rows, valid.reshape(rows.shape), ratio, 2)
        torch.ops.cggr.select_stratified(scores, valid, ratio, 4, 17)
        torch.ops.cggr.compact_indices(mask, n // 2)
        torch.ops.cggr.select_topk(scores, valid, torch.tensor(0.25))  # CPU ratio: read on the host, no sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_opcheck_cuda():
    s = make_scores(3000, torch.float32, 0).reshape(30, 100)
    v = make_valid(3000, 0).reshape(30, 100)
    r = torch.tensor(0.3, device="cuda")
    torch.library.opcheck(torch.ops.cggr.select_topk, (s, v, r))
    torch.library.opcheck(torch.ops.cggr.select_topk, (s.reshape(-1).repeat(10).bfloat16(), None, r))
    torch.library.opcheck(torch.ops.cggr.select_stratified, (s, v, r, 4, 123))
    torch.library.opcheck(torch.ops.cggr.select_sequence_aware, (s, v, r, 2))
    torch.library.opcheck(torch.ops.cggr.compact_indices, (v, 500))


def test_device_mismatch_errors():
    s = torch.randn(10, device="cuda")
    with pytest.raises(RuntimeError, match="valid must be on scores' device"):
        torch.ops.cggr.select_topk(s, torch.ones(10, dtype=torch.bool), torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="ratio must be on the CPU or on scores' device"):
        torch.ops.cggr.select_topk(s.cpu(), None, torch.tensor(0.5, device="cuda"))


def test_side_stream_and_graph_capture():
    scores = torch.randn(1 << 20, device="cuda")
    ratio = torch.tensor(0.25, device="cuda")
    expected = ops.select_topk(scores, None, ratio)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_side = ops.select_topk(scores, None, ratio)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(on_side, expected)
    # No host sync and no host-dependent sizes: the op can be captured in a CUDA graph.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        ops.select_topk(scores, None, ratio)  # warm up the allocator on the capture stream
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.cggr.select_topk(scores, None, ratio)
    ratio.fill_(0.5)
    scores.copy_(torch.randn_like(scores))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.select_topk(scores, None, ratio))
