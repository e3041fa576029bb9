"""cggr.linear on CPU: fused linear selective CE and token_stats_from_hidden against float64 dense references.

The ops take float16/bfloat16/float32 only, so torch.autograd.gradcheck (float64) does not apply; every
gradient is compared with a float64 autograd reference built from the same (rounded) inputs and the
same selection mask instead.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cggr import ops
from cggr import linear as L
from cggr.linear import default_chunk_size, fused_linear_selective_ce, token_stats_from_hidden

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(N=48, H=24, V=70, dtype=torch.float32, bias=False, seed=0, n_ignored=5, shape=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H) * 2.0  # logits ~ N(0, 4): a non-degenerate softmax
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        t[torch.randperm(N, generator=g)[:n_ignored]] = -100
    h = h.to(dtype)
    if shape is not None:
        h, t = h.view(*shape, H), t.view(*shape)
    return h, w.to(dtype), b, t


def topk(ratio):
    return lambda stats, valid: ops.select_topk(stats.nll, valid, ratio)


def reference(h, w, b, t, mask, *, ignore_index=-100, reduction="mean", softcap=None, row_weight=None,
              grad_out=None):
    """float64 dense loss and gradients (hidden, weight, bias) for a fixed selection mask."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    logits = h64 @ w64.T
    if b64 is not None:
        logits = logits + b64
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = t != ignore_index
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, torch.where(valid, t, 0).long()[..., None])[..., 0]
    sel = mask & valid
    per = torch.where(sel, nll, torch.zeros_like(nll))
    if row_weight is not None:
        per = per * row_weight.double()
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / sel.sum().clamp_min(1)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def leaves(h, w, b):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    return h, w, b


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def run(h, w, b, t, select_fn, grad_out=None, **kw):
    h, w, b = leaves(h, w, b)
    loss, stats, mask = fused_linear_selective_ce(h, w, t, select_fn, bias=b, **kw)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), stats, mask, h.grad, w.grad, None if b is None else b.grad


def check_against_reference(h, w, b, t, select_fn, dtype, grad_out=None, **kw):
    loss, stats, mask, gh, gw, gb = run(h, w, b, t, select_fn, grad_out=grad_out, **kw)
    ref_kw = {k: kw[k] for k in ("ignore_index", "reduction", "softcap", "row_weight") if k in kw}
    rloss, rh, rw, rb = reference(h, w, b, t, mask, grad_out=grad_out, **ref_kw)
    tol = TOL[dtype]
    sel = mask & (t != kw.get("ignore_index", -100))
    assert sel.any()
    assert rel(loss, rloss) < tol
    assert rel(gh[sel], rh[sel]) < tol
    assert rel(gw, rw) < tol
    if b is not None:
        assert rel(gb, rb) < tol
    # rows that are not selected: exact zeros
    assert torch.equal(gh[~sel], torch.zeros_like(gh[~sel]))
    return loss, stats, mask, gh, gw, gb


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_token_stats_from_hidden_matches_token_stats_of_full_logits(dtype, softcap):
    h, w, b, t = make(dtype=dtype, bias=True)
    logits = torch.addmm(b, h, w.t())
    if softcap is not None:
        logits = (torch.tanh(logits.float() / softcap) * softcap).to(dtype)
    ref = ops.token_stats(logits, t)
    for chunk in (None, 1, 5, 16, 1000):
        got = token_stats_from_hidden(h, w, t, bias=b, chunk_size=chunk, softcap=softcap)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        assert got.nll.shape == t.shape and got.nll.dtype == torch.float32


def test_token_stats_from_hidden_3d_and_no_grad():
    h, w, _, t = make(shape=(4, 12))
    h.requires_grad_()
    stats = token_stats_from_hidden(h, w.requires_grad_(), t)
    assert stats.lse.shape == (4, 12) and not stats.lse.requires_grad
    flat = token_stats_from_hidden(h.reshape(48, -1), w, t.reshape(-1))
    torch.testing.assert_close(stats.entropy.reshape(-1), flat.entropy)


