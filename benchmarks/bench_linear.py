"""Benchmark the fused linear selective cross-entropy (LM head + loss, forward + backward) side by side.

    python benchmarks/bench_linear.py --out OUT_DIR [--chunk-sweep] [--shapes 16384x576x49152 8192x4096x128256]
                                      [--ratios 0.25 0.5 1.0] [--dtype bf16]

For each shape (N tokens, H hidden, V vocabulary), in one run on one GPU, with fresh random inputs
(hidden ~ N(0, 1), weight ~ N(0, 1/H): logits ~ N(0, 1), a non-degenerate softmax; targets uniform):
  cggr r=R            cggr.fused_linear_selective_ce with select_topk(nll, ratio R), defaults (one host sync)
  cggr r=R no-sync    validate_targets=False, max_selected=ceil(R * N): no host sync at all
  eager               logits = h @ W.T in the input dtype, F.cross_entropy(logits, t), backward
  liger               liger_kernel's LigerFusedLinearCrossEntropyLoss (when installed)
  cce                 cut_cross_entropy.linear_cross_entropy (when installed)
  torch lce           torch.nn.functional.linear_cross_entropy, chunked (LinearCrossEntropyOptions();
                      torch >= 2.13, else said once and left out)
  matmul floor        6NHV flops at the bf16 matmul rate measured in the same run (a large square mm);
                      "ideal r" = (2 + 6r) NHV at that rate (forward matmul + recompute + two backward
                      matmuls on the selected rows)
Times: triton.testing.do_bench median (L2 flushed between calls), forward + backward, gradients reset
to None between calls. Peak memory: a separate call after a warm-up, torch.cuda.max_memory_allocated()
minus the memory allocated before the call (the inputs), gradients included.

--chunk-sweep also times, per shape, forward chunk rows and backward vocabulary-slice widths one at a
time (the other left at its default), at ratios 0.25 and 1.0, with peak memory, so the default
chunking can be tuned from one run.

Prints markdown tables and writes OUT_DIR/linear.json.
"""
import argparse
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from cggr import linear as L
from cggr import ops

# run as a script (python benchmarks/bench_linear.py): the repository root holds the `benchmarks` package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.comparators import load_cut_cross_entropy, load_liger, load_torch_linear_cross_entropy  # noqa: E402

DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = ["16384x576x49152", "8192x4096x128256"]
SWEEP_ROWS = [256, 512, 768, 1024, 2048, 4096, 8192]
SWEEP_COLS = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def bench_ms(fn, grad_to_none):
    return do_bench(fn, warmup=200, rep=1500, grad_to_none=grad_to_none, return_mode="median")


def peak_gb(fn, tensors):
    """Peak allocated memory of one call above what was allocated before it (inputs), in GB."""
    fn()  # warm-up: lazy initialisation (cuBLAS workspaces, Triton compilation) is not counted
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in tensors:
        t.grad = None
    return peak / 1e9


