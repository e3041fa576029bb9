"""Benchmark the CGGR selective loss (forward + backward) against full cross entropy.

    python benchmarks/bench_selective_ce.py --out OUT_DIR [--sweep] [--ratio 0.25] [--n 16384] [--vocab ...]

On CUDA, bf16 logits [N, V]; median times (triton.testing.do_bench, inputs rotated). Rows:
  floor                  one read + one write of the logits at the measured copy bandwidth
  cggr fwd+bwd           token_stats + a top-k mask on the entropy (ratio) + selective_ce_backward
  cggr parts             token_stats alone, the mask alone, selective_ce_backward alone
  F.cross_entropy bf16   fwd + bwd on the bf16 logits
  F.cross_entropy fp32   fwd + bwd with the logits upcast to float32 first
  Liger cross entropy    fwd + bwd (when liger_kernel imports; its forward writes the gradient into the logits)
The mask comes from cggr.ops.select_topk when the selection ops are built for CUDA, otherwise from
torch.topk; the table says which. --sweep times selective_ce_backward configs (BLOCK_N, BLOCK_V, warps).
Prints markdown tables and writes OUT_DIR/selective_ce.json.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import cggr.stats_ops  # noqa: F401  (registers the ops)
from cggr.triton_kernels.selective_ce_backward import launch_selective_ce_backward, selective_ce_backward_config

# run as a script: make the repository root importable for the sibling modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_token_stats import (  # noqa: E402
    DTYPES, Rotating, bench_ms, copy_bandwidth_tbs, environment, make_logits, markdown_table)
from benchmarks.comparators import load_cggr_v050, load_liger  # noqa: E402
from cggr import CGGRLoss  # noqa: E402


def topk_mask_fn():
    """(name, fn(scores, ratio) -> bool mask): cggr's selection op when it runs on CUDA, else torch.topk."""
    probe = torch.rand(64, device="cuda")
    try:
        from cggr.ops import select_topk
        select_topk(probe, None, 0.25)
    except (ImportError, RuntimeError, NotImplementedError) as exc:
        print(f"[bench_selective_ce] cggr.ops.select_topk unusable on CUDA ({type(exc).__name__}: {exc}); "
              f"the mask uses torch.topk", file=sys.stderr)

        def torch_topk_mask(scores, ratio):
            k = max(1, int(round(ratio * scores.numel())))
            idx = torch.topk(scores, k, sorted=False).indices
            return torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, idx, True)
        return "torch.topk", torch_topk_mask
    ratio_tensors = {}

    def cggr_mask(scores, ratio):
        if ratio not in ratio_tensors:  # a device ratio: no host-to-device copy per call
            ratio_tensors[ratio] = torch.tensor(ratio, dtype=torch.float32, device=scores.device)
        return select_topk(scores, None, ratio_tensors[ratio])
    return "cggr.ops.select_topk", cggr_mask