def test_token_stats_from_hidden_validates_targets():
    h, w, _, t = make()
    t[7] = 70
    with pytest.raises(ValueError, match=r"targets\[7\] = 70 is outside \[0, 70\)"):
        token_stats_from_hidden(h, w, t)
    stats = token_stats_from_hidden(h, w, t, validate_targets=False)
    assert torch.isnan(stats.nll[7])


def test_default_chunk_size():
    # ~ the hidden states' size, at least 16 MiB, multiple of 64, at most N
    assert default_chunk_size(8192, 4096, 128256, torch.bfloat16) == 256
    assert default_chunk_size(16384, 576, 49152, torch.bfloat16) == 192  # 18.9 MB / 96 KiB rows, rounded
    assert default_chunk_size(1024, 576, 49152, torch.bfloat16) == 128  # the 16 MiB floor
    assert default_chunk_size(10, 8, 100, torch.float32) == 10


# ------------------------------------------------------------------------------------------------
# fused loss vs dense float64 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_float64_reference(dtype, bias):
    h, w, b, t = make(dtype=dtype, bias=bias)
    check_against_reference(h, w, b, t, topk(0.25), dtype, chunk_size=7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    h, w, b, t = make(bias=True)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(t.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    loss, _, mask, *_ = check_against_reference(h, w, b, t, topk(0.3), torch.float32, grad_out=grad_out,
                                                 reduction=reduction, chunk_size=16)
    sel = mask & (t != -100)
    if reduction == "none":
        assert loss.shape == t.shape
        assert torch.equal(loss[~sel], torch.zeros_like(loss[~sel]))
    else:
        assert loss.dim() == 0


def test_selection_is_what_select_fn_returns():
    h, w, _, t = make()
    seen = {}

    def select_fn(stats, valid):
        seen["stats"], seen["valid"] = stats, valid
        return ops.select_topk(stats.entropy, valid, 0.5)

    loss, stats, mask, *_ = run(h, w, None, t, select_fn)
    assert seen["stats"] is not None and torch.equal(seen["valid"], t != -100)
    assert torch.equal(mask, ops.select_topk(stats.entropy, t != -100, 0.5))
    sel = mask & (t != -100)
    torch.testing.assert_close(loss, stats.nll[sel].mean())
    ref = token_stats_from_hidden(h, w, t)
    for a, r in zip(stats, ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, None])
def test_chunking_invariance(chunk_size):
    h, w, b, t = make(bias=True, N=40, V=130)
    base = run(h, w, b, t, topk(0.4), chunk_size=1000)
    got = run(h, w, b, t, topk(0.4), chunk_size=chunk_size)
    assert torch.equal(got[2], base[2])  # same selection
    for a, r in zip(got[1], base[1]):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    for a, r in zip((got[0],) + got[3:], (base[0],) + base[3:]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_one_chunk_of_logits_alive(monkeypatch):
    """Every logits buffer (forward chunk, backward slice) holds at most chunk_size * V elements."""
    sizes = []
    real = L._logits_into

    def spy(out, h, w, b):
        sizes.append(out.numel())
        assert out._base is not None and out._base.numel() <= chunk * V  # views of ONE reused buffer
        return real(out, h, w, b)

    monkeypatch.setattr(L, "_logits_into", spy)
    N, V, chunk = 64, 90, 4
    h, w, b, t = make(N=N, V=V)
    run(h, w, b, t, topk(0.5), chunk_size=chunk)
    assert sizes and max(sizes) <= chunk * V
    assert len(sizes) > N // chunk  # forward chunks + backward slices


def test_softcap():
    h, w, b, t = make(bias=True)
    loss, stats, *_ = check_against_reference(h, w * 3, b, t, topk(0.3), torch.float32, softcap=2.5, chunk_size=8)
    assert (stats.lse < 2.5 + math.log(70) + 1e-4).all()  # capped logits
    check_against_reference(h.bfloat16(), (w * 3).bfloat16(), b.bfloat16(), t, topk(0.3), torch.bfloat16,
                            softcap=2.5)


def test_ignore_index_never_selected():
    h, w, _, t = make(n_ignored=0)
    t[::3] = 7  # a custom ignore_index that is also a valid class id
    everything = lambda stats, valid: torch.ones_like(valid)  # noqa: E731
    loss, stats, mask, gh, gw, _ = check_against_reference(h, w, None, t, everything, torch.float32,
                                                             ignore_index=7)
    assert torch.equal(gh[::3], torch.zeros_like(gh[::3]))
    assert torch.equal(stats.nll[::3], torch.zeros_like(stats.nll[::3]))
    torch.testing.assert_close(loss, stats.nll[t != 7].mean())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    h, w, b, t = make(bias=True)
    t[:] = -100
    loss, _, mask, gh, gw, gb = run(h, w, b, t, topk(0.5), reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in (gh, gw, gb):
        assert g is not None and torch.equal(g, torch.zeros_like(g))


def test_empty_selection_mean_is_zero():
    h, w, _, t = make()
    nothing = lambda stats, valid: torch.zeros_like(valid)  # noqa: E731
    loss, _, _, gh, gw, _ = run(h, w, None, t, nothing)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_all_selected_uses_no_gather():
    h, w, b, t = make(bias=True, n_ignored=0)
    everything = lambda stats, valid: torch.ones_like(valid)  # noqa: E731
    loss, stats, *_ = check_against_reference(h, w, b, t, everything, torch.float32, chunk_size=5)
    torch.testing.assert_close(loss, stats.nll.mean())


def test_3d_input_and_sequence_aware_selection():
    h, w, b, t = make(shape=(4, 12), bias=True)

    def select_fn(stats, valid):
        assert stats.nll.shape == (4, 12) and valid.shape == (4, 12)
        return ops.select_sequence_aware(stats.nll, valid, 0.25, min_tokens_per_sequence=2)

    loss, stats, mask, gh, gw, gb = check_against_reference(h, w, b, t, select_fn, torch.float32)
    assert mask.shape == (4, 12) and gh.shape == h.shape
    # non-contiguous 3-D hidden (a transposed view) gives the same result
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)
    assert not ht.is_contiguous()
    got = run(ht, w, b, t, select_fn)
    torch.testing.assert_close(got[3], gh)
    per_token = run(h, w, b, t, select_fn, reduction="none")[0]
    assert per_token.shape == (4, 12)
    torch.testing.assert_close(per_token.sum() / (mask & (t != -100)).sum(), loss)


def test_row_weight():
    h, w, b, t = make()
    g = torch.Generator().manual_seed(5)
    rw = torch.rand(t.shape, generator=g) + 0.5
    for reduction in ("mean", "sum", "none"):
        check_against_reference(h, w, b, t, topk(0.3), torch.float32, row_weight=rw, reduction=reduction,
                                grad_out=torch.ones(t.shape) if reduction == "none" else None)


def test_tied_weights():
    """weight doubles as the input embedding: autograd sums both uses' gradients."""
    V, H, N = 60, 16, 32
    g = torch.Generator().manual_seed(11)
    emb = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2).requires_grad_()
    proj = torch.randn(H, H, generator=g) / math.sqrt(H)
    ids = torch.randint(0, V, (N,), generator=g)
    t = torch.randint(0, V, (N,), generator=g)

    hidden = torch.tanh(emb[ids] @ proj) * 3
    loss, _, mask = fused_linear_selective_ce(hidden, emb, t, topk(0.5))
    loss.backward()

    emb64 = emb.detach().double().requires_grad_()
    hidden64 = torch.tanh(emb64[ids] @ proj.double()) * 3
    logits = hidden64 @ emb64.T
    ref = F.cross_entropy(logits[mask], t[mask])
    ref.backward()
    assert rel(emb.grad, emb64.grad) < 1e-5


def test_frozen_weight_and_hidden_only():
    h, w, b, t = make(bias=True)
    h = h.clone().requires_grad_()
    loss, _, mask = fused_linear_selective_ce(h, w, t, topk(0.3), bias=b)  # w, b do not require grad
    loss.backward()
    _, rh, _, _ = reference(h, w, b, t, mask)
    assert rel(h.grad, rh) < 1e-5
    w2 = w.clone().requires_grad_()
    loss, _, mask = fused_linear_selective_ce(h.detach(), w2, t, topk(0.3))
    loss.backward()
    _, _, rw, _ = reference(h, w2, None, t, mask)
    assert rel(w2.grad, rw) < 1e-5


# ------------------------------------------------------------------------------------------------
# host sync / capacity
# ------------------------------------------------------------------------------------------------
def test_max_selected_bound_without_sync():
    h, w, b, t = make(N=40)
    n_valid = int((t != -100).sum())
    bound = math.ceil(0.25 * n_valid)
    base = run(h, w, b, t, topk(0.25))
    for extra in (0, 5):  # an exact bound and a loose one (padding rows contribute zero)
        got = run(h, w, b, t, topk(0.25), validate_targets=False, max_selected=bound + extra)
        for a, r in zip(got[3:5], base[3:5]):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


def test_max_selected_too_small():
    h, w, b, t = make(N=40)
    with pytest.raises(ValueError, match="selected 9 tokens, more than max_selected=3"):
        run(h, w, b, t, topk(0.25), max_selected=3)
    # without the sync the overflow cannot raise: every gradient is NaN instead of silently partial
    _, _, _, gh, gw, _ = run(h, w, b, t, topk(0.25), validate_targets=False, max_selected=3)
    assert torch.isnan(gw).all()


def test_targets_validated_once():
    h, w, b, t = make()
    t[4] = -3
    with pytest.raises(ValueError, match=r"targets\[4\] = -3 is outside \[0, 70\) and is not ignore_index"):
        run(h, w, b, t, topk(0.25))


# ------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------
def test_bad_arguments():
    h, w, b, t = make()
    sf = topk(0.25)
    with pytest.raises(ValueError, match="hidden size mismatch: hidden has H=24"):
        fused_linear_selective_ce(h, w[:, :10], t, sf)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 does not match hidden dtype torch.float32"):
        fused_linear_selective_ce(h, w.bfloat16(), t, sf)
    with pytest.raises(TypeError, match="hidden must be a float16/bfloat16/float32 tensor, got torch.float64"):
        fused_linear_selective_ce(h.double(), w.double(), t, sf)
    with pytest.raises(TypeError, match="targets must be an int64 or int32 tensor"):
        fused_linear_selective_ce(h, w, t.float(), sf)
    with pytest.raises(ValueError, match=r"targets shape \(47,\) does not match hidden shape \(48, 24\)"):
        fused_linear_selective_ce(h, w, t[:47], sf)
    with pytest.raises(ValueError, match=r"bias must have shape \(70,\)"):
        fused_linear_selective_ce(h, w, t, sf, bias=torch.zeros(69))
    with pytest.raises(TypeError, match="bias must be a tensor of hidden's dtype"):
        fused_linear_selective_ce(h, w, t, sf, bias=torch.zeros(70, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_selective_ce(h, w, t, sf, reduction="avg")
    with pytest.raises(ValueError, match="hidden must be \\[N, H\\] or \\[B, T, H\\]"):
        fused_linear_selective_ce(h[None, None], w, t[None, None], sf)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_selective_ce(h, w, t, sf, chunk_size=0)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        fused_linear_selective_ce(h, w, t, sf, softcap=-1.0)
    with pytest.raises(ValueError, match="row_weight shape"):
        fused_linear_selective_ce(h, w, t, sf, row_weight=torch.ones(3))
    with pytest.raises(TypeError, match="select_fn must return a bool tensor"):
        fused_linear_selective_ce(h, w, t, lambda s, v: s.nll)
    with pytest.raises(ValueError, match="select_fn returned a mask of shape"):
        fused_linear_selective_ce(h, w, t, lambda s, v: v[:3])
    with pytest.raises(ValueError, match="max_selected must be an int"):
        fused_linear_selective_ce(h, w, t, sf, max_selected=-1)
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        token_stats_from_hidden(h, w[None], t)


# ------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter on CPU, or CUDA) against the ops' CPU implementations
# (float64 references on odd sizes and opchecks: tests/test_linear_ops.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_triton_ce_grad_matches_torch(triton_device, dtype, softcap):
    from cggr.triton_kernels.linear_ce import launch_linear_ce_grad_

    g = torch.Generator().manual_seed(2)
    R, C, v0 = 6, 300, 100
    x = (torch.randn(R, C, generator=g) * 3).to(dtype)
    lse = torch.randn(R, generator=g) + 8
    t = torch.randint(0, 500, (R,), generator=g)
    t[0], t[1] = 150, -100  # in the slice; ignored
    coef = torch.rand(R, generator=g)
    coef[2] = 0.0
    x[2, 5] = float("inf")  # an inactive row is written as zeros without reading it
    expect = ops.linear_ce_grad_(x.clone(), lse, t, coef, v0, softcap)  # CPU tensors: the torch implementation
    got = launch_linear_ce_grad_(x.to(triton_device), lse.to(triton_device), t.to(triton_device),
                                 coef.to(triton_device), v0, softcap).cpu()
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    # half types: torch's tanh and the kernel's may round the capped logit to neighbouring values (one
    # ulp of z moves exp(z - lse) by up to 2^-7 relative for |z| < 4)
    rtol = 1e-5 if dtype == torch.float32 else (1e-2 if softcap is None else 3e-2)
    torch.testing.assert_close(got.float(), expect.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_softcap_matches_torch(triton_device, dtype):
    from cggr.triton_kernels.linear_ce import launch_softcap_

    x = (torch.linspace(-40, 40, 777).reshape(7, 111)).to(dtype)
    x[0, :5] = torch.tensor([1e-6, -1e-4, 0.0, 0.05, -0.2]).to(dtype)  # the small-argument branch
    expect = ops.softcap_(x.clone(), 5.0)
    got = launch_softcap_(x.to(triton_device), 5.0).cpu()
    torch.testing.assert_close(got.float(), expect.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                               atol=1e-7)


def test_float16_small_gradients_do_not_underflow():
    """coef * softmax (here 4e-5 * 2e-4) is below float16's range: the factor must stay out of the
    stored float16 gradient, or the softmax part of every gradient flushes to zero."""
    h, w, b, t = make(N=256, H=16, V=4096, dtype=torch.float16, bias=True, n_ignored=0)
    h, w, b = leaves(h, w, b)
    loss, _, mask = fused_linear_selective_ce(h, w, t, topk(1.0), bias=b)
    (loss * 1e-2).backward()
    _, rh, rw, rb = reference(h, w, b, t, mask, grad_out=torch.tensor(1e-2))
    assert rel(h.grad, rh) < 1e-2 and rel(w.grad, rw) < 1e-2 and rel(b.grad, rb) < 1e-2


def test_autocast_computes_in_the_autocast_dtype_with_fp32_master_weights():
    """Like F.linear under autocast: bf16 logits from fp32 parameters, fp32 gradients back."""
    g = torch.Generator().manual_seed(123)
    hidden = torch.randn(40, 24, generator=g).requires_grad_(True)
    weight = (torch.randn(77, 24, generator=g) / 5).requires_grad_(True)
    targets = torch.randint(0, 77, (40,), generator=g)
    select_all = lambda stats, valid: valid  # noqa: E731
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.seen.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    with MatmulDtypes() as recorder:  # the forward's logits matmuls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, stats, _ = L.fused_linear_selective_ce(hidden, weight, targets, select_all)
    assert recorder.seen == {torch.bfloat16}, f"logits matmuls ran in {recorder.seen}"
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    # reference: the same bf16-rounded operands, float64 math
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logits = (h16 @ w16.T).double()  # what the bf16 matmul produces, up to its rounding
    ref = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)
    assert stats.nll.dtype == torch.float32
