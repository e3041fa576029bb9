"""Benchmark token_stats (one pass over the logits) against the memory floor and its alternatives.

    python benchmarks/bench_token_stats.py --out OUT_DIR [--sweep] [--n 16384] [--vocab 49152 128256]

On CUDA, bf16 logits [N, V]. Reports, per V, the median time (triton.testing.do_bench, L2 flushed by
do_bench, and inputs rotated so no call sees the previous call's logits):
  copy bandwidth   a large clone, counting read + write
  one-read floor   logits bytes / copy bandwidth
  cggr launcher    the Triton kernel called directly
  cggr op          torch.ops.cggr.token_stats (custom-op dispatch included)
  torch.amax       a plain reduction over V, for reference
  eager / compile  the eager composition (logsumexp, softmax, entropy, topk(2), gather) and torch.compile of it
--sweep also times a grid of kernel configs (BLOCK_N, BLOCK_V, num_warps, num_stages, and the lane_sums /
branch_top2 kernel variants), each
checked against the default config's output, so the heuristic table can be tuned from one run.
Prints markdown tables and writes OUT_DIR/token_stats.json.
"""
import argparse
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

import cggr.stats_ops  # noqa: F401  (registers torch.ops.cggr.token_stats)
from cggr.triton_kernels.token_stats import launch_token_stats, token_stats_config

# run as a script: make the repository root importable for the sibling modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.comparators import load_cggr_v050  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_ms(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


class Rotating:
    """Cycle through `count` independent input sets so that consecutive calls read different memory."""

    def __init__(self, make, count):
        self.items = [make(i) for i in range(count)]
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


