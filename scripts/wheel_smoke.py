"""Smoke test of an installed cggr (a wheel, not this source folder): the ops are registered, one CGGRLoss
forward and backward on the CPU, `cggr env` runs. .ci/run runs it on a CPU-only wheel in a fresh virtual
environment; by hand, from outside the source folder:

    cd /tmp && python /path/to/cggr/scripts/wheel_smoke.py [--expect-cuda-ops yes|no] [--forbid-source DIR]
"""
import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect-cuda-ops", choices=("yes", "no"), default=None,
                        help="fail unless cggr._C.with_cuda is this (default: not checked)")
    parser.add_argument("--forbid-source", default=None,
                        help="fail when cggr is imported from under this folder (the source tree)")
    args = parser.parse_args()
    # the script's own folder (scripts/) is sys.path[0]; the source tree must not be importable through it
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

    import torch

    import cggr
    from cggr import _C
    from cggr.env import report

    where = os.path.dirname(os.path.abspath(cggr.__file__))
    print(f"cggr {cggr.__version__} from {where}; torch {torch.__version__}")
    if args.forbid_source and where.startswith(os.path.abspath(args.forbid_source) + os.sep):
        print(f"FAIL: cggr was imported from the source folder {args.forbid_source}, not the installed wheel")
        return 1
    print("cggr._C.with_cuda:", _C.with_cuda)
    if args.expect_cuda_ops is not None and _C.with_cuda != (args.expect_cuda_ops == "yes"):
        print(f"FAIL: expected cggr._C.with_cuda == {args.expect_cuda_ops == 'yes'}")
        return 1

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.8, 0.4]])
    mask = torch.ops.cggr.select_topk(scores, None, torch.tensor(0.5))
    expected = torch.tensor([[False, True, True, False], [True, False, True, False]])
    assert torch.equal(mask, expected), mask
    print("torch.ops.cggr.select_topk:", mask.tolist())

    torch.manual_seed(0)
    logits = torch.randn(2, 8, 16, requires_grad=True)
    targets = torch.randint(0, 16, (2, 8))
    loss = cggr.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0)(logits, targets)
    loss.backward()
    selected_rows = int((logits.grad.abs().sum(-1) > 0).sum())
    assert torch.isfinite(loss) and 0 < selected_rows < 16, (loss, selected_rows)
    print(f"CGGRLoss forward/backward: loss {loss.item():.4f}, gradient on {selected_rows} of 16 tokens")
    print(report())
    print("wheel smoke test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
