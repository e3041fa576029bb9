"""Selection ops on CUDA against torch.topk + scatter, in the same run.

    python benchmarks/bench_selection.py [--sizes 16384 262144 4194304] [--ratio 0.25] [--dtype float32] [--out bench_out]

Times are medians of triton.testing.do_bench (return_mode="median"), in microseconds. Prints a
markdown table and writes <out>/bench_selection.json.

Baselines: torch.topk(k) (sorted, the default, and sorted=False) + a bool mask filled by scatter,
with k computed on the host. cggr.select_topk is timed with the ratio as a CPU tensor and as a 0-dim
device tensor (the no-sync path that the dynamic threshold uses).
"""
import argparse
import json
import os
import platform

import torch

import cggr
from cggr import ops

try:
    from triton.testing import do_bench
except ImportError as e:  # the benchmark is defined by do_bench's median; no other timer is substituted
    raise SystemExit(f"bench_selection needs triton (triton.testing.do_bench): {e}")


def median_us(fn):
    return 1000.0 * do_bench(fn, warmup=50, rep=200, return_mode="median")


def torch_topk_mask(scores, k, sorted_):
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(0, torch.topk(scores, k, sorted=sorted_).indices, True)
    return mask


def bench_size(n, ratio, dtype, seq_len, dist):
    g = torch.Generator(device="cuda").manual_seed(n)
    scores = torch.randn(n, generator=g, device="cuda")
    if dist == "clustered":
        # like real difficulty scores (e.g. entropies of a 49K vocabulary, ~10.8 +- 0.01): every key
        # shares its high bits, the worst case for a radix histogram's atomics
        scores = 10.8 + 0.01 * scores
    scores = scores.to(dtype)
    valid = torch.ones(n, dtype=torch.bool, device="cuda")
    cpu_ratio = torch.tensor(ratio, dtype=torch.float32)
    dev_ratio = cpu_ratio.cuda()
    k = int(ops.select_topk(scores, None, cpu_ratio).sum())

    ours = ops.select_topk(scores, None, dev_ratio)
    theirs = torch_topk_mask(scores, k, True)
    row = {
        "scores": dist,
        "n": n,
        "k": k,
        "dtype": str(dtype).replace("torch.", ""),
        "ratio": ratio,
        # torch.topk may order ties differently; with random floats the masks should agree
        "masks_agree": bool(torch.equal(ours, theirs)),
        "torch_topk_scatter_us": median_us(lambda: torch_topk_mask(scores, k, True)),
        "torch_topk_unsorted_scatter_us": median_us(lambda: torch_topk_mask(scores, k, False)),
        "select_topk_us": median_us(lambda: torch.ops.cggr.select_topk(scores, None, dev_ratio)),
        "select_topk_cpu_ratio_us": median_us(lambda: torch.ops.cggr.select_topk(scores, None, cpu_ratio)),
        "select_topk_valid_us": median_us(lambda: torch.ops.cggr.select_topk(scores, valid, dev_ratio)),
        "select_stratified_us": median_us(lambda: torch.ops.cggr.select_stratified(scores, valid, dev_ratio, 4, 1)),
    }
    rows = scores.reshape(-1, seq_len) if n % seq_len == 0 else scores.reshape(1, -1)
    row["sequence_shape"] = list(rows.shape)
    row["select_sequence_aware_us"] = median_us(
        lambda: torch.ops.cggr.select_sequence_aware(rows, None, dev_ratio, 1))
    row["compact_indices_us"] = median_us(lambda: torch.ops.cggr.compact_indices(ours, k))
    row["speedup_vs_topk"] = row["torch_topk_scatter_us"] / row["select_topk_us"]
    row["speedup_vs_unsorted_topk"] = row["torch_topk_unsorted_scatter_us"] / row["select_topk_us"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 262144, 4194304])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seq-len", type=int, default=2048, help="row length for select_sequence_aware")
    parser.add_argument("--scores", nargs="+", choices=["randn", "clustered"], default=["randn", "clustered"],
                        help="score distributions: standard normal, or clustered like real entropies")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_selection needs a CUDA GPU")
    if not cggr._C.with_cuda:
        raise SystemExit("cggr was built without CUDA ops (CGGR_FORCE_CPU or a CPU torch); rebuild with CUDA")
    dtype = getattr(torch, args.dtype)

    results = [bench_size(n, args.ratio, dtype, args.seq_len, dist) for dist in args.scores for n in args.sizes]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, ratio {args.ratio}, {args.dtype}; median us (do_bench)\n")
    print("| scores | N | torch.topk+scatter | topk(sorted=False)+scatter | select_topk | speedup | "
          "select_topk (CPU ratio) | with valid | stratified | sequence_aware | compact | masks agree |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in results:
        print(f"| {r['scores']} | {r['n']} | {r['torch_topk_scatter_us']:.1f} | {r['torch_topk_unsorted_scatter_us']:.1f} | "
              f"{r['select_topk_us']:.1f} | {r['speedup_vs_topk']:.2f}x | {r['select_topk_cpu_ratio_us']:.1f} | "
              f"{r['select_topk_valid_us']:.1f} | {r['select_stratified_us']:.1f} | "
              f"{r['select_sequence_aware_us']:.1f} | {r['compact_indices_us']:.1f} | {r['masks_agree']} |")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_selection.json")
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "python": platform.python_version(),
                   "ratio": args.ratio, "dtype": args.dtype, "unit": "microseconds (median)",
                   "results": results}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