def copy_bandwidth_tbs(nbytes):
    """TB/s of a large clone, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    ms = bench_ms(lambda: src.clone())
    del src
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e12


def make_logits(N, V, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(N, V, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    return logits, targets


def eager_stats(x, t):
    xf = x.float()
    lse = torch.logsumexp(xf, dim=-1)
    logp = xf - lse[:, None]
    p = torch.softmax(xf, dim=-1)
    entropy = -(p * logp).sum(-1)
    top = torch.topk(p, 2, dim=-1).values
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    return torch.stack([lse, nll, entropy, top[:, 0], top[:, 1]])


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment():
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def sweep_configs(V, dtype):
    """Configs around the heuristic: chunk width x warps (8-32 elements per thread) x the two kernel
    variants (lane_sums, branch_top2), plus num_stages for the default."""
    base = token_stats_config(V, dtype)
    configs = []
    if V >= 16384:
        for block_v in (2048, 4096, 8192):
            for warps in (2, 4, 8):
                if 8 <= block_v // (32 * warps) <= 64:
                    for lane_sums in (False,):  # lane_sums lost in every measured config (H200 sweep)
                        for branch_top2 in (False, True):
                            for prefetch in (False, True):
                                configs.append(dict(block_n=1, block_v=block_v, num_warps=warps, num_stages=None,
                                                    lane_sums=lane_sums, branch_top2=branch_top2,
                                                    prefetch=prefetch))
        for stages in (1, 2, 3):
            configs.append(dict(base, num_stages=stages))
    else:
        for block_n in (1, 2, 4, 8, 16):
            for warps in (4, 8):
                configs.append(dict(base, block_n=block_n, num_warps=warps, num_stages=None))
    return configs


def run_sweep(rot, V, dtype, floor_ms):
    x0, t0 = rot.items[0]
    ref = launch_token_stats(x0, t0, -100)
    rows = []
    for cfg in sweep_configs(V, dtype):
        label = (f"N{cfg['block_n']} V{cfg['block_v']} w{cfg['num_warps']} s{cfg['num_stages'] or '-'}"
                 f"{' lane_sums' if cfg['lane_sums'] else ''}{' branch_top2' if cfg['branch_top2'] else ''}"
                 f"{' prefetch' if cfg.get('prefetch') else ''}")
        try:
            out = launch_token_stats(x0, t0, -100, **cfg)
            torch.cuda.synchronize()
        except triton.runtime.errors.OutOfResources as exc:  # too many registers / shared memory: skip it
            rows.append({"config": label, **cfg, "ms": None, "error": f"out of resources: {exc}"})
            continue
        ok = bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5, equal_nan=True))
        ms = bench_ms(lambda: launch_token_stats(*rot.next(), -100, **cfg))
        rows.append({"config": label, **cfg, "ms": ms, "x_floor": ms / floor_ms, "matches_default": ok})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rotate", type=int, default=2, help="independent input sets cycled through")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel configs")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparator")
    parser.add_argument("--out", required=True, help="directory for token_stats.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_token_stats needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    dtype = DTYPES[args.dtype]
    N = args.n
    result = {"env": environment(), "N": N, "dtype": args.dtype, "per_vocab": {}}
    print(f"# token_stats  {result['env']}  N={N} dtype={args.dtype}\n")

    compiled = None if args.no_compile else torch.compile(eager_stats, dynamic=False)
    for V in args.vocab:
        rot = Rotating(lambda i: make_logits(N, V, dtype, seed=i), args.rotate)
        logits_bytes = N * V * dtype.itemsize
        bw = copy_bandwidth_tbs(logits_bytes)
        floor_ms = logits_bytes / (bw * 1e12) * 1e3
        entries = {"copy bandwidth (TB/s, read+write)": bw, "one-read floor": floor_ms}
        timings = {
            "cggr token_stats (launcher)": lambda: launch_token_stats(*rot.next(), -100),
            "cggr token_stats (op)": lambda: torch.ops.cggr.token_stats(*rot.next(), -100),
            "torch.amax(dim=-1)": lambda: torch.amax(rot.next()[0], dim=-1),
            "eager composition": lambda: eager_stats(*rot.next()),
        }
        if compiled is not None:
            timings["torch.compile(eager composition)"] = lambda: compiled(*rot.next())
        v050 = load_cggr_v050()
        if v050 is not None:
            # its Triton path called directly: its public wrapper falls back to eager on any exception,
            # which would time something else without saying so
            v050_kernels = sys.modules["cggr_v050_triton_kernels"]
            timings["cggr==0.5.0 scoring (Triton, 3 passes)"] = (
                lambda: v050_kernels._triton_difficulty_score(rot.next()[0], None, "combined"))
        for name, fn in timings.items():
            fn()  # compile / warm up outside the timed region
            entries[name] = bench_ms(fn)
            torch.cuda.empty_cache()
        # correctness of what was timed, against the eager float32 composition
        x0, t0 = rot.items[0]
        err = (launch_token_stats(x0, t0, -100) - eager_stats(x0, t0)).abs().amax(dim=1).tolist()
        per_v = {"config": token_stats_config(V, dtype),
                 "logits_GB": logits_bytes / 1e9, "ms": entries, "max_abs_err_vs_eager": err}
        rows = [["copy bandwidth", f"{bw:.2f} TB/s", "", ""],
                ["one-read floor", f"{floor_ms:.3f}", "1.00", f"{logits_bytes / floor_ms / 1e9:.0f}"]]
        for name in timings:
            ms = entries[name]
            rows.append([name, f"{ms:.3f}", f"{ms / floor_ms:.2f}", f"{logits_bytes / ms / 1e9:.0f}"])
        print(f"## V = {V}  ({logits_bytes / 1e9:.2f} GB of logits, default config {per_v['config']})\n")
        print(markdown_table(["", "ms (median)", "x floor", "read GB/s"], rows))
        print(f"\nmax |cggr - eager fp32| per stat (lse, nll, H, p1, p2): {['%.2e' % e for e in err]}\n")
        if args.sweep:
            sweep = run_sweep(rot, V, dtype, floor_ms)
            per_v["sweep"] = sweep
            sweep_rows = [[r["config"], "-" if r["ms"] is None else f"{r['ms']:.3f}",
                           "-" if r["ms"] is None else f"{r['x_floor']:.2f}",
                           r.get("matches_default", r.get("error"))]
                          for r in sorted(sweep, key=lambda r: float("inf") if r["ms"] is None else r["ms"])]
            print(f"### sweep, V = {V}\n")
            print(markdown_table(["config", "ms", "x floor", "ok"], sweep_rows) + "\n")
        result["per_vocab"][str(V)] = per_v
        del rot
        torch.cuda.empty_cache()

    path = os.path.join(args.out, "token_stats.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