def matmul_tflops(dtype):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: torch.mm(a, b), warmup=100, rep=500, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def make_inputs(N, H, V, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(N, H, device=DEVICE, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=DEVICE, generator=g) / math.sqrt(H)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    return h, w, t


def topk_fn(ratio, device):
    ratio_t = torch.tensor(float(ratio), device=device)  # a device ratio: select_topk stays sync-free
    return lambda stats, valid: ops.select_topk(stats.nll, valid, ratio_t)


def methods(h, w, t, ratios):
    """name -> (step closure doing forward + backward, forward-only closure or None)."""
    N = h.shape[0]
    out = {}
    for r in ratios:
        sf = topk_fn(r, h.device)

        def fwd(sf=sf):
            return L.fused_linear_selective_ce(h, w, t, sf)[0]

        def fwd_nosync(sf=sf, r=r):
            return L.fused_linear_selective_ce(h, w, t, sf, validate_targets=False,
                                               max_selected=math.ceil(r * N))[0]

        out[f"cggr r={r:g}"] = (lambda fwd=fwd: fwd().backward(), fwd)
        out[f"cggr r={r:g} no-sync"] = (lambda f=fwd_nosync: f().backward(), fwd_nosync)

    def eager():
        F.cross_entropy(h @ w.t(), t).backward()

    out["eager"] = (eager, None)
    liger = load_liger()
    if liger is not None:
        liger_loss = liger.LigerFusedLinearCrossEntropyLoss()
        out["liger"] = (lambda: liger_loss(w, h, t).backward(), None)
    cce = load_cut_cross_entropy()
    if cce is not None:
        out["cce"] = (lambda: cce.linear_cross_entropy(h, w, t).backward(), None)
    torch_lce = load_torch_linear_cross_entropy()
    if torch_lce is not None:
        out["torch lce"] = (lambda: torch_lce(h, w, t).backward(), None)
    return out


@contextlib.contextmanager
def chunking(rows=None, cols=None):
    """Override cggr.linear's default forward chunk rows / backward slice columns (benchmark only)."""
    orig_rows, orig_cols = L._forward_rows, L._backward_cols
    if rows is not None:
        L._forward_rows = lambda N, *a, **k: max(1, min(rows, N))
    if cols is not None:
        L._backward_cols = lambda S, N, H, V, *a, **k: max(1, min(cols, V))
    try:
        yield
    finally:
        L._forward_rows, L._backward_cols = orig_rows, orig_cols


def default_chunking(N, H, V, dtype, ratio):
    S = min(N, math.ceil(ratio * N))
    rows = L._forward_rows(N, H, V, dtype.itemsize, None, grad_weight=True, grad_hidden=True)
    cols = L._backward_cols(S, N, H, V, dtype.itemsize, None, gathered=S < N)
    return rows, cols


def correctness(h, w, t):
    """cggr at ratio 1.0 against eager (same dtype): loss and gradient relative differences."""
    sf = lambda stats, valid: torch.ones_like(valid)  # noqa: E731
    for x in (h, w):
        x.grad = None
    loss, _, _ = L.fused_linear_selective_ce(h, w, t, sf)
    loss.backward()
    got = (loss.detach().float(), h.grad.float(), w.grad.float())
    for x in (h, w):
        x.grad = None
    ref = F.cross_entropy((h @ w.t()).float(), t)
    ref.backward()
    want = (ref.detach(), h.grad.float(), w.grad.float())
    for x in (h, w):
        x.grad = None
    return {name: ((a - b).norm() / b.norm()).item() for name, a, b in zip(("loss", "grad_hidden", "grad_weight"),
                                                                         got, want)}


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def run_shape(N, H, V, dtype, ratios, tflops, sweep):
    h, w, t = make_inputs(N, H, V, dtype)
    grads = [h, w]
    nhv = N * H * V
    res = {"N": N, "H": H, "V": V, "methods": {}, "default_chunking": {},
           "matmul_floor_ms": 6 * nhv / (tflops * 1e12) * 1e3,
           "ideal_ms": {f"{r:g}": (2 + 6 * r) * nhv / (tflops * 1e12) * 1e3 for r in ratios}}
    for r in ratios:
        res["default_chunking"][f"{r:g}"] = dict(zip(("forward_rows", "backward_cols"),
                                                     default_chunking(N, H, V, dtype, r)))
    res["correctness_vs_eager_at_ratio_1"] = correctness(h, w, t)
    for name, (step, fwd) in methods(h, w, t, ratios).items():
        entry = {"peak_gb": peak_gb(step, grads), "ms": bench_ms(step, grads)}
        if fwd is not None:
            with torch.no_grad():
                entry["forward_ms"] = bench_ms(fwd, grads)
        res["methods"][name] = entry
        torch.cuda.empty_cache()
    if sweep:
        res["sweep"] = []
        for r in (0.25, 1.0):
            sf = topk_fn(r, h.device)
            step = lambda sf=sf: L.fused_linear_selective_ce(h, w, t, sf)[0].backward()  # noqa: E731
            d_rows, d_cols = default_chunking(N, H, V, dtype, r)
            points = [(rows, None) for rows in SWEEP_ROWS if rows <= N] + \
                     [(None, cols) for cols in SWEEP_COLS if cols <= V]
            for rows, cols in points:
                with chunking(rows, cols):
                    try:
                        entry = {"peak_gb": peak_gb(step, grads), "ms": bench_ms(step, grads)}
                    except torch.OutOfMemoryError as exc:  # a sweep point that does not fit: record it
                        entry = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
                for x in grads:
                    x.grad = None
                torch.cuda.empty_cache()
                res["sweep"].append({"ratio": r, "forward_rows": rows or d_rows, "backward_cols": cols or d_cols,
                                     "varied": "forward_rows" if rows else "backward_cols", **entry})
    del h, w, t
    torch.cuda.empty_cache()
    return res


def print_shape(res, ratios):
    N, H, V = res["N"], res["H"], res["V"]
    m = res["methods"]
    liger = m.get("liger", {}).get("ms")
    eager = m["eager"]["ms"]
    print(f"## N={N} H={H} V={V}\n")
    rows = []
    for name, e in m.items():
        rows.append([name, fmt(e["ms"]), fmt(e.get("forward_ms")), fmt(e["peak_gb"], 3),
                     fmt(e["ms"] / liger if liger else None), fmt(e["ms"] / eager)])
    rows.append(["matmul floor 6NHV", fmt(res["matmul_floor_ms"]), "", "", "", ""])
    for r in ratios:
        rows.append([f"ideal r={r:g} (2+6r)NHV", fmt(res["ideal_ms"][f"{r:g}"]), "", "", "", ""])
    print(markdown_table(["method", "fwd+bwd ms", "fwd ms", "peak GB", "x liger", "x eager"], rows))
    print(f"\ndefault chunking: {res['default_chunking']}")
    print(f"cggr r=1 vs eager (relative L2 difference): {res['correctness_vs_eager_at_ratio_1']}\n")
    if "sweep" in res:
        srows = [[s["ratio"], s["varied"], s["forward_rows"], s["backward_cols"],
                  fmt(s.get("ms")), fmt(s.get("peak_gb"), 3), s.get("error", "")] for s in res["sweep"]]
        print(f"### chunk sweep N={N} H={H} V={V}\n")
        print(markdown_table(["ratio", "varied", "fwd rows", "bwd cols", "ms", "peak GB", "error"], srows) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxHxV")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-sweep", action="store_true",
                        help="also time forward chunk rows and backward slice widths (ratios 0.25 and 1.0)")
    parser.add_argument("--out", required=True, help="directory for linear.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_linear needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    dtype = DTYPES[args.dtype]
    tflops = matmul_tflops(dtype)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": args.dtype, "matmul_tflops": tflops}
    print(f"# fused linear selective CE  {env}\n")
    result = {"env": env, "shapes": []}
    for spec in args.shapes:
        N, H, V = (int(x) for x in spec.lower().split("x"))
        res = run_shape(N, H, V, dtype, args.ratios, tflops, args.chunk_sweep)
        result["shapes"].append(res)
        print_shape(res, args.ratios)
        path = os.path.join(args.out, "linear.json")
        with open(path, "w") as f:  # rewritten after every shape: a later failure keeps the earlier ones
            json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'linear.json')}")


if __name__ == "__main__":
    main()