def cggr_step(x, t, ratio, mask_fn):
    """Forward loss (mean nll over selected tokens) and the gradient of the logits, as CGGRLoss does it."""
    stats = torch.ops.cggr.token_stats(x, t, -100)
    mask = mask_fn(stats[2], ratio)
    count = mask.sum().clamp_min(1).float()
    loss = (stats[1] * mask).sum() / count
    grad = torch.ops.cggr.selective_ce_backward(x, t, stats[0], mask, 1.0 / count, None, -100)
    return loss, grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--rotate", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="also time selective_ce_backward configs")
    parser.add_argument("--out", required=True, help="directory for selective_ce.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_selective_ce needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    dtype = DTYPES[args.dtype]
    N, ratio = args.n, args.ratio
    mask_name, mask_fn = topk_mask_fn()
    liger = load_liger()
    result = {"env": environment(), "N": N, "dtype": args.dtype, "ratio": ratio, "mask": mask_name,
              "liger": liger is not None, "per_vocab": {}}
    print(f"# selective CE fwd+bwd  {result['env']}  N={N} dtype={args.dtype} ratio={ratio} mask={mask_name}\n")

    for V in args.vocab:
        def make(i, V=V):
            x, t = make_logits(N, V, dtype, seed=i)
            return x.requires_grad_(), t
        rot = Rotating(make, args.rotate)
        leaves = [x for x, _ in rot.items]
        nbytes = N * V * dtype.itemsize
        bw = copy_bandwidth_tbs(nbytes)
        floor_ms = 2 * nbytes / (bw * 1e12) * 1e3
        # fixed inputs for the part timings
        x0, t0 = rot.items[0]
        x0d = x0.detach()
        stats0 = torch.ops.cggr.token_stats(x0d, t0, -100)
        mask0 = mask_fn(stats0[2], ratio)
        scale0 = 1.0 / mask0.sum().float()

        def cross_entropy_bf16():
            x, t = rot.next()
            F.cross_entropy(x, t).backward()

        def cross_entropy_fp32():
            x, t = rot.next()
            F.cross_entropy(x.float(), t).backward()

        def cggr_fwd_bwd():
            x, t = rot.next()
            cggr_step(x.detach(), t, ratio, mask_fn)

        timings = {
            "cggr fwd+bwd": (cggr_fwd_bwd, None),
            "  token_stats": (lambda: torch.ops.cggr.token_stats(rot.next()[0].detach(), t0, -100), None),
            "  mask (top-k of entropy)": (lambda: mask_fn(stats0[2], ratio), None),
            "  selective_ce_backward": (lambda: torch.ops.cggr.selective_ce_backward(
                rot.next()[0].detach(), t0, stats0[0], mask0, scale0, None, -100), None),
            "F.cross_entropy bf16 fwd+bwd": (cross_entropy_bf16, leaves),
            "F.cross_entropy fp32-upcast fwd+bwd": (cross_entropy_fp32, leaves),
        }
        # what the label says, and what cggr 0.5.0's CGGRLoss below runs by default
        module = CGGRLoss(scoring="combined", dynamic_threshold=True, min_tokens_ratio=ratio, warmup_steps=0,
                          validate_targets=False)

        def cggr_module():
            x, t = rot.next()
            module(x, t).backward()
        timings["CGGRLoss module fwd+bwd (combined, dynamic threshold)"] = (cggr_module, leaves)
        v050 = load_cggr_v050()
        if v050 is not None:
            v050_loss = v050.CGGRLoss(min_tokens_ratio=ratio, warmup_steps=0)

            def v050_fwd_bwd():
                x, t = rot.next()
                v050_loss(x, t).backward()
            timings["cggr==0.5.0 CGGRLoss fwd+bwd"] = (v050_fwd_bwd, leaves)
        if liger is not None:
            liger_loss = liger.LigerCrossEntropyLoss()

            def liger_ce():
                x, t = rot.next()
                liger_loss(x, t).backward()
            timings["Liger cross entropy fwd+bwd"] = (liger_ce, leaves)
        entries = {"copy bandwidth (TB/s, read+write)": bw, "read+write floor": floor_ms}
        for name, (fn, grads) in timings.items():
            fn()
            entries[name.strip()] = bench_ms(fn, grad_to_none=grads)
            for leaf in leaves:
                leaf.grad = None
            torch.cuda.empty_cache()

        # check the timed cggr gradient against autograd of the same selected-token mean
        _, grad = cggr_step(x0d, t0, ratio, mask_fn)
        sel = mask0.nonzero().squeeze(1)[:256]
        xs = x0d[sel].float().requires_grad_()
        (F.cross_entropy(xs, t0[sel], reduction="sum") / mask0.sum().float()).backward()
        err = (grad[sel].float() - xs.grad).abs().max().item()

        rows = [["copy bandwidth", f"{bw:.2f} TB/s", ""], ["read+write floor", f"{floor_ms:.3f}", "1.00"]]
        for name in timings:
            ms = entries[name.strip()]
            rows.append([name, f"{ms:.3f}", f"{ms / floor_ms:.2f}"])
        print(f"## V = {V}  ({nbytes / 1e9:.2f} GB of logits)\n")
        print(markdown_table(["", "ms (median)", "x floor"], rows))
        print(f"\nmax |cggr grad - fp32 autograd| on 256 selected rows: {err:.2e}\n")
        per_v = {"ms": entries, "max_abs_grad_err": err}

        if args.sweep:
            base = launch_selective_ce_backward(x0d, t0, stats0[0], mask0, scale0, None, -100)
            sweep = []
            for block_v in (2048, 4096, 8192, 16384):
                for warps in (4, 8, 16, 32):
                    if not 4 <= block_v // (32 * warps) <= 64:
                        continue
                    cfg = dict(block_n=1, block_v=block_v, num_warps=warps)
                    out = launch_selective_ce_backward(x0d, t0, stats0[0], mask0, scale0, None, -100, **cfg)
                    ok = bool(torch.equal(out, base))
                    ms = bench_ms(lambda: launch_selective_ce_backward(
                        rot.next()[0].detach(), t0, stats0[0], mask0, scale0, None, -100, **cfg))
                    sweep.append({"config": f"V{block_v} w{warps}", **cfg, "ms": ms, "matches_default": ok})
            per_v["sweep"] = sweep
            default = selective_ce_backward_config(V, dtype)
            print(f"### selective_ce_backward sweep, V = {V} (default N{default[0]} V{default[1]} w{default[2]})\n")
            print(markdown_table(["config", "ms", "ok"], [[r["config"], f"{r['ms']:.3f}", r["matches_default"]]
                                                         for r in sorted(sweep, key=lambda r: r["ms"])]) + "\n")
        result["per_vocab"][str(V)] = per_v
        del rot, leaves, x0, x0d, grad
        torch.cuda.empty_cache()

    path = os.path.join(args.out, "selective_ce.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
